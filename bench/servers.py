"""The servers the benchmark compares; the TorchServe ones are built on serve/server.py's ``Server``.

* :func:`baseline_server`: stock TorchServe (empty bench/baseline/config.properties, plus ``settings`` such as
  :data:`STOCK_FAST_SETTINGS` for the tuned run; TorchServe's own log4j2.xml extracted from its jar, no thread
  settings in the environment unless ``env`` adds them)
  serving ``mnist_baseline.mar`` (bench/baseline/handler.py; its model-config decides tuned or default).
* :func:`ours_server`: the project's deployment: the repository's config.properties, serve/log4j2.xml,
  the archives serve/package.py builds, and serve/server.py's environment (OMP_NUM_THREADS=1).
* :class:`LitServeServer`: bench/litserve_server.py (LitServe, same weights) as its own process.

Each gets free ports, a private short ``TMPDIR`` and working directory under one temporary directory,
and is stopped when its ``with`` block ends (also on Ctrl-C or an exception).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import requests
import ts

from serve.server import DEFAULT_CONFIG, Ports, Server, load_properties, port_is_free, write_properties

BENCH_DIR = Path(__file__).resolve().parent
BASELINE_CONFIG = BENCH_DIR / "baseline" / "config.properties"
STOCK_JAR = Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"
# Variables serve/server.py sets for its workers; the stock baseline must run without them.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Stock TorchServe's fastest settings a user tuning it for speed would pick: Prometheus metrics instead of
# log lines per request, no token check (the benchmark's tuned stock; "stock-default" keeps the defaults).
STOCK_FAST_SETTINGS = {"metrics_mode": "prometheus", "disable_token_authorization": "true"}


class StockServer(Server):
    """``Server`` that leaves the worker environment as TorchServe would get it from a plain shell:
    it does not add ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` (kept only if the caller's environment has them),
    and every worker is a fresh ``python`` that imports torch itself (no fork server)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("fork_workers", False)
        super().__init__(*args, **kwargs)

    def _environment(self) -> dict[str, str]:
        env = super()._environment()
        for name in THREAD_VARIABLES:
            if name not in os.environ and name not in self.extra_env:
                env.pop(name, None)
        return env


def stock_log_config(dest_dir: Path) -> Path:
    """Extract TorchServe's built-in ``log4j2.xml`` from its jar into ``dest_dir`` and return the path."""
    with zipfile.ZipFile(STOCK_JAR) as jar:
        path = Path(dest_dir) / "stock-log4j2.xml"
        path.write_bytes(jar.read("log4j2.xml"))
    return path


@contextlib.contextmanager
def private_dirs(label: str):
    """A fresh short directory under /tmp (unix socket paths must stay < 108 bytes), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"bench-{label}-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def running(server: Server, timeout: float = 300.0):
    """Start ``server``, wait until all workers are READY, yield ``(server, cold start seconds)``, stop it.

    Cold start is measured from the start command to the moment every model's workers are READY.
    """
    try:
        started = time.perf_counter()
        server.start()
        server.wait_ready(timeout=timeout, progress=False)
        cold_start = time.perf_counter() - started
        yield server, cold_start
    finally:
        server.stop()


def baseline_server(root: Path, store: Path, model: str = "mnist_baseline", env: dict[str, str] | None = None,
                    settings: dict[str, str] | None = None) -> Server:
    """Stock TorchServe serving ``<store>/<model>.mar``, everything under ``root``; ``settings`` are written
    over the empty baseline config (e.g. :data:`STOCK_FAST_SETTINGS`)."""
    config = BASELINE_CONFIG
    if settings:
        props = {**load_properties(BASELINE_CONFIG), **settings}
        config = root / "stock.properties"
        write_properties(props, config, f"{BASELINE_CONFIG.name} with " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return StockServer(
        config=config, ports=Ports.free(), tmpdir=root / "t", workdir=root / "w",
        model_store=store, models=[model], log_dir=root / "logs", log_config=stock_log_config(root), env=env,
    )


class LitServeServer:
    """bench/litserve_server.py on a free port, with the few ``Server`` methods the benchmark uses."""

    def __init__(self, weights: Path, log: Path, workers: int = 2):
        self.weights, self.log, self.workers = Path(weights), Path(log), workers
        self.port = next(p for p in range(8600, 8700) if port_is_free(p))
        self.inference_url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = None
        self.models = ["mnistnet"]
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(self.log, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "bench.litserve_server", "--weights", str(self.weights),
                 "--port", str(self.port), "--workers", str(self.workers)],
                cwd=BENCH_DIR.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120.0, progress: bool = False) -> None:
        """Until ``GET /health`` answers ``ok`` (every inference worker has set up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"LitServe exited ({self._process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.inference_url}/health", timeout=2).text == "ok":
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"LitServe not ready after {timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def keys(self) -> dict[str, str]:
        return {}  # no authentication

    def describe(self, model: str) -> dict:
        return {"modelName": model, "batchSize": 8, "maxBatchDelay": 2, "workers": [None] * self.workers}

    def stop(self) -> None:
        """SIGTERM to its process group (the API server and inference workers), SIGKILL after 10 s."""
        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, 15)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, 9)
            self._process.wait()


def ours_server(root: Path, store: Path, models: list[str], config: Path = DEFAULT_CONFIG,
                env: dict[str, str] | None = None) -> Server:
    """The project's deployment (``config``, serve/log4j2.xml) serving ``models`` from ``store``."""
    return Server(
        config=config, ports=Ports.free(), tmpdir=root / "t", workdir=root / "w", model_store=store,
        models=models, log_dir=root / "logs", env=env,
    )


def scrape_metrics(server, prefix: str = "") -> dict[str, float]:
    """The server's Prometheus samples whose name starts with ``prefix``, summed over labels.

    Empty when /metrics does not answer (or is empty: TorchServe fills it only with metrics_mode=prometheus).
    """
    if not server.metrics_url:
        return {}
    try:
        text = requests.get(server.metrics_url, timeout=10).text
    except requests.RequestException:
        return {}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if match and match.group(1).startswith(prefix):
            totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(2))
    return totals
