"""Bounded soak test: sustained mixed load on a TorchServe started for it, watching for failures, worker
restarts and worker memory growth. ``python loadtest/soak.py [--duration 60] [--users 32]``

1. Builds archives of ``--models`` (default mnistnet, mlp, regressionnet: what loadtest/locustfile.py
   sends) from ``weights/`` into a temporary store (missing weights are trained first) and starts a
   TorchServe on free loopback ports with a private TMPDIR (serve/server.py), waiting until it is READY.
2. Runs locust headless with loadtest/locustfile.py: ``--users`` users (default 32, spawn rate
   ``--spawn-rate``, default 16/s) for ``--duration`` seconds (default 60), on loopback.
3. Every ``--sample-every`` seconds (default 2) samples the resident memory (RSS, psutil) of every
   backend worker and of the Java frontend.
4. Verdict (all must hold): 0 failed requests; no worker restarted (same pids at the end); for every
   worker, mean RSS over the last 10 s <= mean RSS over the first 10 s x 1.10 + 20 MB.
5. Writes ``<out>/soak.json`` (settings, totals, latency percentiles, per-second req/s, RSS samples,
   verdict) and ``<out>/soak.png`` (worker/frontend RSS and req/s over time); ``--out`` defaults to
   loadtest/results/. Exit status 0 if the verdict passes, 1 if not, 2 for bad arguments.

The server is stopped at the end, also on errors or Ctrl-C. Client and server share the machine's
cores, so req/s is a lower bound of the server's capacity (bench/ measures that properly).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from tqdm import tqdm

from models.registry import get_spec
from paths import REPO_ROOT, WEIGHTS_DIR
from serve.server import Ports, Server

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = ("mnistnet", "mlp", "regressionnet")
WINDOW_S = 10.0  # RSS is compared between the first and the last WINDOW_S seconds of load
RSS_FACTOR = 1.10  # last-window mean may exceed first-window mean by 10 % ...
RSS_SLACK_MB = 20.0  # ... plus 20 MB (allocator caches, a larger batch seen late)
MB = 1024 * 1024


@dataclass
class SoakConfig:
    """Soak settings; defaults are the recorded 60 s run (loadtest/README.md)."""

    duration: float = 60.0
    users: int = 32
    spawn_rate: float = 16.0
    sample_every: float = 2.0
    models: tuple[str, ...] = DEFAULT_MODELS
    out_dir: Path = DEFAULT_OUT
    name: str = "soak"  # output files <out_dir>/<name>.json and .png

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not self.duration >= 2 * WINDOW_S:
            raise ValueError(f"--duration must be at least {2 * WINDOW_S:.0f} s (two RSS windows); got {self.duration}")
        if self.users < 1 or self.spawn_rate <= 0:
            raise ValueError(f"--users must be >= 1 and --spawn-rate > 0; got {self.users}, {self.spawn_rate}")
        if not 0 < self.sample_every <= WINDOW_S / 2:
            raise ValueError(f"--sample-every must be in (0, {WINDOW_S / 2:.0f}] s; got {self.sample_every}")
        specs = [get_spec(name) for name in self.models]  # KeyError names the known models
        if not any(spec.is_image_model for spec in specs):
            raise ValueError("--models must include an image model (the locustfile's main traffic)")


@dataclass
class Sample:
    t: float  # seconds since the load started (wall-clock time while sampling)
    workers_mb: dict[str, float]  # model name → worker RSS in MB
    frontend_mb: float
    pids: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- server


def start_server(models: tuple[str, ...], root: Path) -> Server:
    """Archives of ``models`` in ``root/store`` (training missing weights) and a READY server on free ports."""
    from serve.package import package_models

    store = (root / "store").resolve()
    package_models(list(models), WEIGHTS_DIR.resolve(), store)
    server = Server(ports=Ports.free(), tmpdir=root / "tmp", workdir=root / "work", model_store=store,
                    log_dir=root / "logs", models=list(models))
    try:
        server.start()
        server.wait_ready(timeout=300)
    except BaseException:
        server.stop()
        raise
    return server


def worker_pids(server: Server) -> dict[str, int]:
    """model → pid of its (single) worker, from the management API."""
    return {name: server.describe(name)["workers"][0]["pid"] for name in server.models}


def sample(server: Server, pids: dict[str, int], t: float) -> Sample:
    """RSS of every worker in ``pids`` and of the frontend (a worker that is gone counts 0 MB)."""
    workers = {}
    for name, pid in pids.items():
        try:
            workers[name] = psutil.Process(pid).memory_info().rss / MB
        except psutil.Error:
            workers[name] = 0.0
    try:
        frontend = psutil.Process(server.pid()).memory_info().rss / MB
    except (psutil.Error, TypeError, ValueError):
        frontend = 0.0
    return Sample(t, workers, frontend, dict(pids))


# --------------------------------------------------------------------------------------------- locust


def locust_command(config: SoakConfig, host: str, csv_prefix: Path) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(config.users), "-r", str(config.spawn_rate), "-t", f"{config.duration:g}s",
        "--host", host, "--csv", str(csv_prefix), "--only-summary", "--stop-timeout", "10",
    ]


def locust_env(config: SoakConfig, key: str) -> dict[str, str]:
    """The locustfile's settings: the served image model, the served tabular models, the key."""
    specs = [get_spec(name) for name in config.models]
    return {
        **os.environ,
        "TS_INFERENCE_KEY": key,
        "LOADTEST_IMAGE_MODEL": next(s.name for s in specs if s.is_image_model),
        "LOADTEST_TABULAR_MODELS": ",".join(s.name for s in specs if not s.is_image_model),
    }


