"""Serving benchmark: the project's TorchServe deployment vs tuned stock TorchServe vs LitServe vs the model alone.

Run from the repository root (loopback only; about 7 minutes with the defaults)::

    .venv/bin/python -m bench.serving                    # full run, writes bench/results/
    .venv/bin/python -m bench.serving --wait-quiet 600   # first wait (<= 600 s) for 1-min load < 0.5
    .venv/bin/python -m bench.serving --connections 1,16 --seconds 8 --cold-starts 0   # the goals only, ~3 min

One run measures, one server at a time (never two at once: the machine has 2 cores):

1. **limit**: MNISTNet's in-process forward pass at batch 1 and 256 (samples/s, bench/inprocess.py);
2. **stock**: stock TorchServe tuned as its docs advise (bench/baseline/ handler on BaseHandler, batch 8 /
   2 ms, 2 workers, one thread per worker) with its fastest settings (Prometheus metrics mode, token auth
   off); ``--baselines stock-default`` adds it untuned (batch 1, TorchServe's defaults);
3. **litserve**: LitServe (bench/litserve_server.py: batch 8 / 2 ms, 2 workers, one thread each);
   **triton**: Triton 2.51 through PyTriton (bench/triton_server.py, its own venv build/triton-venv, created
   on first use; dynamic batching 8 / 2 ms, 2 instances, one thread each), Open Inference Protocol bodies;
4. **ours**: the repository's config.properties + serve/log4j2.xml + handlers, as ``make serve`` runs
   it (every registered model loaded unless ``--models``), cold start timed from the start command to
   all workers READY.

Every server gets the same weights and the same JSON body for the headline form (one MNIST test digit,
``[28][28]`` intensities in [0, 1]); ours also gets a PNG and Open Inference Protocol bodies. wrk
(bench/lua/post.lua, 1 wrk thread, closed loop) sends one single-image body per connection count
(req/s, p50/p90/p99), then one request carrying 256 images at 1 connection (samples/s). wrk runs on the
same cores as the server, so every served number is a lower bound. Results: a table and the goals with
their ratios on stdout, ``bench/results/serving.json`` and ``bench/results/latency_vs_concurrency.png``
(``--tag T`` writes ``serving-T.json`` / ``latency_vs_concurrency-T.png`` instead).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
import torch
from tqdm import tqdm

from bench import payloads
from bench.inprocess import load_model, measure_forward
from bench.loadgen import run_wrk, wrk_path
from bench.plot import plot_concurrency
from bench.servers import (
    STOCK_FAST_SETTINGS, LitServeServer, baseline_server, ours_server, private_dirs, running, scrape_metrics,
)
from client.api import parse_binary_v2_response
from paths import BENCH_RESULTS_DIR, REPO_ROOT, WEIGHTS_DIR
from serve.server import DEFAULT_CONFIG, load_properties, write_properties

RESULTS_DIR = BENCH_RESULTS_DIR
MODEL = "mnistnet"
BASELINE_NAME = "mnist_baseline"
BASELINE_HANDLER = REPO_ROOT / "bench" / "baseline" / "handler.py"
# Stock TorchServe tuned as its docs advise for a small CPU model: dynamic batching, one worker per core,
# one intra-op thread per worker (OMP_NUM_THREADS=1). "stock-default" is the archive without a model-config.
STOCK_TUNED_CONFIG = {"minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 2, "responseTimeout": 120}
BASELINES = ("stock", "stock-default", "litserve", "triton")
CONNECTIONS = (1, 4, 16, 64)
GOAL_CONNECTIONS = 16
WARMUP_S = 20.0  # load before the first measurement of each server (measure_server)
BATCH = 256
QUIET_LOAD = 0.5

# Goals (issue 16 first): description and target of each; evaluate_goals() computes the values.
GOALS = {
    "vs_stock": "ours JSON req/s at 16 connections >= 1.5x tuned stock TorchServe",
    "vs_litserve": "ours JSON req/s at 16 connections >= 1.5x LitServe",
    "p50_litserve": "ours JSON p50 at 1 connection <= LitServe's (ratio ours/LitServe)",
    "p50_stock": "ours JSON p50 at 1 connection < tuned stock's (ratio ours/stock)",
    "png_vs_stock": "ours PNG req/s at 16 connections >= 1.5x tuned stock's JSON",
    "tail": "ours JSON p99 <= 3x p50 at 16 connections",
    "batch": "one 256-image request >= 25% of in-process samples/s at batch 256",
    "cold_start": "ours cold start (start command -> all workers READY) <= 5 s",
}


# ------------------------------------------------------------------------------------------- machine

def machine_info() -> dict:
    """nproc, CPU model, memory, load and tool versions of this machine."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    wrk = shutil.which("wrk")  # the sweep (bench/sweep.py) runs without it
    wrk_version = subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout.split("\n")[0] if wrk else "-"
    import ts

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchserve": ts.__version__,
        "wrk": wrk_version.strip(),
        "loadavg_start": list(os.getloadavg()),
    }


