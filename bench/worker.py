"""One worker's CPU per request, in process: TorchServe's own ``Service`` and our handler fed real frames.

    .venv/bin/python -m bench.worker                       # mnistnet, JSON and PNG, batches of 8
    .venv/bin/python -m bench.worker --forms json --stages  # and CPU per request by stage
    .venv/bin/python -m bench.worker --forms json,oip       # JSON and the OIP binary tensor form
    .venv/bin/python -m bench.worker --env SERVE_FAST_WORKER=0  # TorchServe's own worker pieces

The archive is built by serve/package.py and unpacked; TorchServe's model loader loads it with our metrics
YAML (so the model-quality metrics run), exactly as a worker does. Each round writes one batch frame, as the
frontend sends it (request id, the headers wrk sends, the body), into a socket pair; the worker side reads it
with the worker's ``retrieve_msg`` (serve/torchserve/worker.py's unless switched off), answers through
``Service.predict`` and ``sendall``, and the feeding side reads the answer back. No frontend, no HTTP, one
process: CPU per request here is the worker's share of a served request without scheduling noise (the
feeding side's write and read are included, a few µs). Log lines go to /dev/null.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import os
import socket
import struct
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from paths import REPO_ROOT, WEIGHTS_DIR

HEADERS = {"Host": "127.0.0.1:8080", "Authorization": "Bearer 0123456789abcdef0123456789abcdef"}
_INT = struct.Struct("!i")


def _item(data: bytes) -> bytes:
    return _INT.pack(len(data)) + data


def inference_frame(requests: list[tuple[bytes, dict[str, str]]]) -> bytes:
    """An inference message as TorchServe's frontend writes it to a worker: one ``(body, headers)`` per request
    of the batch (request ids: version 7 UUIDs of now, ``<time>-7000-8000-<index>``, as the frontend names
    requests; the body's content type is the ``Content-Type`` header's, as the frontend sends it)."""
    frames = []
    millis = time.time_ns() // 1_000_000
    for i, (body, headers) in enumerate(requests):
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        frame = _item(f"{millis >> 16:08x}-{millis & 0xffff:04x}-7000-8000-{i:012d}".encode())
        frame += b"".join(_item(k.encode()) + _item(v.encode()) for k, v in headers.items()) + _INT.pack(-1)
        frame += _item(b"body") + _item(content_type.encode()) + _item(body) + _INT.pack(-1)
        frames.append(frame)
    return b"I" + b"".join(frames) + _INT.pack(-1)


def batch_frame(body: bytes, content_type: str, batch: int, extra: dict | None = None) -> bytes:
    """An inference message of ``batch`` identical requests with the headers wrk sends; ``extra``: more
    request headers (the OIP binary form's Inference-Header-Content-Length)."""
    headers = {**HEADERS, "Content-Type": content_type, "content-length": str(len(body)), **(extra or {})}
    return inference_frame([(body, headers)] * batch)


def parse_response_frame(frame: bytes) -> tuple[int, str, list[dict]]:
    """A worker's answer as the frontend reads it: ``(batch status, message, one dict per request)`` with
    ``request_id``, ``status``, ``phrase``, ``content_type``, ``headers`` and ``body`` (bytes)."""
    view, offset = memoryview(frame), 0

    def integer() -> int:
        nonlocal offset
        (value,) = _INT.unpack_from(view, offset)
        offset += 4
        return value

    def blob() -> bytes:
        nonlocal offset
        size = integer()
        offset += size
        return bytes(view[offset - size:offset])

    code, message, answers = integer(), blob().decode(), []
    while True:
        size = integer()
        if size == -1:
            return code, message, answers
        offset -= 4
        request_id, content_type = blob().decode(), blob().decode()
        status, phrase = integer(), blob().decode()
        headers = {blob().decode(): blob().decode() for _ in range(integer())}
        answers.append({"request_id": request_id, "status": status, "phrase": phrase,
                        "content_type": content_type, "headers": headers, "body": blob()})


def load_service(model: str, batch: int, root: Path, *, weights: Path | None = None, gpu_id: int | None = None,
                 as_worker: bool = True):
    """TorchServe's ``Service`` for ``model``'s archive, built here and loaded as a worker loads it.

    ``weights``: the state dict to archive (default ``weights/<model>.pt``, trained when missing);
    ``gpu_id``: the GPU TorchServe would give the worker (None: none). ``as_worker`` makes this process look
    like a worker: the worker patches (serve/torchserve/worker.py) are installed, for the whole process, as the
    worker launch does; without it TorchServe's own ``retrieve_msg`` and ``Service.predict`` run. Returns
    ``(service, retrieve_msg)``; the archive goes to ``root/store``, unpacked into ``root/<model>``.
    """
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import ModelLoaderFactory
    from ts.protocol import otf_message_handler

    from models.registry import get_spec
    from serve.package import build_archive, ensure_weights, model_config
    from serve.torchserve import worker

    if as_worker:
        # What the worker launch does before the worker script runs (serve/torchserve/run_worker.py): the worker
        # patches, unless SERVE_FAST_WORKER=0 (or another TorchServe) keeps TorchServe's own pieces.
        worker.install()
    spec = get_spec(model)
    archive = build_archive(spec, weights or ensure_weights(spec, WEIGHTS_DIR), root / "store",
                            config=model_config(spec))
    model_dir = root / model
    with zipfile.ZipFile(archive) as handle:
        handle.extractall(model_dir)
    sys.path.insert(0, str(model_dir))  # the worker imports the handler from the unpacked archive
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    cache = MetricsCacheYamlImpl(config_file_path=str(REPO_ROOT / "serve" / "metrics.yaml"))
    cache.initialize_cache()
    cache.model_name = model
    service = ModelLoaderFactory.get_model_loader().load(
        model, str(model_dir), manifest["model"]["handler"], gpu_id, batch, None, True, cache)
    return service, otf_message_handler.retrieve_msg


class Replay:
    """A worker's loop over a socket pair: write the frame, read it, predict, send the answer, read it back."""

    def __init__(self, service, retrieve, frame: bytes):
        self.service, self.retrieve, self.frame = service, retrieve, frame
        self.front, self.worker = socket.socketpair()
        for sock in (self.front, self.worker):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        service.set_cl_socket(self.worker)

    def round(self, frame: bytes | None = None) -> bytes:
        """One batch through the worker's loop (``frame``, default the replayed one); the answer frame."""
        self.front.sendall(frame or self.frame)
        _, message = self.retrieve(self.worker)
        answer = self.service.predict(message)
        self.worker.sendall(answer)
        received = 0
        while received < len(answer):
            received += len(self.front.recv(1 << 22))
        return answer

    def close(self) -> None:
        self.front.close()
        self.worker.close()

    def cpu_us_per_request(self, rounds: int, batch: int) -> float:
        started = time.process_time()
        for _ in range(rounds):
            self.round()
        return (time.process_time() - started) / rounds / batch * 1e6


# Stage name → (module, attribute path) timed by wrapping; nested stages are indented under their caller.
STAGES = (
    ("read the frame (incl. JSON parse)", "serve.torchserve.worker", "_inference_msg"),
    ("  JSON parse", "serve.torchserve.worker", "_json_loads"),
    ("Service.predict", "ts.service", "Service.predict"),
    ("  decode + validate", "handlers.protocols", "decode_request"),
    ("    numeric_array", "handlers.decoding", "numeric_array"),
    ("    finish (range, normalise)", "handlers.decoding", "finish"),
    ("  forward", "handlers.base", "ServingHandler.forward"),
    ("  postprocess", "image_classifier", "ImageClassifier.postprocess"),
    ("  encode", "handlers.protocols", "encode_response"),
    ("  model metrics", "handlers.metrics", "ModelMetrics.predictions"),
    ("  response frame", "serve.torchserve.worker", "_response_frame"),
)


def time_stages(replay: Replay, rounds: int, batch: int) -> dict[str, float]:
    """Wall µs per request in each of :data:`STAGES` (wrapping adds ~0.3 µs per call)."""
    spent: collections.Counter = collections.Counter()

    def wrap(owner, name: str, label: str):
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - started

        setattr(owner, name, timed)

    for label, module, path in STAGES:
        owner = sys.modules.get(module)
        if owner is None:
            continue
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        if hasattr(owner, name):
            wrap(owner, name, label)
    spent.clear()
    started = time.perf_counter()
    for _ in range(rounds):
        replay.round()
    total = time.perf_counter() - started
    out = {label: spent[label] / rounds / batch * 1e6 for label, _, _ in STAGES if label in spent}
    out["total (wall, with the wrappers)"] = total / rounds / batch * 1e6
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnistnet")
    parser.add_argument("--batch", type=int, default=8, help="requests per batch (default 8, mnistnet's batchSize)")
    parser.add_argument("--forms", default="json,png",
                        help="json, png, oip (one digit as OIP binary FP32, what tritonclient sends); default json,png")
    parser.add_argument("--rounds", type=int, default=2000, help="timed batches per form (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per form; the table shows each (default 3)")
    parser.add_argument("--stages", action="store_true", help="also time the stages of a request (STAGES)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the worker, e.g. SERVE_FAST_WORKER=0 (set before loading)")
    args = parser.parse_args(argv)
    for item in args.env:
        key, _, value = item.partition("=")
        os.environ[key] = value
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(stream=open(os.devnull, "w"), format="%(message)s", level=logging.INFO)  # as a worker

    from bench import payloads

    forms = {"json": payloads.json_images(1), "png": payloads.png_image(), "oip": payloads.v2_binary_images(1)}
    chosen = [f.strip() for f in args.forms.split(",") if f.strip()]
    if set(chosen) - set(forms):
        parser.error("--forms takes json, png and oip")
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        service, retrieve = load_service(args.model, args.batch, Path(tmp))
        print(f"{args.model}, batches of {args.batch}, 1-min load {os.getloadavg()[0]:.2f}; CPU µs per request")
        for form in chosen:
            body, content_type, *extra = forms[form]
            replay = Replay(service, retrieve, batch_frame(body, content_type, args.batch, *extra))
            answer = replay.round()
            if b'"predicted_class"' not in answer:
                raise SystemExit(f"{form}: unexpected answer {answer[:300]!r}")
            replay.cpu_us_per_request(max(1, args.rounds // 10), args.batch)  # warm caches and allocators
            runs = [replay.cpu_us_per_request(args.rounds, args.batch) for _ in range(args.repeats)]
            print(f"  {form:<5} " + " / ".join(f"{us:.1f}" for us in runs))
            if args.stages:
                for label, us in time_stages(replay, args.rounds, args.batch).items():
                    print(f"      {label:<40} {us:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