def read_history(path: Path) -> list[dict]:
    """Aggregated rows of locust's ``_stats_history.csv``: t (wall-clock s), users, locust's sliding req/s,
    failures/s, total requests and failures so far."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] != "Aggregated":
                continue
            rows.append({
                "t": float(row["Timestamp"]),
                "users": int(row["User Count"]),
                "locust_rps": float(row["Requests/s"]),
                "failures_per_s": float(row["Failures/s"]),
                "requests": int(row["Total Request Count"]),
                "failures": int(row["Total Failure Count"]),
            })
    return rows


def read_totals(path: Path) -> dict:
    """Totals of locust's ``_stats.csv``: the Aggregated row plus requests/failures per request kind."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    total = next(row for row in rows if row["Name"] == "Aggregated")
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "rps": float(total["Requests/s"]),
        "latency_ms": {p: float(total[f"{p}%"]) for p in ("50", "90", "95", "99", "100")},
        "by_kind": {row["Name"]: {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                                  "median_ms": float(row["Median Response Time"])}
                    for row in rows if row["Name"] != "Aggregated"},
    }


def read_failures(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{"kind": r["Name"], "error": r["Error"], "count": int(r["Occurrences"])} for r in csv.DictReader(f)]


# -------------------------------------------------------------------------------------------- verdict


def rss_verdict(samples: list[Sample], duration: float) -> dict[str, dict]:
    """Per worker: mean RSS of the first and last WINDOW_S seconds of the ``duration`` s of load (samples
    with ``t`` in [0, duration]), the allowed limit, and ok."""
    verdict = {}
    for name in samples[0].workers_mb:
        first = [s.workers_mb[name] for s in samples if s.t <= WINDOW_S]
        last = [s.workers_mb[name] for s in samples if s.t >= duration - WINDOW_S]
        first_mean, last_mean = sum(first) / len(first), sum(last) / len(last)
        limit = first_mean * RSS_FACTOR + RSS_SLACK_MB
        verdict[name] = {"first_mb": round(first_mean, 1), "last_mb": round(last_mean, 1),
                         "limit_mb": round(limit, 1), "ok": last_mean <= limit}
    return verdict