def wait_until_quiet(max_wait: float, threshold: float = QUIET_LOAD) -> float:
    """Wait up to ``max_wait`` seconds for the 1-minute load average to drop below ``threshold``.

    Returns the load seen last; prints progress every 30 s. ``max_wait`` 0 only reads the load.
    """
    deadline = time.monotonic() + max_wait
    load = os.getloadavg()[0]
    while load >= threshold and time.monotonic() < deadline:
        print(f"  waiting for a quiet machine: 1-min load {load:.2f} >= {threshold}", flush=True)
        time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))
        load = os.getloadavg()[0]
    return load


# -------------------------------------------------------------------------------------------- limit

def measure_limit(weights: Path) -> dict:
    """In-process samples/s at batch 1 and 256, with PyTorch's default threads and with 1 thread."""
    model = load_model(str(weights))
    results = {}
    for batch in (1, BATCH):
        results[f"batch{batch}"] = measure_forward(model, batch)
        results[f"batch{batch}_1thread"] = measure_forward(model, batch, threads=1)
    return results


# ------------------------------------------------------------------------------------------ serving

def check_response(url: str, token: str | None, body: bytes, content_type: str, count: int,
                   extra_headers: dict | None = None) -> dict:
    """POST once and check the answer: 200 and ``predicted_class`` for each of ``count`` images.

    Returns ``{"status", "response_bytes", "predicted_class"}`` (the first image's class); raises RuntimeError
    naming the problem otherwise, so a broken server is never benchmarked.
    """
    headers = {"Content-Type": content_type, **(extra_headers or {})}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = requests.post(url, data=body, headers=headers, timeout=60)
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:300]}")
    answer = parse_binary_v2_response(response.content, response.headers.get("Inference-Header-Content-Length"))
    if "outputs" in answer:  # Open Inference Protocol response
        outputs = {o["name"]: o["data"] for o in answer["outputs"]}
        classes = list(np.asarray(outputs.get("predicted_class", [])).reshape(-1))  # Triton's are [N, 1]
    else:
        items = answer if isinstance(answer, list) else [answer]
        classes = [item.get("predicted_class") for item in items if isinstance(item, dict)]
    if len(classes) != count or any(c is None for c in classes):
        raise RuntimeError(f"{url}: expected {count} predicted_class values, got: {response.text[:300]}")
    return {"status": response.status_code, "response_bytes": len(response.content), "predicted_class": int(classes[0])}


def sweep(url: str, token: str | None, body: bytes, content_type: str, connections, seconds: float,
          label: str, headers: dict | None = None) -> dict[str, dict]:
    """wrk at every connection count; returns ``{str(connections): result}`` (bench/loadgen.py fields)."""
    results = {}
    for conns in tqdm(connections, desc=f"  {label}", unit="run", leave=False, file=sys.stdout):
        result = run_wrk(url, body, content_type, conns, seconds, token, headers=headers)
        result.pop("raw", None)
        results[str(conns)] = result
        time.sleep(1.0)  # let the queues drain between runs
    return results


