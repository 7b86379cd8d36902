"""Tuning experiments: run the project's deployment with one variant of its settings and measure it.

    .venv/bin/python -m bench.tuning.tune --name current
    .venv/bin/python -m bench.tuning.tune --name 2workers --workers 2
    .venv/bin/python -m bench.tuning.tune --name delay1 --max-batch-delay 1 --set number_of_netty_threads=1
    .venv/bin/python -m bench.tuning.tune --name quiet --variant-handler --env TUNE_QUIET_WORKER_LOGS=1 --spy 10

Per variant it builds a mnistnet archive (serve/package.py's staging and model-config, with the
overrides), starts it with the repository's config.properties plus ``--set`` overrides on free ports in
a private TMPDIR, and for every request form and connection count runs wrk while reading the CPU time
that the frontend (java), the workers and wrk itself spend per request. CPU per request is the number to
compare on a busy machine: wall-clock req/s moves with whatever else runs, CPU time much less.
``--spy S`` also records the mnistnet worker with py-spy for S seconds under load and prints where its
time goes. Results go to ``bench/results/tuning/<name>.json``.
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
import yaml

from bench import payloads
from bench.loadgen import run_wrk
from bench.servers import ours_server, private_dirs, running, scrape_metrics
from models.registry import get_spec
from serve.package import archiver_command, ensure_weights, model_config, stage_packages
from serve.server import DEFAULT_CONFIG, load_properties, write_properties

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "bench" / "results" / "tuning"
VARIANT_HANDLER = Path(__file__).resolve().parent / "variant_handler.py"
MODEL = "mnistnet"
BATCH = 256


def forms() -> dict[str, tuple[str, bytes, str, int]]:
    """name → (path, body, content type, images per request)."""
    native, v2 = f"/predictions/{MODEL}", f"/v2/models/{MODEL}/infer"
    return {
        "json": (native, *payloads.json_images(1), 1),
        "png": (native, *payloads.png_image(), 1),
        "v2-uint8": (v2, *payloads.v2_images(1, datatype="UINT8"), 1),
        "b256-json": (native, *payloads.json_images(BATCH, flat=True), BATCH),
        "b256-v2-uint8": (v2, *payloads.v2_images(BATCH, datatype="UINT8"), BATCH),
        # raw pixel bytes: only bench/tuning/variant_handler.py with TUNE_RAW_UINT8=1 accepts these
        "raw": (native, payloads.digits(1).tobytes(), "application/octet-stream", 1),
        "b256-raw": (native, payloads.digits(BATCH).tobytes(), "application/octet-stream", BATCH),
    }


def build_variant_archive(weights: Path, store: Path, overrides: dict, handler: Path | None) -> Path:
    """``<store>/mnistnet.mar`` built like serve/package.py does, with model-config ``overrides`` and
    optionally another handler file."""
    spec = get_spec(MODEL)
    with tempfile.TemporaryDirectory(prefix="tune-archive-") as tmp:
        tmp = Path(tmp)
        staging = tmp / "extra"
        stage_packages(staging)
        config = {**model_config(spec), **overrides}
        config_file = tmp / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        store.mkdir(parents=True, exist_ok=True)
        cmd = archiver_command(spec, weights, staging, config_file, store)
        if handler is not None:
            cmd[cmd.index("--handler") + 1] = str(handler)
        (tmp / "archiver").mkdir()
        result = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "TMPDIR": str(tmp / "archiver")},
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed:\n{result.stdout}{result.stderr}")
    return store / f"{MODEL}.mar"


def variant_config(base: Path, overrides: dict[str, str], dest: Path) -> Path:
    """A copy of ``base`` config.properties with ``overrides`` applied (value ``-`` removes a key)."""
    props = load_properties(base)
    for key, value in overrides.items():
        if value == "-":
            props.pop(key, None)
        else:
            props[key] = value
    write_properties(props, dest, f"tuning variant of {base}")
    return dest


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


def server_processes(server) -> tuple[psutil.Process, list[psutil.Process]]:
    """The frontend and its worker processes."""
    frontend = psutil.Process(server.pid())
    return frontend, frontend.children(recursive=True)


def measure(server, name: str, path: str, body: bytes, content_type: str, images: int, conns: int,
            seconds: float) -> dict:
    """One wrk run with CPU accounting: req/s, latency and CPU microseconds per request per process group."""
    token = server.keys().get("inference")
    frontend, workers = server_processes(server)
    before = cpu_seconds([frontend, *workers])
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_wrk(server.inference_url + path, body, content_type, conns, seconds, token, timeout_s=30)
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = cpu_seconds([frontend, *workers])
    requests_done = max(1, result["requests"])
    per_req = lambda pids: sum(after.get(p, 0) - before.get(p, 0) for p in pids) / requests_done * 1e6  # noqa: E731
    result.pop("raw", None)
    result.update(
        form=name, connections=conns, images_per_request=images, samples_per_s=result["req_per_s"] * images,
        cpu_us_frontend=per_req([frontend.pid]),
        cpu_us_workers=per_req([w.pid for w in workers]),
        cpu_us_wrk=((wrk_after.ru_utime + wrk_after.ru_stime) - (wrk_before.ru_utime + wrk_before.ru_stime))
        / requests_done * 1e6,
    )
    return result


def spy(server, path: str, body: bytes, content_type: str, seconds: float, conns: int = 16,
        top: int = 30) -> list[tuple[float, str]]:
    """py-spy the busiest worker for ``seconds`` under ``conns`` connections; inclusive % per function."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    token = server.keys().get("inference")
    load = threading.Thread(target=run_wrk, args=(server.inference_url + path, body, content_type, conns,
                                                  seconds + 4, token), kwargs={"timeout_s": 30}, daemon=True)
    load.start()
    time.sleep(1.5)
    _, workers = server_processes(server)
    busiest = max(workers, key=lambda w: w.cpu_percent(interval=0.5))
    with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as handle:
        raw_path = handle.name
    try:
        subprocess.run([pyspy, "record", "-p", str(busiest.pid), "-d", f"{seconds:g}", "-r", "250",
                        "-f", "raw", "-o", raw_path, "--nonblocking"], capture_output=True, timeout=seconds + 60)
        load.join()
        return summarise_spy(Path(raw_path), top)
    finally:
        os.unlink(raw_path)