def plot(result: dict, path: Path) -> None:
    """Worker/frontend RSS (MB) and req/s over time, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["rss_samples"]
    fig, (ax_mem, ax_rps) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    times = [s["t"] for s in samples]
    for name in samples[0]["workers_mb"]:
        ax_mem.plot(times, [s["workers_mb"][name] for s in samples], marker=".", label=f"worker {name}")
    ax_mem.plot(times, [s["frontend_mb"] for s in samples], marker=".", linestyle="--", label="frontend (Java)")
    duration = result["load_seconds"]
    for ax in (ax_mem, ax_rps):  # the two windows whose mean RSS the verdict compares
        ax.axvspan(0, WINDOW_S, color="grey", alpha=0.12)
        ax.axvspan(duration - WINDOW_S, duration, color="grey", alpha=0.12)
    ax_mem.set_ylabel("RSS (MB)")
    ax_mem.set_title(f"Soak: {result['config']['users']} users for {result['config']['duration']:g} s, "
                     f"{result['totals']['requests']} requests, {result['totals']['failures']} failures")
    ax_mem.legend(fontsize=8)
    ax_mem.grid(alpha=0.3)
    history = result["history"]
    ax_rps.plot([h["t"] for h in history], [h["rps"] for h in history], color="tab:green")
    ax_rps.set_ylabel("requests/s (locust)")
    ax_rps.set_xlabel("seconds since load start (shaded: first and last RSS windows)")
    ax_rps.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ run


def run_soak(config: SoakConfig, server: Server | None = None) -> dict:
    """Run the soak against ``server`` (already READY, serving ``config.models``) or a server started
    for it; write ``<out_dir>/<name>.json`` and ``.png`` and return the result dict (see module doc)."""
    config.check()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp = Path(tmp)
        own = server is None
        if own:
            server = start_server(config.models, tmp)
        try:
            return _run(config, server, tmp)
        finally:
            if own:
                server.stop()


def _run(config: SoakConfig, server: Server, tmp: Path) -> dict:
    pids_before = worker_pids(server)
    csv_prefix = tmp / "locust"
    log_path = config.out_dir / f"{config.name}_locust.log"
    samples: list[Sample] = []  # Sample.t is wall-clock time here; rebased to the load start below
    with open(log_path, "wb") as log:
        start = time.time()
        locust = subprocess.Popen(locust_command(config, server.inference_url, csv_prefix),
                                  env=locust_env(config, server.keys()["inference"]), cwd=REPO_ROOT,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            # locust needs a few seconds to start (it builds its bodies from MNIST): sample until it exits.
            with tqdm(total=round(config.duration), desc="soak (incl. locust start-up)", unit="s") as bar:
                while locust.poll() is None and time.time() - start < config.duration + 120:
                    samples.append(sample(server, pids_before, time.time()))
                    bar.update(min(round(time.time() - start), bar.total) - bar.n)
                    bar.set_postfix_str(" ".join(f"{n}={mb:.0f}MB" for n, mb in samples[-1].workers_mb.items()))
                    time.sleep(config.sample_every)
        finally:
            if locust.poll() is None:
                locust.terminate()
            code = locust.wait(timeout=30)
    if not Path(f"{csv_prefix}_stats.csv").is_file():
        raise RuntimeError(f"locust wrote no statistics (exit code {code}); see {log_path}")

    pids_after = worker_pids(server)
    totals = read_totals(Path(f"{csv_prefix}_stats.csv"))
    history = read_history(Path(f"{csv_prefix}_stats_history.csv"))
    # The load ran from (about) one second before the first history row that counts a request to the
    # last history row; times in the result are seconds since that start.
    busy = [row for row in history if row["requests"] > 0]
    if not busy:
        raise RuntimeError(f"locust sent no requests (exit code {code}); see {log_path}")
    load_start, load_end = busy[0]["t"] - 1, history[-1]["t"]
    previous = None
    for row in history:
        row["t"] -= load_start
        # locust's own Requests/s is a sliding average; the plot wants requests per interval.
        row["rps"] = 0.0 if previous is None else round(
            (row["requests"] - previous["requests"]) / max(row["t"] - previous["t"], 1e-9), 1)
        previous = row
    for s in samples:
        s.t -= load_start
    duration = load_end - load_start
    loaded = [s for s in samples if 0 <= s.t <= duration]
    rss = rss_verdict(loaded, duration)
    restarted = sorted(name for name in pids_before if pids_after.get(name) != pids_before[name])
    result = {
        "config": {**asdict(config), "out_dir": str(config.out_dir), "models": list(config.models),
                   "rss_rule": f"last {WINDOW_S:g} s mean <= first {WINDOW_S:g} s mean x {RSS_FACTOR} "
                               f"+ {RSS_SLACK_MB:g} MB"},
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1)},
        "locust_exit_code": code,
        "load_seconds": duration,
        "totals": totals,
        "failures": read_failures(Path(f"{csv_prefix}_failures.csv")),
        "workers_restarted": restarted,
        "rss": rss,
        "frontend_mb": {"first": round(loaded[0].frontend_mb, 1), "last": round(loaded[-1].frontend_mb, 1),
                        "max": round(max(s.frontend_mb for s in loaded), 1)},
        "history": history,
        "rss_samples": [{"t": round(s.t, 2), "workers_mb": {k: round(v, 1) for k, v in s.workers_mb.items()},
                         "frontend_mb": round(s.frontend_mb, 1)} for s in samples],
    }
    result["passed"] = totals["failures"] == 0 and not restarted and all(v["ok"] for v in rss.values())
    (config.out_dir / f"{config.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, config.out_dir / f"{config.name}.png")
    return result


def summary(result: dict) -> str:
    """A few lines for the terminal."""
    totals = result["totals"]
    lines = [
        f"soak {'PASSED' if result['passed'] else 'FAILED'}: {totals['requests']} requests, "
        f"{totals['failures']} failures, {totals['rps']:.0f} req/s, latency ms p50 {totals['latency_ms']['50']:.0f} "
        f"p95 {totals['latency_ms']['95']:.0f} p99 {totals['latency_ms']['99']:.0f}",
        f"workers restarted: {', '.join(result['workers_restarted']) or 'none'}",
    ]
    for name, v in result["rss"].items():
        lines.append(f"worker {name}: RSS first {v['first_mb']:.0f} MB, last {v['last_mb']:.0f} MB "
                     f"(limit {v['limit_mb']:.0f} MB) {'ok' if v['ok'] else 'GREW'}")
    f = result["frontend_mb"]
    lines.append(f"frontend RSS: first {f['first']:.0f} MB, last {f['last']:.0f} MB, max {f['max']:.0f} MB")
    for failure in result["failures"]:
        lines.append(f"failure x{failure['count']} {failure['kind']}: {failure['error']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> SoakConfig:
    parser = argparse.ArgumentParser(prog="python loadtest/soak.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60, minimum 20)")
    parser.add_argument("--users", type=int, default=32, help="locust users (default 32)")
    parser.add_argument("--spawn-rate", type=float, default=16.0, help="users started per second (default 16)")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between RSS samples (default 2)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated models to serve (default {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default loadtest/results)")
    parser.add_argument("--name", default="soak", help="output file stem (default soak)")
    args = parser.parse_args(argv)
    config = SoakConfig(args.duration, args.users, args.spawn_rate, args.sample_every,
                        tuple(m.strip() for m in args.models.split(",") if m.strip()), args.out, args.name)
    try:
        config.check()
    except (KeyError, ValueError) as err:
        parser.error(str(err.args[0]) if err.args else str(err))
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    result = run_soak(config)
    print(summary(result))
    print(f"wrote {config.out_dir / (config.name + '.json')} and {config.out_dir / (config.name + '.png')}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