def warm_up(url: str, body: bytes, content_type: str, seconds: float, token: str | None,
            headers: dict | None = None) -> None:
    """``seconds`` of load at 16 connections, in wrk runs of at most 5 s: the JIT also compiles the paths that
    close and open connections (one long run leaves them cold: at its end JFR showed 65 deoptimizations of
    Netty methods, and the next run's tail doubled)."""
    runs = max(1, math.ceil(seconds / 5.0))
    for _ in range(runs):
        run_wrk(url, body, content_type, GOAL_CONNECTIONS, max(seconds / runs, 1.0), token, headers=headers)


def measure_server(server, cold_start: float, forms: dict, batch_forms: dict, connections, seconds: float,
                   label: str, warmup: float = WARMUP_S) -> dict:
    """Check, warm up and measure one running server.

    ``forms``/``batch_forms`` map a form name to ``(path, body, content type[, extra headers])``; single-image
    forms are swept over ``connections``, batch forms run at 1 connection. The first form runs ``warmup``
    seconds at 16 connections before anything is measured (:func:`warm_up`; 3 s for each later form):
    TorchServe's JVM compiles its hot paths for ~20 s under load, and until then the compiler threads take
    a tenth of the CPU and add to the tail. Returns the server's results dict.
    """
    token = server.keys().get("inference")
    description = server.describe(server.models[0])
    out = {
        "cold_start_s": cold_start,
        "model": {k: description.get(k) for k in ("modelName", "minWorkers", "batchSize", "maxBatchDelay")},
        "workers": len(description.get("workers", [])),
        "single": {},
        "batch": {},
        "bodies": {},
    }
    for name, (path, body, content_type, *extra) in forms.items():
        url, headers = server.inference_url + path, (extra or [None])[0]
        out["bodies"][name] = {"bytes": len(body), "content_type": content_type,
                               **check_response(url, token, body, content_type, 1, headers)}
        warm_up(url, body, content_type, warmup, token, headers)
        warmup = 3.0
        out["single"][name] = sweep(url, token, body, content_type, connections, seconds, f"{label} {name}", headers)
    for name, (path, body, content_type, *extra) in batch_forms.items():
        url, headers = server.inference_url + path, (extra or [None])[0]
        out["bodies"][f"batch-{name}"] = {"bytes": len(body), "content_type": content_type,
                                          **check_response(url, token, body, content_type, BATCH, headers)}
        result = run_wrk(url, body, content_type, 1, seconds, token, timeout_s=30, headers=headers)
        result.pop("raw", None)
        result["samples_per_s"] = result["req_per_s"] * BATCH
        out["batch"][name] = result
    out["ts_metrics"] = scrape_metrics(server, prefix="ts_")
    return out


def baseline_forms(batch: bool = True) -> tuple[dict, dict]:
    """A baseline's inputs: the project's JSON form, at ``/predictions/mnist_baseline`` (stock) or ``/predict``."""
    path = f"/predictions/{BASELINE_NAME}" if batch else "/predict"
    return (
        {"json": (path, *payloads.json_images(1))},
        {"json": (path, *payloads.json_images(BATCH, flat=True))} if batch else {},
    )


def ours_forms(names: list[str]) -> tuple[dict, dict]:
    """The project's inputs among ``names``: JSON intensities (the baselines' body), a PNG file, Open Inference
    Protocol bodies as JSON (UINT8 pixels) and binary tensors (FP32 intensities, UINT8 pixels: tritonclient's default)."""
    native, v2 = f"/predictions/{MODEL}", f"/v2/models/{MODEL}/infer"
    single = {
        "json": lambda: (native, *payloads.json_images(1)),
        "png": lambda: (native, *payloads.png_image()),
        "v2-uint8": lambda: (v2, *payloads.v2_images(1, datatype="UINT8")),
        "v2-bin-fp32": lambda: (v2, *payloads.v2_binary_images(1)),
    }
    batch = {
        "json": lambda: (native, *payloads.json_images(BATCH, flat=True)),
        "v2-bin-fp32": lambda: (v2, *payloads.v2_binary_images(BATCH)),
        "v2-bin-uint8": lambda: (v2, *payloads.v2_binary_images(BATCH, datatype="UINT8")),
    }
    return ({n: f() for n, f in single.items() if n in names},
            {n: f() for n, f in batch.items() if n in names or (n == "v2-bin-uint8" and "v2-bin-fp32" in names)})


