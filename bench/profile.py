"""Where a served request's time goes: CPU per request by process, py-spy of a worker, the servers' own timers.

    .venv/bin/python -m bench.profile                                   # ours, JSON and PNG, 1 and 16 connections
    .venv/bin/python -m bench.profile --stock                           # the tuned stock TorchServe (fastest settings)
    .venv/bin/python -m bench.profile --workers 1 --max-batch-delay 5   # one variant of the serving settings
    .venv/bin/python -m bench.profile --set number_of_netty_threads=1 --env SERVE_FAST_WORKER=0

mnistnet alone, built through serve/package.py (with ``--workers/--batch-size/--max-batch-delay`` overrides)
and served with the repository's config.properties plus ``--set`` overrides. For each form and connection
count wrk runs while the CPU time of the frontend (java), the workers and wrk is read: CPU microseconds
per request are the numbers to compare on a shared machine (req/s moves with whatever else runs). Then
py-spy records one worker under load (``--spy`` seconds at each connection count) and its samples are
grouped into the stages of a request's life (:data:`STAGES`); the frontend's queue/inference latency and
the handler's stage timers come from ``/metrics``. Prints a table, writes ``--out`` JSON and a PNG.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


from bench import payloads
from bench.loadgen import run_wrk
from bench.serving import WARMUP_S, warm_up
from bench.servers import STOCK_FAST_SETTINGS, baseline_server, ours_server, private_dirs, running, scrape_metrics
from models.registry import get_spec
from serve.package import build_archive, ensure_weights, model_config
from serve.server import DEFAULT_CONFIG, load_properties, write_properties

from paths import BENCH_RESULTS_DIR, WEIGHTS_DIR
MODEL = "mnistnet"
# py-spy frames → stage of a request's life in the worker; the first matching rule (innermost frame first) wins.
STAGES = (
    ("metrics + logging", ("logging/__init__.py", "ModelMetrics.", "caching_metric.py", "metric_cache",
                           "prediction_time_line", "_BatchRecord")),
    ("JSON parse", ("json/decoder.py", "json_loads", "_decoded")),
    ("socket read/write + framing", ("otf_message_handler.py", "torchserve/worker.py:retrieve_msg", "_inference_msg",
                                     "torchserve/worker.py:_Reader", "socket.py", "handle_connection")),
    ("validate + decode", ("decoding.py", "protocols.py:decode", "protocols.py:_decode", "protocols.py:request_headers",
                           "PIL/", "Handler.preprocess")),
    ("forward", ("torch/nn/", "mnist_net.py", "ServingHandler.forward", "BaseHandler.inference")),
    ("encode response", ("protocols.py:encode", "json/encoder.py", "image_classifier.py", "_response_frame",
                         "create_predict_response", "postprocess")),
    ("TorchServe request bookkeeping", ("service.py", "context.py", "torchserve/worker.py:predict")),
)


def worker_processes(server) -> list[psutil.Process]:
    """The server's backend workers: the frontend's children, and the fork server's children when it forks them."""
    frontend = psutil.Process(server.pid())
    found = frontend.children(recursive=True)
    forkserver = server.forkserver_pid()
    if forkserver is not None:
        found += psutil.Process(forkserver).children(recursive=True)
    return found


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    """user+system CPU seconds of each live process, by pid."""
    out = {}
    for process in processes:
        try:
            times = process.cpu_times()
            out[process.pid] = times.user + times.system
        except psutil.Error:
            pass
    return out


def measure(server, path: str, body: bytes, content_type: str, conns: int, seconds: float) -> dict:
    """One wrk run with CPU accounting: req/s, latency and CPU microseconds per request per process group."""
    token = server.keys().get("inference")
    frontend, workers = psutil.Process(server.pid()), worker_processes(server)
    before = cpu_seconds([frontend, *workers])
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    metrics_before = {**scrape_metrics(server), **stage_sums(server)}
    result = run_wrk(server.inference_url + path, body, content_type, conns, seconds, token, timeout_s=30)
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = cpu_seconds([frontend, *workers])
    metrics_after = {**scrape_metrics(server), **stage_sums(server)}
    done = max(1, result["requests"])
    per_req = lambda pids: sum(after.get(p, 0) - before.get(p, 0) for p in pids) / done * 1e6  # noqa: E731
    delta = {k: metrics_after[k] - metrics_before.get(k, 0.0) for k in metrics_after}
    result.pop("raw", None)
    result.update(
        connections=conns,
        cpu_us_frontend=per_req([frontend.pid]),
        cpu_us_workers=per_req([w.pid for w in workers]),
        cpu_us_wrk=((wrk_after.ru_utime + wrk_after.ru_stime) - (wrk_before.ru_utime + wrk_before.ru_stime)) / done * 1e6,
        frontend_queue_us=delta.get("ts_queue_latency_microseconds", 0.0) / done,
        frontend_inference_us=delta.get("ts_inference_latency_microseconds", 0.0) / done,
        handler_stage_us={stage: delta.get(f"stage:{stage}", 0.0) / done * 1e6 for stage in ("decode", "forward", "encode")},
    )
    return result