def summarise_spy(raw: Path, top: int) -> list[tuple[float, str]]:
    """Inclusive share of samples per function from py-spy's raw (collapsed stacks) output."""
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        total += int(count)
        names = set()
        for frame in stack.split(";"):
            func, _, where = frame.partition(" (")
            names.add(f"{func} ({where.split(':')[0].split('/')[-1]})" if where else func)
        for name in names:
            inclusive[name] += int(count)
    return [(100.0 * n / max(total, 1), name) for name, n in inclusive.most_common(top)]


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{what} takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        pairs[key] = value
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tuning.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="variant name (results file bench/results/tuning/NAME.json)")
    parser.add_argument("--workers", type=int, help="mnistnet workers (default: serve/package.py's)")
    parser.add_argument("--batch-size", type=int, help="mnistnet batchSize (default: the registry's)")
    parser.add_argument("--max-batch-delay", type=int, help="mnistnet maxBatchDelay ms (default: the registry's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config.properties override (repeatable; VALUE '-' removes the key)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="server environment")
    parser.add_argument("--variant-handler", action="store_true",
                        help="serve bench/tuning/variant_handler.py (switches via TUNE_* --env)")
    parser.add_argument("--forms", default="json,png,v2-uint8,b256-json,b256-v2-uint8")
    parser.add_argument("--connections", default="1,16", help="for single-image forms (default 1,16)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--spy", type=float, default=0.0, help="py-spy the worker for this many seconds")
    parser.add_argument("--spy-form", default="json", help="request form to profile (default json; 16 "
                        "connections for single images, 2 for 256-image forms)")
    parser.add_argument("--top", type=int, default=30, help="functions to list from the profile (default 30)")
    parser.add_argument("--weights-dir", type=Path, default=REPO_ROOT / "weights")
    args = parser.parse_args(argv)

    overrides = {k: v for k, v in (("minWorkers", args.workers), ("maxWorkers", args.workers),
                                   ("batchSize", args.batch_size), ("maxBatchDelay", args.max_batch_delay))
                 if v is not None}
    props, env = parse_pairs(args.set, "--set"), parse_pairs(args.env, "--env")
    all_forms = forms()
    chosen = [f.strip() for f in args.forms.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in all_forms]
    if unknown:
        parser.error(f"unknown form(s) {unknown}; known: {', '.join(all_forms)}")
    connections = [int(c) for c in args.connections.split(",")]
    weights = ensure_weights(get_spec(MODEL), args.weights_dir.resolve())
    report = {"name": args.name, "model_config": overrides, "properties": props, "env": env,
              "variant_handler": args.variant_handler, "loadavg_start": os.getloadavg(), "runs": []}
    with private_dirs(f"tune-{args.name}") as root:
        store = root / "store"
        build_variant_archive(weights, store, overrides, VARIANT_HANDLER if args.variant_handler else None)
        config = variant_config(DEFAULT_CONFIG, props, root / "config.properties")
        with running(ours_server(root, store, [MODEL], config, env)) as (server, cold_start):
            report["cold_start_s"] = cold_start
            print(f"{args.name}: ready in {cold_start:.1f} s; load {os.getloadavg()[0]:.2f}", flush=True)
            print(f"{'form':<15}{'conns':>6}{'req/s':>9}{'samples/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
                  f"{'err':>5}{'cpu us/req: java':>18}{'workers':>9}{'wrk':>7}")
            for name in chosen:
                path, body, content_type, images = all_forms[name]
                run_wrk(server.inference_url + path, body, content_type, 16 if images == 1 else 1, 2,
                        server.keys().get("inference"), timeout_s=30)  # warm-up
                for conns in (connections if images == 1 else [1]):
                    r = measure(server, name, path, body, content_type, images, conns, args.seconds)
                    report["runs"].append(r)
                    print(f"{name:<15}{conns:>6}{r['req_per_s']:>9.0f}{r['samples_per_s']:>11.0f}{r['p50_ms']:>9.2f}"
                          f"{r['p99_ms']:>9.2f}{r['errors']:>5}{r['cpu_us_frontend']:>18.0f}"
                          f"{r['cpu_us_workers']:>9.0f}{r['cpu_us_wrk']:>7.0f}", flush=True)
            report["metrics"] = scrape_metrics(server)
            if args.spy > 0:
                path, body, content_type, images = all_forms[args.spy_form]
                conns = 16 if images == 1 else 2
                report["spy"] = {"form": args.spy_form, "connections": conns,
                                 "functions": spy(server, path, body, content_type, args.spy, conns, args.top)}
                print(f"py-spy, busiest worker under {conns} connections of {args.spy_form} (inclusive %):")
                for share, func in report["spy"]["functions"]:
                    print(f"  {share:5.1f}%  {func}")
    report["loadavg_end"] = os.getloadavg()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"{args.name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