FORMS = ("json", "png", "v2-uint8", "v2-bin-fp32")


def peer_settings(name: str, config: Path = DEFAULT_CONFIG) -> str:
    """How the side ``name`` is configured, in one line (printed before it runs and kept in the results)."""
    import ts

    if name == "limit":
        return "model(x) under inference_mode in this process, PyTorch's default threads and 1 thread"
    if name == "stock":
        batching = ", ".join(f"{k} {v}" for k, v in STOCK_TUNED_CONFIG.items() if k != "responseTimeout")
        return (f"TorchServe {ts.__version__}, bench/baseline handler, model-config {batching}, OMP_NUM_THREADS=1, "
                + ", ".join(f"{k}={v}" for k, v in STOCK_FAST_SETTINGS.items()) + ", TorchServe's log4j2.xml")
    if name == "stock-default":
        return (f"TorchServe {ts.__version__}, bench/baseline handler, no model-config (batch 1), TorchServe's "
                "defaults (metrics_mode=log, token auth on, workers = cores, no thread settings)")
    if name == "litserve":
        return "LitServe 0.2.19, batch 8 / 2 ms, 2 inference workers, 1 thread each, 1 API server, no auth"
    if name == "triton":
        from bench.triton_server import DESCRIPTION

        return DESCRIPTION
    props = load_properties(config)
    return (f"{config.name}: metrics_mode={props.get('metrics_mode', 'log')}, token auth "
            f"{'off' if props.get('disable_token_authorization') == 'true' else 'on'}, "
            f"netty threads {props.get('number_of_netty_threads', 'default')}; mnistnet archive from "
            "serve/package.py (batch 8 / 1 ms, 2 workers), fork server, OMP_NUM_THREADS=1")


def triton_forms() -> tuple[dict, dict]:
    """Triton's inputs: the Open Inference Protocol bodies ours also takes (JSON FP32, binary FP32)."""
    v2 = f"/v2/models/{MODEL}/infer"
    return ({"v2-fp32": (v2, *payloads.v2_images(1, name="input")),
             "v2-bin-fp32": (v2, *payloads.v2_binary_images(1, name="input"))},
            {"v2-bin-fp32": (v2, *payloads.v2_binary_images(BATCH, name="input"))})


def run_triton(weights: Path, connections, seconds: float, warmup: float = WARMUP_S) -> dict:
    """Create the Triton venv if needed (failing with the reason), run bench/triton_server.py, measure, stop it."""
    from bench.triton_server import TritonServer, ensure_venv

    ensure_venv()
    with private_dirs("triton") as root:
        forms, batch_forms = triton_forms()
        with running(TritonServer(weights, root / "triton.log")) as (server, cold_start):
            print(f"  triton ready in {cold_start:.1f} s at {server.inference_url}", flush=True)
            return measure_server(server, cold_start, forms, batch_forms, connections, seconds, "triton", warmup)


def run_stock(weights: Path, connections, seconds: float, tuned: bool = True, warmup: float = WARMUP_S) -> dict:
    """Build the stock archive through serve/package.py (tuned model-config or none), run it, measure it, stop it."""
    from models.registry import get_spec
    from serve.package import build_archive

    label = "stock" if tuned else "stock-default"
    with private_dirs(label) as root:
        store = root / "store"
        build_archive(get_spec(MODEL), weights, store, name=BASELINE_NAME, handler=BASELINE_HANDLER,
                      config=STOCK_TUNED_CONFIG if tuned else {})
        forms, batch_forms = baseline_forms()
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if tuned else None
        settings = STOCK_FAST_SETTINGS if tuned else None
        with running(baseline_server(root, store, env=env, settings=settings)) as (server, cold_start):
            print(f"  {label} ready in {cold_start:.1f} s at {server.inference_url}", flush=True)
            return measure_server(server, cold_start, forms, batch_forms, connections, seconds, label, warmup)