def stage_sums(server) -> dict[str, float]:
    """``{"stage:<stage>": seconds}`` from the handler's ``model_stage_duration_seconds_sum`` series (empty for stock)."""
    import re

    import requests

    try:
        text = requests.get(server.metrics_url, timeout=10).text
    except requests.RequestException:
        return {}
    out: dict[str, float] = {}
    for match in re.finditer(r'^model_stage_duration_seconds_sum\{[^}]*stage="(\w+)"[^}]*\}\s+(\S+)$', text, re.M):
        out[f"stage:{match.group(1)}"] = out.get(f"stage:{match.group(1)}", 0.0) + float(match.group(2))
    return out


def spy(server, path: str, body: bytes, content_type: str, seconds: float, conns: int) -> dict:
    """py-spy one busy worker for ``seconds`` under ``conns`` connections (its busy samples only: py-spy skips a
    thread blocked in ``recv``); % of them per :data:`STAGES` entry and the top functions (inclusive %)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    token = server.keys().get("inference")
    load = threading.Thread(target=run_wrk, args=(server.inference_url + path, body, content_type, conns,
                                                  seconds + 4, token), kwargs={"timeout_s": 30}, daemon=True)
    load.start()
    time.sleep(1.5)
    workers = worker_processes(server)
    for worker in workers:
        worker.cpu_percent(interval=None)
    time.sleep(0.5)
    busiest = max(workers, key=lambda w: w.cpu_percent(interval=None))
    with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as handle:
        raw_path = handle.name
    try:
        subprocess.run([pyspy, "record", "-p", str(busiest.pid), "-d", f"{seconds:g}", "-r", "500", "-f", "raw",
                        "-o", raw_path, "--nonblocking"], capture_output=True, timeout=seconds + 60)
        load.join()
        return summarise_spy(Path(raw_path).read_text())
    finally:
        os.unlink(raw_path)


def _frame_key(frame: str) -> str:
    """``func (path/file.py:line)`` → ``path/file.py:func`` for matching."""
    func, _, where = frame.partition(" (")
    return f"{where.rsplit(':', 1)[0]}:{func}" if where else func


def summarise_spy(raw: str) -> dict:
    """Stage shares (exclusive: each sample counted once, by its innermost matching frame) and top functions."""
    stages: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, count = line.rsplit(" ", 1)
        count = int(count)
        total += count
        frames = [_frame_key(f) for f in stack.split(";")]
        for name in set(frames):
            inclusive[name.rsplit("/", 1)[-1]] += count
        stage = "other"
        for frame in reversed(frames):
            match = next((s for s, needles in STAGES if any(n in frame for n in needles)), None)
            if match:
                stage = match
                break
        stages[stage] += count
    share = lambda n: round(100.0 * n / max(total, 1), 1)  # noqa: E731
    return {"samples": total, "stages": {k: share(v) for k, v in stages.most_common()},
            "top": [(share(v), k) for k, v in inclusive.most_common(25)]}


def variant_config(overrides: dict[str, str], dest: Path) -> Path:
    """The repository's config.properties with ``overrides`` applied (value ``-`` removes a key)."""
    props = load_properties(DEFAULT_CONFIG)
    for key, value in overrides.items():
        if value == "-":
            props.pop(key, None)
        else:
            props[key] = value
    write_properties(props, dest, f"profile variant of {DEFAULT_CONFIG}")
    return dest


