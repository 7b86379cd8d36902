"""Cold start, measured: ``python -m bench.coldstart [--runs 3] [--image TAG] [--plot PATH]``.

In one run, one after the other on the same machine (never at the same time):

* **stock**: stock TorchServe serving one model (``mnist_baseline.mar``, bench/baseline/, 2 default
  workers): ``torchserve --start`` until that model answers and its workers are READY;
* **ours**: ``python -m serve start`` (the CLI, as a user runs it: all registered models, fork server on)
  until it returns (every worker READY), with the first answer of every model;
* **ours, plain workers** (``SERVE_FORK_WORKERS=0``; ``--no-plain`` skips it): the same start with every
  worker importing torch itself, what ``serve start`` did before the fork server;
* ``--image TAG``: the container (``podman run``, deploy/docker/entrypoint.sh) until its models answer and
  are READY, with the fork server and (unless ``--no-plain``) without (``SERVE_FORK_WORKERS=0``).

Each start is timed from its command, with pollers every ~25 ms (TCP connect, a real prediction per model,
the management API's worker states, the frontend's child processes) and the logs' timestamps for the phases:
JVM start → frontend listening, archive unpacking (the unpacked model folders' times), per worker: spawn →
imports done (its first log line) → frontend connected → handler loaded → READY, and the fork server's
imports. Prints a table (median of ``--runs``) with ratios against stock and writes a PNG timeline.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests


from bench.servers import baseline_server, private_dirs
from models.registry import REGISTRY, get_spec
from paths import BENCH_RESULTS_DIR, MODEL_STORE, REPO_ROOT, WEIGHTS_DIR
from serve.package import archive_is_current, build_archive, package_models
from serve.server import (
    DEFAULT_CONFIG, PID_FILE, Ports, Server, effective_config, load_properties, read_keys, write_properties,
)

POLL_S = 0.025
BASELINE_NAME = "mnist_baseline"  # stock: bench/baseline/handler.py on MNISTNet, no model-config (defaults)
BASELINE_HANDLER = REPO_ROOT / "bench" / "baseline" / "handler.py"
WORKER_LINES = {  # model_log.log line → phase it ends (TorchServe's worker and handlers/base.py print them)
    "imported": re.compile(r"s_name_part0="),
    "connected": re.compile(r"Connection accepted: "),
    "loaded": re.compile(r"serving \S+ \(|Model \S+ loaded\.|Backend worker process died"),
}
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3}) \[\w+ *\] W-(\d+)-(\S+?)_[\d.]+-std\w+ MODEL_LOG - (.*)$")


def _log_time(stamp: str) -> float:
    """Epoch seconds of a log4j ISO8601 timestamp (local time, as the JVM writes it)."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S,%f").timestamp()


def sample_body(model: str) -> bytes:
    """A JSON body every handler accepts for ``model`` (one sample of its input width)."""
    if model == BASELINE_NAME:
        return json.dumps([0.5] * 784).encode()
    return json.dumps({"data": [[0.5] * get_spec(model).input_width]}).encode()