def run_litserve(weights: Path, connections, seconds: float, warmup: float = WARMUP_S) -> dict:
    """Run bench/litserve_server.py with the same weights, measure its JSON form, stop it."""
    with private_dirs("litserve") as root:
        forms, batch_forms = baseline_forms(batch=False)
        with running(LitServeServer(weights, root / "litserve.log")) as (server, cold_start):
            print(f"  litserve ready in {cold_start:.1f} s at {server.inference_url}", flush=True)
            return measure_server(server, cold_start, forms, batch_forms, connections, seconds, "litserve", warmup)


def build_ours_archives(models: list[str], weights_dir: Path, store: Path) -> None:
    """Build the project's archives for ``models`` from ``weights_dir`` (training what is missing) into ``store``."""
    from serve.package import package_models

    package_models(models, weights_dir=weights_dir, store=store)


def metrics_off_config(base: Path, dest: Path) -> Path:
    """``base`` with TorchServe's own metrics YAML: the handlers then skip their model-quality metrics."""
    import ts

    props = load_properties(base)
    props["metrics_config"] = str(Path(ts.__file__).parent / "configs" / "metrics.yaml")
    write_properties(props, dest, f"{base} with TorchServe's default metrics YAML (model-quality metrics off)")
    return dest


def run_ours(models: list[str], weights_dir: Path, config: Path, env: dict, connections, seconds: float,
             cold_starts: int, form_names: list[str] = list(FORMS), model_metrics: bool = True,
             warmup: float = WARMUP_S) -> dict:
    """Build the archives, run the project's deployment, measure it, stop it; then time more cold starts."""
    with private_dirs("ours") as root:
        store = root / "store"
        build_ours_archives(models, weights_dir, store)
        if not model_metrics:
            config = metrics_off_config(config, root / "metrics-off.properties")
        forms, batch_forms = ours_forms(form_names)
        with running(ours_server(root, store, models, config, env)) as (server, cold_start):
            print(f"  ours ready in {cold_start:.1f} s at {server.inference_url} ({len(models)} models)", flush=True)
            results = measure_server(server, cold_start, forms, batch_forms, connections, seconds, "ours", warmup)
        starts = [cold_start]
        for _ in tqdm(range(cold_starts), desc="  ours cold starts", unit="start", leave=False, file=sys.stdout):
            with private_dirs("cold") as cold_root:
                with running(ours_server(cold_root, store, models, config, env)) as (_, seconds_to_ready):
                    starts.append(seconds_to_ready)
        results["cold_starts_s"] = starts
        results["cold_start_s"] = statistics.median(starts)
        results["models_loaded"] = models
        results["config"] = str(config)
        results["env"] = env
    return results


# ------------------------------------------------------------------------------------------ report

SERVERS = ("stock", "stock-default", "litserve", "triton", "ours")


