"""Cost of one explanation (Captum Integrated Gradients, handlers/explain.py): milliseconds per image.

    .venv/bin/python -m bench.explain_cost                  # mnistnet, deepnet, feedforwardnet; default steps
    .venv/bin/python -m bench.explain_cost --models mnistnet --steps 50,128 --images 1,8,64
    .venv/bin/python -m bench.explain_cost --url http://127.0.0.1:8080   # also through a running server

In-process: the real handler (``ImageClassifier.handle``) with TorchServe's ``Context``, the trained
weights from ``weights/``, one intra-op thread (as a worker has), a JSON request of N real MNIST test
digits sent to the explanation path; the median of ``--repeat`` runs after one warm-up, divided by N.
A prediction of the same request is timed alongside for scale. ``--url``: the same through the server's
``/explanations/<model>`` with the client (key from .serve/key_file.json), sequentially, one image per
request, so it includes HTTP, the frontend and batching delay.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


import numpy as np
import torch

from handlers.explain import DEFAULT_STEPS

from paths import REPO_ROOT as REPO


def in_process(model: str, images: np.ndarray, steps: int, repeat: int) -> tuple[float, float]:
    """(ms per image explained, ms per image predicted) through the handler, median of ``repeat`` runs."""
    import ts
    from ts.context import Context, RequestProcessor

    from handlers.image_classifier import ImageClassifier

    with tempfile.TemporaryDirectory() as model_dir:
        manifest = {"model": {"modelName": model, "serializedFile": f"{model}.pt", "modelVersion": "1.0"}}
        (Path(model_dir) / f"{model}.pt").write_bytes((REPO / "weights" / f"{model}.pt").read_bytes())
        context = Context(model, model_dir, manifest, 8, None, ts.__version__)
        handler = ImageClassifier()
        handler.initialize(context)
        body = {"data": (images / 255.0).round(6).tolist(), "steps": steps}

        def run(explain: bool) -> float:
            headers = {"explain": "True" if explain else "False", "url_path": "x"}
            context.request_processor = [RequestProcessor(headers)]
            context.request_ids = {0: "bench"}
            started = time.perf_counter()
            (answer,) = handler.handle([{"body": body}], context)
            elapsed = time.perf_counter() - started
            assert context.get_response_status(0)[0] == 200, answer[:200]
            return elapsed

        times = {}
        for explain in (True, False):
            run(explain)  # warm-up
            times[explain] = statistics.median(run(explain) for _ in range(repeat))
    n = len(images)
    return 1000 * times[True] / n, 1000 * times[False] / n


def served(url: str, model: str, images: np.ndarray, steps: int, repeat: int) -> float:
    from client.api import TorchServeClient

    client = TorchServeClient(url)
    client.explain(model, {"data": (images[0] / 255.0).tolist()}, steps=steps)
    times = []
    for i in range(repeat):
        body = {"data": (images[i % len(images)] / 255.0).round(6).tolist()}
        started = time.perf_counter()
        client.explain(model, body, steps=steps)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnistnet,deepnet,feedforwardnet")
    parser.add_argument("--steps", default=str(DEFAULT_STEPS), help="comma-separated (default: the served default)")
    parser.add_argument("--images", default="1,8,64", help="images per request, comma-separated")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--url", help="also time /explanations on this running server")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from train.data import mnist_arrays

    digits, _ = mnist_arrays("test")
    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread")
    print(f"{'model':16s} {'steps':>5s} {'images':>6s} {'explain ms/image':>17s} {'predict ms/image':>17s}")
    for model in args.models.split(","):
        for steps in map(int, args.steps.split(",")):
            for n in map(int, args.images.split(",")):
                explain_ms, predict_ms = in_process(model, np.asarray(digits[:n]), steps, args.repeat)
                results.append(dict(model=model, steps=steps, images=n, explain_ms_per_image=explain_ms,
                                    predict_ms_per_image=predict_ms))
                print(f"{model:16s} {steps:5d} {n:6d} {explain_ms:17.3f} {predict_ms:17.3f}", flush=True)
            if args.url:
                ms = served(args.url, model, np.asarray(digits[:100]), steps, args.repeat)
                results.append(dict(model=model, steps=steps, images=1, served_ms_per_request=ms))
                print(f"{model:16s} {steps:5d} {1:6d} {ms:17.3f}  (served, one image per request, sequential)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
