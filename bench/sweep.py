"""Size sweep: how one request's cost grows with the images it carries, for ours, Triton and in process.

    .venv/bin/python -m bench.sweep                          # every side, form and size; table, PNG, JSON
    .venv/bin/python -m bench.sweep --sides ours --sizes 256 --seconds 2 --no-save   # one quick point

For 1, 8, 64, 256 and 1,024 real MNIST test digits per request, one caller (one connection, one request in
flight, closed loop) sends the same request for ``--seconds`` after a short warm-up and the sweep reports
samples/s and p50/p99; each form is first warmed with its own calls (``--warmup`` seconds over its sizes).
Forms, all through the stock clients (the same client for both servers):

* ``rest-bin``: Open Inference Protocol over REST with binary tensors (``tritonclient.http``, FP32 input
  ``[N, 784]``, binary outputs);
* ``grpc``: the same tensor over gRPC (``tritonclient.grpc``; ours: the OIP gRPC service in TorchServe's JVM);
* ``oip-json``: the Open Inference Protocol with JSON data (``tritonclient.http`` with ``binary_data=False``);
* ``native-json`` (ours only): ``POST /predictions/mnistnet`` with the JSON array the baselines get.

``inprocess`` times MNISTNet's forward pass on the same digits, normalised, on 1 thread (as one server
worker; bench/inprocess.py). Every served answer is checked first against that model (same classes, same
probabilities within 1e-5). The client runs on the same cores as the servers; its encoding is part of each
request's time (for JSON at 1,024 images it is most of it). Outputs: the table on stdout,
``bench/results/sweep.json`` (the summary bench/README.md cites) and ``bench/results/sweep.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench import payloads
from paths import BENCH_RESULTS_DIR, REPO_ROOT, WEIGHTS_DIR

MODEL = "mnistnet"
SIZES = (1, 8, 64, 256, 1024)
SIDES = ("ours", "triton", "inprocess")
FORMS = ("rest-bin", "grpc", "oip-json", "native-json")
TOLERANCE = 1e-5


def digits(count: int) -> np.ndarray:
    """``count`` MNIST test digits as FP32 intensities ``(count, 784)`` (what both servers take)."""
    return payloads.intensities(payloads.digits(count)).reshape(count, 784).astype(np.float32)


def reference(images: np.ndarray, weights: Path):
    """The in-process model's probabilities for ``images`` (normalised like training): the independent answer."""
    import torch

    from bench.inprocess import load_model
    from models.registry import MNIST_MEAN, MNIST_STD

    model = load_model(str(weights))
    x = (torch.from_numpy(images) - MNIST_MEAN) / MNIST_STD
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1).numpy()


# ------------------------------------------------------------------------------------------ callers

def make_caller(form: str, server, token: str | None, images: np.ndarray):
    """A zero-argument function that sends one request of ``images`` in ``form`` to ``server`` and returns
    ``(probabilities (N, 10), predicted classes (N,))`` as numpy arrays."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    headers = {"Authorization": f"Bearer {token}"} if token else None
    if form in ("rest-bin", "oip-json"):
        binary = form == "rest-bin"
        client = thttp.InferenceServerClient(server.inference_url.removeprefix("http://"), network_timeout=120)
        tensor = thttp.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=binary)
        outputs = [thttp.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "predicted_class")]

        def call():
            result = client.infer(MODEL, [tensor], outputs=outputs, headers=headers)
            return result.as_numpy("probabilities"), result.as_numpy("predicted_class").reshape(-1)
        return call
    if form == "grpc":
        client = tgrpc.InferenceServerClient(server.grpc_address)
        tensor = tgrpc.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        outputs = [tgrpc.InferRequestedOutput(n) for n in ("probabilities", "predicted_class")]
        metadata = {"authorization": f"Bearer {token}"} if token else None

        def call():
            result = client.infer(MODEL, [tensor], outputs=outputs, headers=metadata)
            return result.as_numpy("probabilities"), result.as_numpy("predicted_class").reshape(-1)
        return call
    if form == "native-json":
        body, content_type = payloads.json_images(len(images), flat=True)
        host, port = server.inference_url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        sent = {"Content-Type": content_type, **(headers or {})}

        def call():
            connection.request("POST", f"/predictions/{MODEL}", body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"native JSON answered {response.status}: {data[:300]!r}")
            answer = json.loads(data)
            answer = answer if isinstance(answer, list) else [answer]
            return (np.array([a["probabilities"] for a in answer], dtype=np.float32),
                    np.array([a["predicted_class"] for a in answer]))
        return call
    raise ValueError(f"unknown form {form!r}")


def time_calls(call, images: int, seconds: float, warmup_calls: int = 3, min_calls: int = 5) -> dict:
    """Closed loop of ``call`` for ``seconds`` (at least ``min_calls``) after ``warmup_calls``: one caller."""
    for _ in range(warmup_calls):
        call()
    latencies: list[float] = []
    start = time.perf_counter()
    while len(latencies) < min_calls or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return {"requests": n, "seconds": elapsed, "req_per_s": n / elapsed, "samples_per_s": n * images / elapsed,
            "p50_ms": latencies[n // 2] * 1e3, "p99_ms": latencies[min(n - 1, int(0.99 * n))] * 1e3}


def check(call, images: np.ndarray, expected: np.ndarray, label: str) -> None:
    """The served answer equals the in-process model's: same classes, probabilities within TOLERANCE."""
    probabilities, classes = call()
    if probabilities.shape != expected.shape:
        raise RuntimeError(f"{label}: probabilities of shape {probabilities.shape}, expected {expected.shape}")
    worst = float(np.abs(probabilities - expected).max())
    if worst > TOLERANCE or not np.array_equal(classes, expected.argmax(axis=1)):
        raise RuntimeError(f"{label}: answers differ from the in-process model (max |dp| {worst:.2e})")


