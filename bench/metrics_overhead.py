"""What the model-quality metrics (handlers/metrics.py) cost per request: the handler with them on vs off.

    .venv/bin/python -m bench.metrics_overhead [--batches 3000] [--batch 8]

The real ``ImageClassifier.handle`` (TorchServe ``Context``, trained mnistnet weights, one thread) on
batches of ``--batch`` single-digit PNG requests, the served shape at 4-6k req/s (batch size 8), plus one
malformed request per batch for the rejection counter. "on": a metrics cache loaded from serve/metrics.yaml
and the metric lines written to a log handler on /dev/null with TorchServe's worker format (one record
per batch, as in a worker, whose stdout the frontend parses); "off": the same without the declaration.
Prints microseconds per request for both (median of 5 rounds, alternating) and the difference.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import ts
    from ts.context import Context, RequestProcessor
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from handlers.image_classifier import ImageClassifier
    from handlers.metrics import ModelMetrics
    from train.data import mnist_arrays

    sink = logging.StreamHandler(open(os.devnull, "w"))
    sink.setFormatter(logging.Formatter("%(message)s"))  # TorchServe's worker: basicConfig(format="%(message)s")
    logging.getLogger().addHandler(sink)
    logging.getLogger().setLevel(logging.INFO)

    digits, _ = mnist_arrays("test")
    bodies = []
    for image in digits[: args.batch]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        bodies.append({"body": buffer.getvalue()})
    batch = bodies + [{"body": b"{"}]
    cache = MetricsCacheYamlImpl(config_file_path=str(REPO / "serve" / "metrics.yaml"))
    cache.initialize_cache()
    with tempfile.TemporaryDirectory() as model_dir:
        manifest = {"model": {"modelName": "mnistnet", "serializedFile": "mnistnet.pt", "modelVersion": "1.0"}}
        (Path(model_dir) / "mnistnet.pt").write_bytes((REPO / "weights" / "mnistnet.pt").read_bytes())
        context = Context("mnistnet", model_dir, manifest, args.batch + 1, None, ts.__version__)
        handler = ImageClassifier()
        handler.initialize(context)
        on = ModelMetrics(cache, "mnistnet", "classification")
        off = ModelMetrics(None, "mnistnet", "classification")
        assert on.enabled and not off.enabled

        def run(metrics) -> float:
            handler.metrics = metrics
            started = time.perf_counter()
            for _ in range(args.batches):
                context.request_processor = [RequestProcessor({}) for _ in batch]
                context.request_ids = {i: f"r{i}" for i in range(len(batch))}
                handler.handle(batch, context)
            return 1e6 * (time.perf_counter() - started) / (args.batches * len(batch))

        run(on), run(off)  # warm-up
        results = {"off": [], "on": []}
        for _ in range(args.rounds):
            results["off"].append(run(off))
            results["on"].append(run(on))
    off_us, on_us = statistics.median(results["off"]), statistics.median(results["on"])
    print(f"batches of {args.batch} PNG digits + 1 malformed request, {args.batches} batches x {args.rounds} rounds")
    print(f"metrics off: {off_us:7.1f} us/request")
    print(f"metrics on:  {on_us:7.1f} us/request  (+{on_us - off_us:.1f} us, {100 * (on_us - off_us) / off_us:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