class Watcher:
    """Background pollers for one starting server: listening, first answer and READY per model, workers."""

    def __init__(self, t0: float, inference: int, management: int, workdir: Path, tmpdir: Path, models: list[str]):
        self.t0, self.inference, self.management = t0, inference, management
        self.workdir, self.tmpdir, self.models = workdir, tmpdir, models
        self.events: dict[str, float] = {}
        self.answers: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.spawned: dict[int, float] = {}  # worker port → when its process was first seen (≤ POLL_S late)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._listen, self._answer, self._ready, self._spawn)]

    def __enter__(self) -> "Watcher":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)

    def done(self) -> bool:
        return len(self.ready) == len(self.models) and len(self.answers) == len(self.models)

    def _key(self, kind: str) -> dict[str, str]:
        key = read_keys(self.workdir).get(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _listen(self) -> None:
        while not self.stop.is_set():
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.inference)) == 0:
                    self.events["listening"] = time.time()
                    return
            time.sleep(POLL_S)

    def _poll_models(self, seen: dict[str, float], probe) -> None:
        """Once listening, ``probe(session, model)`` each model not yet in ``seen`` until all are; record when."""
        session = requests.Session()
        while not self.stop.is_set() and len(seen) < len(self.models):
            if "listening" in self.events:
                for model in self.models:
                    if model in seen:
                        continue
                    try:
                        if probe(session, model):
                            seen[model] = time.time()
                    except (requests.RequestException, ValueError, IndexError, KeyError, TypeError):
                        pass
            time.sleep(POLL_S)

    def _answer(self) -> None:
        def answers(session, model) -> bool:
            response = session.post(f"http://127.0.0.1:{self.inference}/predictions/{model}",
                                    data=sample_body(model), timeout=10,
                                    headers={"Content-Type": "application/json", **self._key("inference")})
            return response.status_code == 200
        self._poll_models(self.answers, answers)

    def _ready(self) -> None:
        def ready(session, model) -> bool:
            described = session.get(f"http://127.0.0.1:{self.management}/models/{model}", timeout=10,
                                    headers=self._key("management")).json()[0]
            return Server.workers_ready(described)
        self._poll_models(self.ready, ready)

    def _spawn(self) -> None:
        """The frontend's worker processes (stock: the workers; ours: the fork server's clients) as they appear."""
        frontend = None
        while not self.stop.is_set():
            try:
                # Seen times, not psutil's create_time(): that one is only as exact as the boot time (1 s).
                if frontend is None:
                    frontend = psutil.Process(int((self.tmpdir / PID_FILE).read_text().strip()))
                    self.events["jvm_process"] = time.time()
                for child in frontend.children():
                    match = re.search(r"\.ts\.sock\.(\d+)", " ".join(child.cmdline()))
                    if match and int(match.group(1)) not in self.spawned:
                        self.spawned[int(match.group(1))] = time.time()
            except (FileNotFoundError, ValueError, psutil.Error):
                pass
            time.sleep(POLL_S)


def worker_phases(log_dir: Path, spawned: dict[int, float], since: float) -> list[dict]:
    """Per worker (port), the epoch time each phase ended, from model_log.log lines written since ``since``."""
    workers: dict[int, dict] = {}
    path = log_dir / "model_log.log"
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        match = LOG_LINE.match(line)
        if not match or _log_time(match.group(1)) < since - 1:
            continue
        port = int(match.group(2))
        worker = workers.setdefault(port, {"port": port, "model": match.group(3)})
        for phase, pattern in WORKER_LINES.items():
            if phase not in worker and pattern.search(match.group(4)):
                worker[phase] = _log_time(match.group(1))
    for port, worker in workers.items():
        if port in spawned:
            worker["spawned"] = spawned[port]
    return sorted(workers.values(), key=lambda w: w.get("spawned", w.get("imported", 0)))


def unpacked_at(tmpdir: Path) -> float | None:
    """When the frontend finished unpacking the archives (latest change time under $TMPDIR/models)."""
    folders = list((tmpdir / "models").glob("*")) if (tmpdir / "models").is_dir() else []
    return max((f.stat().st_mtime for f in folders), default=None)


def relative(events: dict, t0: float) -> dict:
    return {k: (round(v - t0, 3) if isinstance(v, float) else v) for k, v in events.items()}