def evaluate_goals(results: dict) -> list[dict]:
    """PASS/MISS for each goal that the run has the numbers for."""
    ours, stock, lit, limit = (results.get(k) for k in ("ours", "stock", "litserve", "limit"))
    goals = []
    c = str(GOAL_CONNECTIONS)

    def add(key, value, target, detail, passed):
        goals.append({"goal": GOALS[key], "value": value, "target": target, "detail": detail, "pass": passed})

    if not ours:
        return goals
    mine = ours["single"]["json"]
    for key, other, name in (("vs_stock", stock, "stock"), ("vs_litserve", lit, "LitServe")):
        if other:
            ratio = mine[c]["req_per_s"] / other["single"]["json"][c]["req_per_s"]
            add(key, ratio, 1.5, f"{mine[c]['req_per_s']:,.0f} vs {name} {other['single']['json'][c]['req_per_s']:,.0f} req/s",
                ratio >= 1.5)
    if "1" in mine:
        for key, other, name, strict in (("p50_litserve", lit, "LitServe", False), ("p50_stock", stock, "stock", True)):
            if other and "1" in other["single"]["json"]:
                theirs = other["single"]["json"]["1"]["p50_ms"]
                ratio = mine["1"]["p50_ms"] / theirs
                add(key, ratio, 1.0, f"{mine['1']['p50_ms']:.2f} vs {name} {theirs:.2f} ms",
                    ratio < 1.0 if strict else ratio <= 1.0)
    if stock and "png" in ours["single"]:
        ratio = ours["single"]["png"][c]["req_per_s"] / stock["single"]["json"][c]["req_per_s"]
        add("png_vs_stock", ratio, 1.5, f"{ours['single']['png'][c]['req_per_s']:,.0f} vs "
            f"{stock['single']['json'][c]['req_per_s']:,.0f} req/s", ratio >= 1.5)
    ratio = mine[c]["p99_ms"] / mine[c]["p50_ms"]
    add("tail", ratio, 3.0, f"p50 {mine[c]['p50_ms']:.2f} ms, p99 {mine[c]['p99_ms']:.2f} ms; other forms: "
        + ", ".join(f"{k} x{v[c]['p99_ms'] / v[c]['p50_ms']:.2f}" for k, v in ours["single"].items() if k != "json"),
        ratio <= 3.0)
    if limit and ours["batch"]:
        in_process = limit[f"batch{BATCH}"]["samples_per_s"]
        best_form, best = max(((k, v["samples_per_s"]) for k, v in ours["batch"].items()), key=lambda kv: kv[1])
        add("batch", best / in_process, 0.25, f"best form {best_form}: {best:,.0f} vs {in_process:,.0f} samples/s",
            best / in_process >= 0.25)
    add("cold_start", ours["cold_start_s"], 5.0, f"median of {len(ours['cold_starts_s'])} starts "
        f"({', '.join(f'{s:.1f}' for s in ours['cold_starts_s'])} s), {len(ours['models_loaded'])} models",
        ours["cold_start_s"] <= 5.0)
    return goals


