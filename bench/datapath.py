"""Where the time of one large binary Open Inference Protocol REST request goes (default 256 images).

    .venv/bin/python -m bench.datapath                  # 256 images, ~1 min plus the server's start
    .venv/bin/python -m bench.datapath --images 1024 --seconds 10

Three measurements of the same request (``tritonclient.http``, FP32 ``[N, 784]`` of real test digits, binary
outputs; one caller), combined into one table of mean µs per request:

1. **served**: the project's TorchServe (mnistnet alone, the repository's config) answers it in a closed loop
   for ``--seconds``; wall time per request at the client, and from the frontend's Prometheus counters
   the time in the server (``ts_inference_latency_microseconds``: arrival to answer) and in its job queue
   (``ts_queue_latency_microseconds``: waiting for a worker and the batch window).
2. **worker, in process** (bench/worker.py's harness): the frame the frontend writes for this very body, fed
   to TorchServe's ``Service`` with our handler over a socket pair, with the worker's stages timed
   (``bench.worker.STAGES``); the rest of a round is the socket copies in and out.
3. **client**: tritonclient building the body and parsing the answer, in process.

What is left: server time - queue - worker = the frontend's own work (Netty, the OIP agent, the hand-off
to the worker and the answer's way back); wall - server - client = the client's HTTP library, loopback, and
Netty receiving and aggregating the body (TorchServe starts its timer on the aggregated request). The worker numbers come from another process than the served ones (no contention there), so
shares are estimates; their sum is checked against the served wall time.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from paths import WEIGHTS_DIR

MODEL = "mnistnet"
COUNTERS = ("ts_inference_requests_total", "ts_inference_latency_microseconds", "ts_queue_latency_microseconds")


def tensors(images: np.ndarray):
    import tritonclient.http as thttp

    tensor = thttp.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=True)
    return [tensor], [thttp.InferRequestedOutput(n, binary_data=True) for n in ("probabilities", "predicted_class")]


def mean_us(function, seconds: float = 1.0) -> float:
    """Mean wall µs of ``function()`` over at least ``seconds`` (and 5 calls)."""
    function()
    calls, start = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - start < seconds:
        function()
        calls += 1
    return (time.perf_counter() - start) / calls * 1e6


def served(images: np.ndarray, seconds: float, warmup: float, weights_dir: Path) -> dict:
    """Wall µs per request at one caller, and the frontend's counters per request over the same window."""
    import tritonclient.http as thttp

    from bench.servers import scrape_metrics
    from bench.sweep import served as running_server

    inputs, outputs = tensors(images)
    with running_server("ours", weights_dir) as server:
        token = server.keys().get("inference")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        client = thttp.InferenceServerClient(server.inference_url.removeprefix("http://"), network_timeout=120)

        def call():
            return client.infer(MODEL, inputs, outputs=outputs, headers=headers)

        deadline = time.monotonic() + warmup
        while time.monotonic() < deadline:
            call()
        before = scrape_metrics(server, "ts_")
        walls: list[float] = []
        start = time.perf_counter()
        while len(walls) < 5 or time.perf_counter() - start < seconds:
            began = time.perf_counter()
            call()
            walls.append(time.perf_counter() - began)
        after = scrape_metrics(server, "ts_")
        answer = call()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in COUNTERS}
    if delta["ts_inference_requests_total"] != len(walls):
        print(f"  note: the frontend counted {delta['ts_inference_requests_total']:.0f} requests for {len(walls)} sent",
              flush=True)
    count = max(1.0, delta["ts_inference_requests_total"])
    return {"requests": len(walls), "wall_mean_us": statistics.fmean(walls) * 1e6,
            "wall_p50_us": statistics.median(walls) * 1e6,
            "server_us": delta["ts_inference_latency_microseconds"] / count,
            "queue_us": delta["ts_queue_latency_microseconds"] / count,
            "answer": answer}


def client_side(images: np.ndarray, answer_body: bytes, header_length: int | None) -> dict:
    import tritonclient.http as thttp

    inputs, outputs = tensors(images)
    return {"encode_us": mean_us(lambda: thttp.InferenceServerClient.generate_request_body(inputs, outputs)),
            "decode_us": mean_us(lambda: thttp.InferResult.from_response_body(answer_body, header_length=header_length))}


