"""The GPU check's in-process part: every model served by TorchServe's own worker pieces on the GPU, no Java.

Each model's archive (built by serve/package.py from the weights under test) is loaded by TorchServe's model
loader into its ``Service``, with the ``gpu_id`` TorchServe would hand a worker, and fed the frames the
frontend writes (bench/worker.py's harness); the answers are read back from the worker's response frames.
Checks: the handler runs on the device, its binary OIP answers match the network on the CPU, and its
throughput for 1 and 256 images per request. Needs TorchServe's and torch-model-archiver's Python packages
(pure Python: carry their wheels to a bare GPU box), not Java.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path

from scripts.gpu_check import CHUNK, Report, digits_for, mnist_test, oip_headers, parity_check, throughput_model

NEEDS = (("ts", "torchserve"), ("model_archiver", "torch-model-archiver"), ("yaml", "PyYAML"))


def unavailable() -> str | None:
    """Why the in-process part cannot run here (a package it needs is missing), or None."""
    missing = []
    for module, wheel in NEEDS:
        try:
            importlib.import_module(module)
        except Exception as err:  # ImportError, or a broken install
            missing.append(f"{module} not importable ({err}; carry the {wheel} wheel)")
    return "; ".join(missing) or None


def gpu_id_of(device) -> int | None:
    """TorchServe's ``gpu_id`` for ``device``: its CUDA index, None for the CPU."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class Worker:
    """One model as a TorchServe worker holds it: the ``Service`` loaded from its archive, fed over a socket pair."""

    def __init__(self, name: str, weights: Path, root: Path, device):
        from bench.worker import Replay, load_service
        from models.registry import get_spec

        self.name = name
        self.service, retrieve = load_service(name, get_spec(name).batch_size, root, weights=weights,
                                              gpu_id=gpu_id_of(device), as_worker=False)
        self.replay = Replay(self.service, retrieve, b"")

    @property
    def handler(self):
        """The handler instance TorchServe's loader created (the ``Service``'s entry point is its ``handle``)."""
        return self.service._entry_point.__self__

    @property
    def context(self):
        return self.service.context

    def send(self, requests: list[tuple[bytes, dict[str, str]]]) -> list[dict]:
        """One batch of ``(body, headers)`` requests through the worker; one answer dict per request
        (``status``, ``phrase``, ``headers``, ``body``: bench/worker.py's ``parse_response_frame``)."""
        from bench.worker import inference_frame, parse_response_frame

        _, _, answers = parse_response_frame(self.replay.round(inference_frame(requests)))
        return answers

    def infer(self, array, datatype: str) -> tuple[int, dict]:
        """``array`` as one binary OIP request: ``(status, decoded OIP response or {"error": ...})``."""
        from client.oip import binary_v2_request, parse_binary_v2_response

        body, header_length = binary_v2_request(array, datatype=datatype)
        (answer,) = self.send([(body, oip_headers(header_length))])
        if answer["status"] != 200:
            return answer["status"], {"error": answer["body"][:300]}
        return 200, parse_binary_v2_response(answer["body"], answer["headers"].get("Inference-Header-Content-Length"))

    def close(self) -> None:
        self.replay.close()


def measure(worker: Worker, images, seconds: float, device, warmup: float = 0.3) -> dict:
    """Samples/s of the worker answering one binary OIP request of ``images`` per batch, wall clock (frame
    in, ``Service.predict``, frame out), with ``torch.cuda.synchronize`` around the timed rounds on a GPU
    (the handler itself waits for its results: it copies the model output to the CPU)."""
    import torch

    from bench.worker import inference_frame, parse_response_frame
    from client.oip import binary_v2_request

    body, header_length = binary_v2_request(images, datatype="UINT8")
    frame = inference_frame([(body, oip_headers(header_length))])
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    (answer,) = parse_response_frame(worker.replay.round(frame))[2]
    if answer["status"] != 200:
        raise RuntimeError(f"the handler answered {answer['status']}: {answer['phrase'] or answer['body'][:200]}")
    for phase_seconds in (warmup, seconds):
        sync()
        calls, started = 0, time.perf_counter()
        while True:
            worker.replay.round(frame)
            calls += 1
            if time.perf_counter() - started >= phase_seconds:
                break
        sync()
        elapsed = time.perf_counter() - started
    n = len(images)
    return {"batch": n, "calls": calls, "seconds": round(elapsed, 3), "samples_per_s": calls * n / elapsed,
            "ms_per_call": elapsed / calls * 1e3}


def run(report: Report, names: list[str], weights: dict[str, Path], device, work: Path, seconds: float,
        digits=None) -> None:
    """The in-process checks: worker on ``device``, parity against the CPU, throughput."""
    import torch

    import ts

    report.info(f"handlers run inside TorchServe {ts.__version__}'s Service (model loader, Context, worker frames)")
    want = torch.device(device).type
    digits = digits_for(names, digits)
    workers: dict[str, Worker] = {}
    try:
        for name in names:
            try:
                worker = Worker(name, weights[name], work / "inprocess", device)
            except Exception as err:
                report.check(f"handler[{name}]", "FAIL", f"loading its archive failed: {type(err).__name__}: {err}")
                continue
            workers[name] = worker
            handler = worker.handler
            on = {p.device.type for p in handler.model.parameters()}
            ok = handler.device.type == want and on == {want}
            report.check(f"handler[{name}]", "PASS" if ok else "FAIL",
                         f"{type(handler).__name__} serves {name} on {handler.device} (parameters on "
                         f"{', '.join(sorted(on))}; TorchServe gpu_id {worker.context.system_properties['gpu_id']})")
            if ok:
                parity_check(report, name, "parity", f"TorchServe's Service on {handler.device} vs the network on the CPU",
                             worker.infer, weights[name], digits)

        name = throughput_model([n for n in names if n in workers])
        if name is None:
            report.check("throughput[handler]", "SKIP", "no image model's handler loaded")
            return
        images = (digits[0] if digits is not None else mnist_test()[0])[:CHUNK]
        for batch in (1, CHUNK):
            label = f"throughput[handler, {name}, {batch} image{'s' if batch > 1 else ''}/request]"
            try:
                r = measure(workers[name], images[:batch], seconds, device)
            except Exception as err:
                report.check(label, "FAIL", f"{type(err).__name__}: {err}")
                continue
            report.check(label, "PASS", f"{r['samples_per_s']:,.0f} samples/s on {workers[name].handler.device} "
                         f"({r['ms_per_call']:.3f} ms per request through the worker, {r['calls']} requests in "
                         f"{r['seconds']:.1f} s, wall clock)", **r)
    finally:
        for worker in workers.values():
            worker.close()