def report_text(results: dict) -> str:
    """The human-readable tables: single-image sweep, 256-image requests, goals."""
    lines = ["How each side is configured:"]
    lines += [f"  {name:<14}{results[name]['configured']}" for name in ("limit", *SERVERS)
              if isinstance(results.get(name), dict) and "configured" in results[name]]
    lines.append("")
    ref = "stock" if "stock" in results else None
    ref_single = results[ref]["single"]["json"] if ref else {}
    lines.append("Single image: req/s and latency (ms) by wrk connections; x stock = req/s vs tuned stock TorchServe's "
                 "JSON at equal connections")
    lines.append(f"{'series':<24}{'body':>8}{'conns':>7}{'req/s':>10}{'p50':>9}{'p90':>9}{'p99':>9}{'errors':>8}"
                 f"{'x stock':>9}")
    for server in SERVERS:
        if server not in results:
            continue
        for form, runs in results[server]["single"].items():
            size = results[server]["bodies"][form]["bytes"]
            for conns, r in runs.items():
                ratio = r["req_per_s"] / ref_single[conns]["req_per_s"] if conns in ref_single else None
                lines.append(
                    f"{server + ' ' + form:<24}{size:>7}B{conns:>7}{r['req_per_s']:>10.0f}{r['p50_ms']:>9.2f}"
                    f"{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>8}"
                    + (f"{ratio:>9.2f}" if ratio is not None else f"{'':>9}")
                )
    limit = results.get("limit")
    if limit:
        lines.append("")
        lines.append(f"In-process forward (limit): batch 1 {limit['batch1']['samples_per_s']:,.0f} samples/s "
                     f"({limit['batch1_1thread']['samples_per_s']:,.0f} on 1 thread); batch {BATCH} "
                     f"{limit[f'batch{BATCH}']['samples_per_s']:,.0f} samples/s "
                     f"({limit[f'batch{BATCH}_1thread']['samples_per_s']:,.0f} on 1 thread)")
    lines.append("")
    lines.append(f"One request carrying {BATCH} images, 1 connection; x = samples/s vs in-process batch {BATCH}")
    lines.append(f"{'series':<24}{'body':>10}{'req/s':>9}{'samples/s':>12}{'p50':>9}{'p99':>9}{'x limit':>9}")
    for server in SERVERS:
        if server not in results:
            continue
        for form, r in results[server]["batch"].items():
            size = results[server]["bodies"][f"batch-{form}"]["bytes"]
            ratio = r["samples_per_s"] / limit[f"batch{BATCH}"]["samples_per_s"] if limit else float("nan")
            lines.append(f"{server + ' ' + form:<24}{size / 1e6:>8.2f}MB{r['req_per_s']:>9.1f}"
                         f"{r['samples_per_s']:>12,.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{ratio:>9.3f}")
    lines.append("")
    for server in SERVERS:
        if server in results:
            lines.append(f"{server} cold start: {results[server]['cold_start_s']:.1f} s"
                         + (f" (all starts: {', '.join(f'{s:.1f}' for s in results[server]['cold_starts_s'])})"
                            if "cold_starts_s" in results[server] else ""))
    lines.append("")
    lines.append("Goals:")
    for goal in results.get("goals", []):
        lines.append(f"  [{'PASS' if goal['pass'] else 'MISS'}] {goal['goal']}: {goal['value']:.2f} "
                     f"(target {goal['target']}) - {goal['detail']}")
    return "\n".join(lines)