def worker_side(images: np.ndarray, rounds: int) -> tuple[dict, float]:
    """bench/worker.py's stages for the frame of this body (one request per batch), µs per request, and the
    CPU µs of a whole round."""
    import tritonclient.http as thttp

    from bench.worker import Replay, batch_frame, load_service, time_stages

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(stream=open(os.devnull, "w"), format="%(message)s", level=logging.INFO)  # as a worker
    inputs, outputs = tensors(images)
    body, json_size = thttp.InferenceServerClient.generate_request_body(inputs, outputs)
    headers = {"Inference-Header-Content-Length": str(json_size)} if json_size is not None else {}
    with tempfile.TemporaryDirectory(prefix="bench-datapath-") as tmp:
        service, retrieve = load_service(MODEL, 8, Path(tmp))
        replay = Replay(service, retrieve, batch_frame(body, "application/octet-stream", 1, headers))
        answer = replay.round()
        if b"predicted_class" not in answer:
            raise SystemExit(f"the worker did not answer the request: {answer[:300]!r}")
        cpu = replay.cpu_us_per_request(max(5, rounds // 5), 1)
        stages = time_stages(replay, rounds, 1)
        replay.close()
    return stages, cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.datapath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images per request (default 256)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds through the server (default 5)")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of the same request first (default 15)")
    parser.add_argument("--rounds", type=int, default=300, help="worker rounds in process (default 300)")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    from bench.sweep import digits

    images = digits(args.images)
    load_start = os.getloadavg()[0]
    print(f"{args.images} images, binary OIP REST (tritonclient.http), one caller; 1-min load {load_start:.2f}", flush=True)
    s = served(images, args.seconds, args.warmup, args.weights_dir.resolve())
    client = client_side(images, *_answer_bytes(s["answer"]))
    stages, worker_cpu = worker_side(images, args.rounds)

    worker_total = stages.pop("total (wall, with the wrappers)")
    predict = stages.get("Service.predict", 0.0)
    nested = {k.strip(): v for k, v in stages.items() if k.startswith("  ") and not k.startswith("    ")}
    rows = [
        ("client: tritonclient builds the body", client["encode_us"]),
        ("client HTTP + loopback + Netty aggregating the body (before the frontend's timer)",
         s["wall_mean_us"] - s["server_us"] - client["encode_us"] - client["decode_us"]),
        ("frontend: job queue (worker free + batch window)", s["queue_us"]),
        ("frontend: Netty, OIP agent, hand-off to the worker and back",
         s["server_us"] - s["queue_us"] - worker_total),
        ("worker: socket copy in and out + read the frame", worker_total - predict),
    ]
    for label, us in nested.items():
        rows.append((f"worker: {label}", us))
    rows.append(("worker: rest of Service.predict (TorchServe bookkeeping)", predict - sum(nested.values())))
    rows.append(("client: tritonclient parses the answer", client["decode_us"]))
    total = s["wall_mean_us"]
    print(f"\nmean µs per request over {s['requests']} requests (p50 wall {s['wall_p50_us']:,.0f} µs); "
          f"1-min load {load_start:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'stage':<84}{'µs':>9}{'share':>8}")
    for label, us in rows:
        print(f"{label:<84}{us:>9,.0f}{us / total:>8.1%}")
    print(f"{'total (wall at the client)':<84}{total:>9,.0f}{1:>8.0%}")
    print(f"\nserver (arrival to answer) {s['server_us']:,.0f} µs; worker round in process {worker_total:,.0f} µs wall, "
          f"{worker_cpu:,.0f} µs CPU; {args.images * 1e6 / total:,.0f} samples/s")
    return 0


def _answer_bytes(result) -> tuple[bytes, int | None]:
    """The response body and JSON header length of a tritonclient.http ``InferResult`` (binary outputs)."""
    import json

    header = json.dumps(result.get_response()).encode()
    blobs = b"".join(result.as_numpy(o["name"]).tobytes() for o in result.get_response()["outputs"])
    return header + blobs, len(header)


if __name__ == "__main__":
    sys.exit(main())