def sweep_server(side: str, server, forms, sizes, seconds: float, weights: Path, warmup: float) -> dict:
    """Every (form, size) point against one running server; ``{form: {size: result}}``. Before a form's first
    point, ``warmup`` seconds of that form's own calls, round-robin over the sizes it will be timed at: the JVM
    (ours) compiles each form's hot paths (gRPC's differ from REST's) under load first, and every form starts warm."""
    token = server.keys().get("inference")
    out: dict = {}
    for form in forms:
        out[form] = {}
        callers = {size: make_caller(form, server, token, digits(size)) for size in sizes}
        deadline = time.monotonic() + warmup
        while time.monotonic() < deadline:
            for size in sizes:
                callers[size]()
        for size in sizes:
            images = digits(size)
            call = callers[size]
            check(call, images, reference(images, weights), f"{side} {form} {size}")
            result = time_calls(call, size, seconds)
            out[form][str(size)] = result
            print(f"  {side:<9} {form:<12}{size:>6} images  {result['samples_per_s']:>11,.0f} samples/s  "
                  f"p50 {result['p50_ms']:8.2f} ms  p99 {result['p99_ms']:8.2f} ms  ({result['requests']} requests)",
                  flush=True)
    return out


@contextlib.contextmanager
def served(side: str, weights_dir: Path):
    """Ours (mnistnet alone, the repository's config) or Triton running on free loopback ports; yields the server."""
    from bench.servers import ours_server, private_dirs, running
    from bench.triton_server import TritonServer, ensure_venv
    from serve.package import package_models

    with private_dirs(side) as root:
        if side == "ours":
            store = root / "store"
            package_models([MODEL], weights_dir=weights_dir, store=store)
            server = ours_server(root, store, [MODEL])
        else:
            ensure_venv()
            server = TritonServer(weights_dir / f"{MODEL}.pt", root / "triton.log")
        with running(server) as (server, cold_start):
            print(f"  {side} ready in {cold_start:.1f} s ({server.inference_url}, gRPC {server.grpc_address})",
                  flush=True)
            yield server