def plot_breakdown(report: dict, path: Path) -> Path:
    """Stacked bars: CPU µs per request (frontend, worker split by py-spy stage, wrk) per form and connections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if r.get("spy")]
    labels = [f"{r['form']}\n{r['connections']} conn" for r in runs]
    names = ["frontend (java)"] + [s for s, _ in STAGES] + ["other", "wrk"]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    bottoms = [0.0] * len(runs)
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        values = []
        for r in runs:
            if name == "frontend (java)":
                values.append(r["cpu_us_frontend"])
            elif name == "wrk":
                values.append(r["cpu_us_wrk"])
            else:
                values.append(r["cpu_us_workers"] * r["spy"]["stages"].get(name, 0.0) / 100.0)
        ax.bar(labels, values, bottom=bottoms, label=name, color=colors[i % len(colors)])
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for x, (r, top) in enumerate(zip(runs, bottoms)):
        ax.annotate(f"{r['req_per_s']:,.0f} req/s", (x, top), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("CPU µs per request")
    ax.set_title(f"{report['server']}: where a request's CPU time goes (worker split by py-spy samples)", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{what} takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stock", action="store_true", help="profile the tuned stock TorchServe (bench/baseline/)")
    parser.add_argument("--workers", type=int, help="mnistnet workers (default: the registry's)")
    parser.add_argument("--batch-size", type=int, help="mnistnet batchSize (default: the registry's)")
    parser.add_argument("--max-batch-delay", type=int, help="mnistnet maxBatchDelay ms (default: the registry's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config.properties override (repeatable; VALUE '-' removes the key)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="server environment")
    parser.add_argument("--forms", default="json,png", help="json, png (ours only) (default json,png)")
    parser.add_argument("--connections", default="1,16", help="default 1,16")
    parser.add_argument("--seconds", type=float, default=8.0, help="wrk seconds per point (default 8)")
    parser.add_argument("--warmup", type=float, default=WARMUP_S,
                        help=f"seconds of load before the first point (default {WARMUP_S:g}: TorchServe's JIT settling)")
    parser.add_argument("--spy", type=float, default=6.0, help="py-spy seconds per point (0: none; default 6)")
    parser.add_argument("--out", type=Path, default=BENCH_RESULTS_DIR / "profile.json",
                        help="JSON report; the PNG goes beside it (default bench/results/profile.json)")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)

    spec = get_spec(MODEL)
    overrides = {k: v for k, v in (("minWorkers", args.workers), ("maxWorkers", args.workers),
                                   ("batchSize", args.batch_size), ("maxBatchDelay", args.max_batch_delay))
                 if v is not None}
    props, env = pairs(args.set, "--set"), pairs(args.env, "--env")
    connections = [int(c) for c in args.connections.split(",")]
    forms = {"json": payloads.json_images(1), "png": payloads.png_image()}
    chosen = [f.strip() for f in args.forms.split(",") if f.strip()]
    if set(chosen) - set(forms) or (args.stock and chosen != ["json"] and "png" in chosen):
        parser.error("--forms takes json and png (png: ours only)")
    weights = ensure_weights(spec, args.weights_dir.resolve())
    report = {"server": "tuned stock TorchServe" if args.stock else "ours", "model_config": overrides, "warmup_s": args.warmup,
              "properties": props, "env": env, "loadavg_start": os.getloadavg(), "runs": []}
    with private_dirs("profile") as root:
        store = root / "store"
        if args.stock:
            from bench.serving import BASELINE_HANDLER, BASELINE_NAME, STOCK_TUNED_CONFIG

            build_archive(spec, weights, store, name=BASELINE_NAME, handler=BASELINE_HANDLER,
                          config={**STOCK_TUNED_CONFIG, **overrides})
            server = baseline_server(root, store, env={"OMP_NUM_THREADS": "1", **env}, settings=STOCK_FAST_SETTINGS)
            path = f"/predictions/{BASELINE_NAME}"
        else:
            build_archive(spec, weights, store, config={**model_config(spec), **overrides})
            config = variant_config(props, root / "config.properties")
            server, path = ours_server(root, store, [MODEL], config, env), f"/predictions/{MODEL}"
        warmup = args.warmup
        with running(server) as (server, cold_start):
            print(f"{report['server']}: ready in {cold_start:.1f} s; 1-min load {os.getloadavg()[0]:.2f}", flush=True)
            print(f"{'form':<6}{'conns':>6}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}  CPU us/request: {'java':>5}"
                  f"{'workers':>8}{'wrk':>5}   frontend us/req: queue inference   handler us/req: decode forward encode")
            for form in chosen:
                body, content_type = forms[form]
                warm_up(server.inference_url + path, body, content_type, warmup, server.keys().get("inference"))
                warmup = 3.0
                for conns in connections:
                    r = measure(server, path, body, content_type, conns, args.seconds)
                    r["form"] = form
                    if args.spy > 0:
                        r["spy"] = spy(server, path, body, content_type, args.spy, conns)
                    report["runs"].append(r)
                    h = r["handler_stage_us"]
                    print(f"{form:<6}{conns:>6}{r['req_per_s']:>8.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}"
                          f"{r['cpu_us_frontend']:>22.0f}{r['cpu_us_workers']:>8.0f}{r['cpu_us_wrk']:>5.0f}"
                          f"{r['frontend_queue_us']:>24.0f}{r['frontend_inference_us']:>10.0f}"
                          f"{h['decode']:>24.0f}{h['forward']:>8.0f}{h['encode']:>7.0f}", flush=True)
                    if r.get("spy"):
                        print("        worker samples by stage (%): " + ", ".join(
                            f"{k} {v}" for k, v in r["spy"]["stages"].items()), flush=True)
    report["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if any(r.get("spy") for r in report["runs"]):
        print(f"wrote {plot_breakdown(report, args.out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