def wait_all(watcher: Watcher, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not watcher.done() and time.monotonic() < deadline:
        time.sleep(POLL_S)


def run_stock(store: Path) -> dict:
    """``torchserve --start`` of stock TorchServe with one model, to its first answer and all workers READY."""
    with private_dirs("cold-stock") as root:
        server = baseline_server(root, store)
        try:
            t0 = time.time()
            with Watcher(t0, server.ports.inference, server.ports.management, server.workdir, server.tmpdir,
                         [BASELINE_NAME]) as watcher:
                server.start()
                watcher.events["command_returned"] = time.time()
                wait_all(watcher, 120)
            result = summarise(watcher, t0, server.log_dir, server.tmpdir)
        finally:
            server.stop()
    return result


def run_ours(store: Path, models: list[str], fork_workers: bool) -> dict:
    """``python -m serve start`` (the CLI) on free ports until it returns, with first answers and READY times."""
    with private_dirs("cold-ours") as root:
        ports = Ports.free()
        config = root / "config.properties"
        write_properties(effective_config(load_properties(DEFAULT_CONFIG), ports, store), config,
                         "bench/coldstart.py: the repository's config on free ports")
        workdir, log_dir = root / "w", root / "logs"
        cli = [sys.executable, "-m", "serve", "--config", str(config), "--workdir", str(workdir),
               "--log-dir", str(log_dir)]
        env = {**os.environ, "SERVE_FORK_WORKERS": "1" if fork_workers else "0"}
        try:
            t0 = time.time()
            with Watcher(t0, ports.inference, ports.management, workdir, workdir / "tmp", models) as watcher:
                result = subprocess.run([*cli, "start", "--models", ",".join(models)], cwd=REPO_ROOT, env=env,
                                        capture_output=True, text=True, timeout=300)
                watcher.events["command_returned"] = time.time()
                if result.returncode != 0:
                    raise RuntimeError(f"serve start failed:\n{result.stdout}\n{result.stderr}")
                wait_all(watcher, 60)
            summary = summarise(watcher, t0, log_dir, workdir / "tmp")
            out = log_dir / "forkserver.out"
            ready = re.findall(r"ready at (\d+\.\d+)", out.read_text()) if out.is_file() else []
            if ready and fork_workers:
                summary["forkserver_ready"] = round(float(ready[-1]) - t0, 3)
        finally:
            subprocess.run([*cli, "stop"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120)
    return summary


def summarise(watcher: Watcher, t0: float, log_dir: Path, tmpdir: Path) -> dict:
    """The phases of one start, in seconds after its command."""
    events = dict(watcher.events)
    unpacked = unpacked_at(tmpdir)
    if unpacked:
        events["archives_unpacked"] = unpacked
    summary = relative(events, t0)
    summary["first_answer"] = round(min(watcher.answers.values()) - t0, 3) if watcher.answers else None
    summary["all_ready"] = round(max(watcher.ready.values()) - t0, 3) if len(watcher.ready) == len(watcher.models) else None
    summary["answers"] = relative(watcher.answers, t0)
    summary["ready"] = relative(watcher.ready, t0)
    summary["workers"] = [relative(w, t0) for w in worker_phases(log_dir, watcher.spawned, t0)]
    return summary


# ------------------------------------------------------------------------------------------ container

def run_container(image: str, models: list[str], fork_workers: bool = True) -> dict:
    """``podman run`` of ``image`` (its entrypoint, config and key handling) until every model answers a
    prediction on the published port and the image's health command (tsctl.py) says every worker is READY.
    Each poll goes through ``podman exec`` (~0.2-0.5 s), so these times are that much coarser."""
    if shutil.which("podman") is None:
        raise RuntimeError("podman is not installed")
    if subprocess.run(["podman", "image", "exists", image]).returncode != 0:
        raise RuntimeError(f"image {image} does not exist (build it first: see the Dockerfile)")
    port = Ports.free().inference
    cmd = ["podman", "run", "-d", "-p", f"127.0.0.1:{port}:8080", "--read-only", "--tmpfs", "/tmp:rw,mode=1777",
           "--tmpfs", "/home/model-server:rw,U", "-e", f"SERVE_FORK_WORKERS={int(fork_workers)}", image]
    t0 = time.time()
    started = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        raise RuntimeError(f"podman run failed: {started.stderr.strip()}")
    cid = started.stdout.strip()
    summary: dict = {"command_returned": round(time.time() - t0, 3), "answers": {}, "ready": {}, "workers": []}

    def tsctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", "exec", cid, "python3", "/app/docker/tsctl.py", *args],
                              capture_output=True, text=True, timeout=60)

    try:
        key, session, deadline = None, requests.Session(), time.monotonic() + 180
        while time.monotonic() < deadline and "all_ready" not in summary:
            if key is None:
                result = tsctl("key")
                key = result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None
            for model in [m for m in models if m not in summary["answers"]] if key else []:
                try:
                    answer = session.post(f"http://127.0.0.1:{port}/predictions/{model}", data=sample_body(model),
                                          headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
                                          timeout=10)
                    if answer.status_code == 200:
                        summary["answers"][model] = round(time.time() - t0, 3)
                except requests.RequestException:
                    pass
            if key and tsctl("health").returncode == 0:
                summary["all_ready"] = round(time.time() - t0, 3)
            time.sleep(POLL_S)
        summary["first_answer"] = min(summary["answers"].values(), default=None)
        summary.setdefault("all_ready", None)
        return summary
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", cid], capture_output=True, timeout=120)


# ------------------------------------------------------------------------------------------- report

def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def worker_median(runs: list[dict], start: str, end: str) -> float | None:
    """Median over runs and workers of the time from phase ``start`` to ``end`` (``start`` None: the command)."""
    values = [w[end] - (w[start] if start else 0) for r in runs for w in r["workers"]
              if end in w and (start is None or start in w)]
    return round(statistics.median(values), 2) if values else None


def report(results: dict[str, list[dict]]) -> str:
    """The table: median seconds after the start command, and ours ÷ stock."""
    rows = [
        ("JVM process seen", lambda runs: median_of(runs, "jvm_process")),
        ("archives unpacked", lambda runs: median_of(runs, "archives_unpacked")),
        ("frontend listening", lambda runs: median_of(runs, "listening")),
        ("fork server imports done", lambda runs: median_of(runs, "forkserver_ready")),
        ("worker: spawn → imports done (median)", lambda runs: worker_median(runs, "spawned", "imported")),
        ("worker: connected → handler loaded (median)", lambda runs: worker_median(runs, "connected", "loaded")),
        ("last worker spawned", lambda runs: median_of([{"v": max((w.get("spawned", 0) for w in r["workers"]), default=None)}
                                                         for r in runs], "v")),
        ("first model answering", lambda runs: median_of(runs, "first_answer")),
        ("all models READY", lambda runs: median_of(runs, "all_ready")),
        ("start command returned", lambda runs: median_of(runs, "command_returned")),
    ]
    names = list(results)
    lines = ["| phase (s after the start command, median) | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for label, fn in rows:
        cells = [fn(results[n]) for n in names]
        if all(c is None for c in cells):
            continue
        lines.append(f"| {label} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |")
    stock = results.get("stock")
    if stock:
        for key, label in (("first_answer", "first answer"), ("all_ready", "all READY")):
            base = median_of(stock, key)
            ratios = [f"{n} {median_of(results[n], key) / base:.2f}x" for n in names
                      if n != "stock" and base and median_of(results[n], key)]
            lines.append(f"\n{label} vs stock ({base:.2f} s): " + ", ".join(ratios))
    return "\n".join(lines)


def plot_timeline(results: dict[str, list[dict]], path: Path) -> Path:
    """One panel per side (its median run by all READY): a bar per worker split into its phases, and the frontend's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    median = {n: sorted(runs, key=lambda r: r.get("all_ready") or 1e9)[(len(runs) - 1) // 2]
              for n, runs in results.items() if runs}
    sides = [n for n in median if median[n]["workers"]]
    fig, axes = plt.subplots(len(sides), 1, figsize=(11, 1.2 + 0.42 * sum(len(median[n]["workers"]) + 2 for n in sides)),
                             sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [len(median[n]["workers"]) + 2 for n in sides]})
    colors = {"spawn → imports done": "tab:red", "imports → connected": "tab:gray",
              "connected → loaded": "tab:blue", "loaded → READY": "tab:green"}
    for ax, name in zip(axes[:, 0], sides):
        run = median[name]
        labels = []
        y = 0
        jvm, listening = run.get("jvm_process") or 0, run.get("listening") or 0
        ax.broken_barh([(0, jvm)], (y - 0.35, 0.7), color="thistle")
        ax.broken_barh([(jvm, listening - jvm)], (y - 0.35, 0.7), color="tab:purple")
        labels.append("frontend: command → JVM → listening")
        if run.get("forkserver_ready"):
            y += 1
            ax.broken_barh([(0, run["forkserver_ready"])], (y - 0.35, 0.7), color="tab:orange")
            labels.append("fork server: imports")
        for worker in run["workers"]:
            y += 1
            points = [worker.get(k) for k in ("spawned", "imported", "connected", "loaded")]
            points.append(run["ready"].get(worker["model"]))
            segments = list(zip(zip(points, points[1:]), colors.values()))
            if points[3] is None:  # no "loaded" line (stock's handler prints none): connected → READY in one
                segments = segments[:2] + [((points[2], points[4]), colors["connected → loaded"])]
            for (a, b), color in segments:
                if a is not None and b is not None:
                    ax.broken_barh([(a, max(b - a, 0.01))], (y - 0.35, 0.7), color=color)
            labels.append(f"{worker['model']} (W-{worker['port']})")
        for key, style, row in (("first_answer", "--", -0.75), ("all_ready", "-", -1.45)):
            if run.get(key):
                ax.axvline(run[key], color="black", linestyle=style, linewidth=1)
                ax.text(run[key], row, f" {key.replace('_', ' ')} {run[key]:.1f} s", fontsize=8, va="center")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(len(labels) - 0.4, -1.9)
        ax.set_title(f"{name} (median of {len(results[name])} runs by all READY)", fontsize=10, loc="left")
        ax.grid(True, axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ["thistle", "tab:purple", "tab:orange", *colors.values()]]
    fig.legend(handles, ["start command → JVM process", "JVM → listening", "fork server imports", *colors],
               fontsize=7, ncol=4, loc="upper center")
    axes[-1, 0].set_xlabel("seconds after the start command")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def prepare_store(root: Path, models: list[str]) -> Path:
    """A store with the baseline archive and ours (the repository's when current, else built here)."""
    store = root / "store"
    build_archive(get_spec("mnistnet"), WEIGHTS_DIR / "mnistnet.pt", store, name=BASELINE_NAME,
                  handler=BASELINE_HANDLER, config={})
    for name in models:
        archive = MODEL_STORE / f"{name}.mar"
        if archive_is_current(archive, WEIGHTS_DIR / f"{name}.pt"):
            shutil.copy2(archive, store / archive.name)
        else:
            package_models([name], store=store)
    return store


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="starts of each side (default 3; medians reported)")
    parser.add_argument("--models", default="all", help="models ours serves (default: all registered)")
    parser.add_argument("--no-plain", action="store_true", help="skip ours with plain workers (SERVE_FORK_WORKERS=0)")
    parser.add_argument("--image", help="also time this container image with podman (e.g. torchserve-mnist:cpu)")
    parser.add_argument("--plot", type=Path, default=BENCH_RESULTS_DIR / "coldstart.png",
                        help="timeline PNG (default bench/results/coldstart.png)")
    parser.add_argument("--json", type=Path, help="write every measured time here")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for a 1-min load below 1.0 (other work on the machine)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = list(REGISTRY) if args.models == "all" else args.models.split(",")
    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        time.sleep(5)
    load = os.getloadavg()
    print(f"cold start: {os.cpu_count()} CPUs, 1-min load {load[0]:.2f} before; {args.runs} run(s) per side", flush=True)
    sides = {"stock": lambda s: run_stock(s), "ours": lambda s: run_ours(s, models, True)}
    if not args.no_plain:
        sides["ours, plain workers"] = lambda s: run_ours(s, models, False)
    if args.image:
        sides[f"container {args.image}"] = lambda s: run_container(args.image, models)
        if not args.no_plain:
            sides["container, plain workers"] = lambda s: run_container(args.image, models, fork_workers=False)
    results: dict[str, list[dict]] = {name: [] for name in sides}
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coldstart-", dir="/tmp")))
        store = prepare_store(root, models)
        for i in range(args.runs):
            for name, run in sides.items():  # interleaved: load drifts hit every side alike
                try:
                    result = run(store)
                except RuntimeError as err:
                    print(f"  {name}: {err}", flush=True)
                    continue
                results[name].append(result)
                print(f"  run {i + 1} {name}: first answer {result['first_answer']} s, all READY "
                      f"{result['all_ready']} s, command returned {result.get('command_returned')} s", flush=True)
    print(f"1-min load after: {os.getloadavg()[0]:.2f}\n")
    results = {name: runs for name, runs in results.items() if runs}
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        print(f"\ntimeline: {plot_timeline(results, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