def run_inprocess(sizes, seconds: float, weights: Path) -> dict:
    """bench/inprocess.py's forward pass on the same normalised digits, 1 thread."""
    import torch

    from bench.inprocess import load_model, measure_calls
    from models.registry import MNIST_MEAN, MNIST_STD

    model = load_model(str(weights))
    out = {}
    for size in sizes:
        x = (torch.from_numpy(digits(size)) - MNIST_MEAN) / MNIST_STD
        r = measure_calls(model, x, seconds=seconds, threads=1)
        out[str(size)] = {"requests": r["calls"], "seconds": r["seconds"], "samples_per_s": r["samples_per_s"],
                          "p50_ms": r["p50_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3}
        print(f"  inprocess forward     {size:>6} images  {r['samples_per_s']:>11,.0f} samples/s  "
              f"p50 {r['p50_us'] / 1e3:8.3f} ms", flush=True)
    return {"forward": out}


# ------------------------------------------------------------------------------------------- report

def table(results: dict) -> str:
    """samples/s and p50 per (side, form) and size; rows ``ours/triton``: ours / Triton in the same form (samples/s:
    higher is better for ours; p50: lower is)."""
    sizes = results["settings"]["sizes"]
    lines = [f"{'side':<13}{'form':<13}" + "".join(f"{str(s) + ' img':>22}" for s in sizes),
             f"{'':<26}" + "".join(f"{'samples/s   p50 ms':>22}" for _ in sizes)]
    for side in SIDES:
        for form, points in results.get(side, {}).items():
            row = f"{side:<13}{form:<13}"
            for s in sizes:
                p = points.get(str(s))
                row += f"{p['samples_per_s']:>12,.0f}{p['p50_ms']:>10.3f}" if p else f"{'-':>22}"
            lines.append(row)
    ours, triton = results.get("ours", {}), results.get("triton", {})
    for form in [f for f in ours if f in triton]:
        row = f"{'ours/triton':<13}{form:<13}"
        for s in sizes:
            a, b = ours[form].get(str(s)), triton[form].get(str(s))
            row += f"{a['samples_per_s'] / b['samples_per_s']:>11.2f}x{a['p50_ms'] / b['p50_ms']:>9.2f}x" if a and b \
                else f"{'-':>22}"
        lines.append(row)
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for side in SIDES:
        for form, points in results.get(side, {}).items():
            sizes = [int(s) for s in points]
            style = {"ours": "-o", "triton": "--s", "inprocess": ":^"}[side]
            left.plot(sizes, [points[str(s)]["samples_per_s"] for s in sizes], style, label=f"{side} {form}")
            right.plot(sizes, [points[str(s)]["p50_ms"] for s in sizes], style, label=f"{side} {form}")
    for axis, label in ((left, "samples/s"), (right, "p50 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("images per request (one caller)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    m = results["machine"]
    fig.suptitle(f"MNISTNet, one request in flight, {m['nproc']} cores ({m['cpu_model']}); 1-min load "
                 f"{m['loadavg_start'][0]:.1f} at start; client on the same cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default=",".join(SIDES), help=f"of {', '.join(SIDES)} (default all)")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"of {', '.join(FORMS)} (default all)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="images per request (default 1,8,64,256,1024)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per point (default 3)")
    parser.add_argument("--warmup", type=float, default=20.0,
                        help="seconds of each form's own calls (all its sizes, in turn) before its first point "
                             "(default 20: the JVM is still compiling before)")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--out", type=Path, default=BENCH_RESULTS_DIR, help="writes sweep.json and sweep.png here")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    forms = [f for f in args.forms.split(",") if f]
    if set(sides) - set(SIDES) or set(forms) - set(FORMS):
        parser.error(f"--sides takes {', '.join(SIDES)}; --forms takes {', '.join(FORMS)}")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    from bench.serving import machine_info, peer_settings
    from bench.triton_server import TritonSetupError, ensure_venv
    from models.registry import get_spec
    from serve.package import ensure_weights

    weights = ensure_weights(get_spec(MODEL), args.weights_dir.resolve())
    if "triton" in sides:
        try:
            ensure_venv()
        except TritonSetupError as error:
            print(f"error: the Triton side was asked for but {error}", file=sys.stderr)
            return 1
    results = {"machine": machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "settings": {"sizes": sizes, "forms": forms, "seconds": args.seconds, "warmup_s": args.warmup,
                            "callers": 1, "clients": "tritonclient.http / tritonclient.grpc (stock); native JSON: "
                            "http.client keep-alive"},
               "configured": {}}
    print(f"1-min load {os.getloadavg()[0]:.2f}; one caller per point, {args.seconds:g} s each", flush=True)
    for side in sides:
        results["configured"][side] = ("model(x) under inference_mode on the same digits, normalised, 1 thread "
                                       "(bench/inprocess.measure_calls)") if side == "inprocess" else peer_settings(side)
        print(f"{side}: {results['configured'][side]}", flush=True)
        if side in ("ours", "triton"):
            with served(side, weights.parent) as server:
                side_forms = [f for f in forms if side == "ours" or f != "native-json"]  # Triton: no native JSON
                results[side] = sweep_server(side, server, side_forms, sizes, args.seconds, weights, args.warmup)
        else:
            results[side] = run_inprocess(sizes, args.seconds, weights)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    print()
    print(table(results))
    print(f"\n1-min load {results['machine']['loadavg_start'][0]:.2f} at start, {results['machine']['loadavg_end'][0]:.2f} at end")
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep.json").write_text(json.dumps(results, indent=2) + "\n")
        png = plot(results, args.out / "sweep.png")
        for path in (args.out / "sweep.json", png):
            print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