def write_outputs(results: dict, out_dir: Path, tag: str | None, plot: bool) -> list[Path]:
    """serving[-tag].json and latency_vs_concurrency[-tag].png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"-{tag}" if tag else ""
    json_path = out_dir / f"serving{suffix}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    paths = [json_path]
    if plot:
        series = {f"{server} {form}": runs for server in SERVERS if server in results
                  for form, runs in results[server]["single"].items()}
        m = results["machine"]
        title = (f"MNISTNet on TorchServe {m['torchserve']}, {m['nproc']} cores ({m['cpu_model']}); "
                 f"wrk on the same cores, {results['settings']['seconds']:g} s per point")
        paths.append(plot_concurrency(series, out_dir / f"latency_vs_concurrency{suffix}.png", title))
    return paths


# -------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk duration per point (default 10)")
    parser.add_argument("--warmup", type=float, default=WARMUP_S,
                        help=f"seconds of load on each server before its first measurement (default {WARMUP_S:g}: "
                        "until TorchServe's JIT compiler settles)")
    parser.add_argument("--connections", default=",".join(map(str, CONNECTIONS)),
                        help="comma-separated wrk connection counts (default 1,4,16,64; must include 16)")
    parser.add_argument("--baselines", default="stock,litserve,triton",
                        help=f"comma-separated, of {', '.join(BASELINES)}, or 'none' (default stock,litserve,triton; "
                        "triton creates build/triton-venv first if needed, and the run fails if that fails)")
    parser.add_argument("--forms", default=",".join(FORMS),
                        help=f"ours' request forms, of {', '.join(FORMS)} (default all; json is always sent)")
    parser.add_argument("--model-metrics", choices=("on", "off"), default="on",
                        help="ours with its model-quality metrics (on, as served) or with TorchServe's default "
                        "metrics YAML (off): what they cost")
    parser.add_argument("--models", default="all",
                        help="models the 'ours' server loads, comma-separated or 'all' (default: all, as make serve)")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR,
                        help="trained state_dicts <name>.pt; missing ones are trained first (default weights/)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="config.properties for 'ours' (default: the repository's)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the 'ours' server (repeatable), e.g. HANDLER_NUM_THREADS=2")
    parser.add_argument("--cold-starts", type=int, default=2,
                        help="extra start/stop cycles of 'ours' to time cold start (default 2; median reported)")
    parser.add_argument("--skip-ours", action="store_true", help="do not run the project's deployment")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help=f"first wait up to this many seconds for 1-min load < {QUIET_LOAD} (default 0)")
    parser.add_argument("--tag", help="write serving-TAG.json / latency_vs_concurrency-TAG.png (tuning runs)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default bench/results)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--connections must be comma-separated integers, got {args.connections!r}")
    args.baselines = [b.strip() for b in args.baselines.split(",") if b.strip() and b.strip() != "none"]
    if set(args.baselines) - set(BASELINES):
        parser.error(f"--baselines takes {', '.join(BASELINES)} or none, got {sorted(set(args.baselines) - set(BASELINES))}")
    args.forms = ["json"] + [f.strip() for f in args.forms.split(",") if f.strip() and f.strip() != "json"]
    if set(args.forms) - set(FORMS):
        parser.error(f"--forms takes {', '.join(FORMS)}, got {sorted(set(args.forms) - set(FORMS))}")
    if GOAL_CONNECTIONS not in args.connections or min(args.connections) < 1:
        parser.error(f"--connections must be positive and include {GOAL_CONNECTIONS} (the goals are read there)")
    env = {}
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        env[key] = value
    args.env = env
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from serve.package import ensure_weights, parse_model_names
    from models.registry import get_spec

    models = parse_model_names(args.models)
    if MODEL not in models:
        print(f"error: --models must include {MODEL} (the benchmarked model)", file=sys.stderr)
        return 2
    if "triton" in args.baselines:  # before anything is measured: a failed setup stops the run, saying why
        from bench.triton_server import TritonSetupError, ensure_venv

        try:
            ensure_venv()
        except TritonSetupError as error:
            print(f"error: the Triton peer was asked for (--baselines) but {error}", file=sys.stderr)
            return 1
    wrk_path()  # fail early with the install hint
    load = wait_until_quiet(args.wait_quiet)
    machine = machine_info()
    if load >= QUIET_LOAD:
        print(f"warning: machine is busy (1-min load {load:.2f}); numbers will be noisy", flush=True)
    weights = ensure_weights(get_spec(MODEL), args.weights_dir.resolve())
    results = {
        "machine": machine,
        "settings": {"seconds": args.seconds, "warmup_s": args.warmup, "connections": args.connections, "wrk_threads": 1,
                     "batch_images": BATCH, "weights": str(weights)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    steps = 1 + len(args.baselines) + (not args.skip_ours)
    print(f"[1/{steps}] in-process limit: {peer_settings('limit')}", flush=True)
    results["limit"] = measure_limit(weights)
    results["limit"]["configured"] = peer_settings("limit")
    for step, name in enumerate(args.baselines, 2):
        print(f"[{step}/{steps}] {name}: {peer_settings(name)}", flush=True)
        if name == "litserve":
            results[name] = run_litserve(weights, args.connections, args.seconds, args.warmup)
        elif name == "triton":
            results[name] = run_triton(weights, args.connections, args.seconds, args.warmup)
        else:
            results[name] = run_stock(weights, args.connections, args.seconds, tuned=name == "stock", warmup=args.warmup)
        results[name]["configured"] = peer_settings(name)
    if not args.skip_ours:
        print(f"[{steps}/{steps}] ours: the project's deployment: {peer_settings('ours', args.config)}", flush=True)
        results["ours"] = run_ours(models, args.weights_dir.resolve(), args.config, args.env, args.connections,
                                   args.seconds, args.cold_starts, args.forms, args.model_metrics == "on",
                                   args.warmup)
        results["ours"]["configured"] = peer_settings("ours", args.config)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["goals"] = evaluate_goals(results)
    print()
    print(report_text(results))
    for path in write_outputs(results, args.out, args.tag, not args.no_plot):
        print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
