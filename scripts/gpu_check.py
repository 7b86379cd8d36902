#!/usr/bin/env python3
"""GPU check (issue 15): prove on a machine with CUDA that the project's serving path works on the GPU.

    python3 -m scripts.gpu_check [--weights DIR] [--out FILE] [--models all|a,b] [--seconds S] [--no-server]
    make gpu-check                     # the same with the repository's .venv (GPU_CHECK_ARGS=... for options)

Run it from anywhere; it finds the repository from its own path. What it does depends on the machine:

* **No GPU** (``torch.cuda.is_available()`` is False): prints ``no GPU (...): nothing to check``, exits 0.
* **In process, always on a GPU machine** (needs torch, numpy; Pillow is stubbed if missing, nothing
  else): for every model, the archive's content (its weights as ``<name>.pt`` in a model_dir and the
  manifest torch-model-archiver writes) is loaded by the real handler (``ImageClassifier`` /
  ``TabularHandler``) through TorchServe's ``ts.context.Context``, or, where ``ts`` cannot be imported,
  through :class:`MinimalContext` below (the output says which); the handler must choose ``cuda``.
  Parity: every model's answers to binary Open Inference Protocol requests of 256 samples, through
  ``handle()`` on the GPU, against the same network run in this process on the CPU (image models: the
  10,000 MNIST test digits; tabular models: 4,096 seeded rows); max |difference| <= 1e-4 (for
  regression, 1e-4 x max(1, max |y|)). Throughput: ``handle()`` on the GPU with one request of 1 and of
  256 images, wall clock, samples/s.
* **Served, when Java and TorchServe are there** (the project's own GPU machine): archives built by
  serve/package.py into a temporary store, TorchServe started by serve/server.py on free ports with a
  private TMPDIR, working and log directory; TorchServe gives workers GPUs itself when it finds them
  (``number_of_gpu`` unset in config.properties means all). Checks that every worker logged
  ``serving <model> (...) on cuda:N`` to model_log.log (and the describe API's ``gpu`` flag), the same
  parity over HTTP (binary OIP requests of 256 samples), and served throughput with Python threads
  (no wrk needed): single images at 1 and 16 connections, 256-image requests at 1 and 4.
  Where Java or TorchServe is missing, these checks are SKIPped and the reason printed.

Weights: ``--weights DIR`` (default ``weights/``, git-ignored: copy or carry it to a GPU box); a model
whose ``<name>.pt`` is missing is trained first with the registry's training (``train.trainer``, on the
GPU: about 20 s for mnistnet) into the check's temporary directory.

Output: one line per check, ``PASS``/``FAIL``/``SKIP`` with its numbers (``INFO`` lines say what ran
where), then a summary line; ``--out FILE`` also writes a JSON summary. Exit status 1 if any check
failed, else 0. ``--device cpu`` runs every check on the CPU instead (a dry run of the logic, which the
tests use; it proves nothing about a GPU).
"""
from __future__ import annotations

import argparse
import http.client
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

from paths import WEIGHTS_DIR  # imports nothing more: fine on a bare GPU box

NO_GPU_MESSAGE = "no GPU (torch.cuda.is_available() is False): nothing to check"
PROB_TOLERANCE = 1e-4  # max |GPU - CPU| of a probability (issue 15)
TABULAR_ROWS = 4096  # seeded rows per tabular model for the parity check
CHUNK = 256  # samples per parity request (and the large throughput request)
SERVED_LOAD = [(1, 1), (16, 1), (1, CHUNK), (4, CHUNK)]  # (connections, images per request)


# --------------------------------------------------------------------------------------------- report


class Report:
    """Collects one result per check and prints it as it comes: ``STATUS name: detail``."""

    def __init__(self, stream=None):
        self.checks: list[dict] = []
        self.notes: list[str] = []
        self.stream = stream or sys.stdout

    def check(self, name: str, status: str, detail: str, **numbers) -> dict:
        assert status in ("PASS", "FAIL", "SKIP"), status
        entry = {"name": name, "status": status, "detail": detail, **numbers}
        self.checks.append(entry)
        print(f"{status} {name}: {detail}", file=self.stream, flush=True)
        return entry

    def info(self, text: str) -> None:
        self.notes.append(text)
        print(f"INFO {text}", file=self.stream, flush=True)

    def count(self, status: str) -> int:
        return sum(1 for c in self.checks if c["status"] == status)

    @property
    def failed(self) -> bool:
        return self.count("FAIL") > 0


# ------------------------------------------------------------------------------------ environment


def import_status(module: str) -> str | None:
    """The module's version (or "ok") if it imports, else None."""
    try:
        imported = importlib.import_module(module)
    except Exception:  # ImportError, or a broken install
        return None
    return str(getattr(imported, "__version__", "ok"))


def probe_environment(device) -> dict:
    """What this machine has: Python, torch and CUDA, the GPU, the optional packages, Java."""
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "java": java_path(),
        "modules": {m: import_status(m) for m in
                    ("numpy", "PIL", "yaml", "requests", "psutil", "tqdm", "matplotlib", "ts", "model_archiver")},
    }
    return env


def java_path() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


def stub_pillow_if_missing() -> bool:
    """handlers/decoding.py imports Pillow for PNG/JPEG bodies only; these checks send binary OIP tensors.

    Without Pillow, a stand-in ``PIL`` module lets the handlers import (an image body would then fail).
    Returns True if the stand-in was installed.
    """
    if import_status("PIL") is not None:
        return False
    pil = types.ModuleType("PIL")
    image = types.ModuleType("PIL.Image")

    class _Missing(Exception):
        pass

    def _open(*_args, **_kwargs):
        raise RuntimeError("Pillow is not installed (stand-in PIL from scripts/gpu_check.py)")

    image.DecompressionBombError = image.UnidentifiedImageError = _Missing
    image.open = image.new = image.fromarray = image.alpha_composite = _open
    image.Image = object
    pil.Image = image
    sys.modules.update({"PIL": pil, "PIL.Image": image})
    return True


# --------------------------------------------------------------------------- TorchServe's context


class MinimalRequestProcessor:
    """What ``ts.context.RequestProcessor`` keeps for one request: its headers, its status and the
    response headers the handler sets."""

    def __init__(self, request_header: dict):
        self._request_header = request_header
        self._status_code, self._reason_phrase = 200, None
        self._response_header: dict[str, str] = {}

    def get_request_property(self, key):
        return self._request_header.get(key)

    def get_request_properties(self) -> dict:
        return self._request_header

    def report_status(self, code, reason_phrase=None) -> None:
        self._status_code, self._reason_phrase = code, reason_phrase

    def get_response_status_code(self) -> int:
        return self._status_code

    def get_response_status_phrase(self):
        return self._reason_phrase

    def add_response_property(self, key, value) -> None:
        self._response_header[key] = value

    def get_response_headers(self) -> dict:
        return self._response_header


class MinimalContext:
    """Stand-in for ``ts.context.Context`` (TorchServe 0.12) where the ``ts`` package is not installed.

    Exactly what handlers/ use: ``system_properties`` (``model_dir``, ``gpu_id``, ...), ``manifest``,
    ``model_yaml_config``, ``request_processor`` (one :class:`MinimalRequestProcessor` per request),
    ``request_ids``/``get_request_id``, ``get_request_header``/``get_all_request_header``,
    ``set_response_status``, ``set_response_header``/``set_response_content_type``; plus the getters
    this script reads back (``get_response_status``, ``get_response_headers``).
    """

    def __init__(self, model_name, model_dir, manifest, batch_size, gpu, mms_version="minimal",
                 model_yaml_config=None):
        self.model_name = model_name
        self.manifest = manifest
        self.system_properties = {
            "model_dir": model_dir, "gpu_id": gpu, "batch_size": batch_size,
            "server_name": "MMS", "server_version": mms_version, "limit_max_image_pixels": True,
        }
        self.model_yaml_config = model_yaml_config
        self.request_ids = None
        self.request_processor = None
        self.metrics = None

    def get_request_id(self, idx: int = 0):
        return None if self.request_ids is None else self.request_ids.get(idx)

    def get_request_header(self, idx: int, key: str):
        return self.request_processor[idx].get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict:
        return self.request_processor[idx].get_request_properties()

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        if self.request_processor is not None and self.request_processor[idx] is not None:
            self.request_processor[idx].report_status(code, reason_phrase=phrase)

    def get_response_status(self, idx: int):
        processor = self.request_processor[idx]
        return processor.get_response_status_code(), processor.get_response_status_phrase()

    def set_response_header(self, idx, key, value) -> None:
        self.request_processor[idx].add_response_property(key, value)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_headers(self, idx: int) -> dict:
        return self.request_processor[idx].get_response_headers()


def context_api(minimal: bool = False) -> tuple[type, type, str]:
    """``(Context class, RequestProcessor class, label)``: TorchServe's own, else the minimal stand-ins."""
    if not minimal:
        try:
            import ts
            from ts.context import Context, RequestProcessor

            return Context, RequestProcessor, f"ts.context.Context (TorchServe {ts.__version__})"
        except ImportError as err:
            reason = f"ts not importable ({err})"
    else:
        reason = "asked for"
    return MinimalContext, MinimalRequestProcessor, f"MinimalContext from scripts/gpu_check.py: {reason}"


# ------------------------------------------------------------------------ Open Inference Protocol


def oip_codec():
    """``(binary_v2_request, parse_binary_v2_response)`` from client/oip.py (numpy and the standard library only)."""
    from client.oip import binary_v2_request, parse_binary_v2_response

    return binary_v2_request, parse_binary_v2_response


def oip_headers(header_length: int) -> dict[str, str]:
    return {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}


def outputs_of(response: dict) -> dict:
    """OIP response → ``{output name: numpy array}``."""
    import numpy as np

    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in response["outputs"]}


# ------------------------------------------------------------------------------------ inputs, weights


def mnist_test():
    """The 10,000 MNIST test digits, ``(uint8 (N, 28, 28), int64 labels (N,))``, verified by sha256."""
    from train.data import mnist_arrays

    return mnist_arrays("test")


def check_inputs(spec, digits=None):
    """``(wire array, OIP datatype, float32 model input tensor, labels or None)`` for the parity check.

    Image models: the test digits as UINT8 pixels (the handler divides by 255 and normalises) and
    the same digits normalised as training does. Tabular models: seeded rows in [-3, 3].
    """
    import torch

    if spec.is_image_model:
        from train.data import normalize_images

        images, labels = digits if digits is not None else mnist_test()
        return images, "UINT8", normalize_images(images).reshape(len(images), -1), labels
    generator = torch.Generator().manual_seed(15)
    rows = torch.rand(TABULAR_ROWS, spec.input_width, generator=generator) * 6.0 - 3.0
    return rows.numpy(), "FP32", rows, None


def build_requests(array, datatype: str, chunk: int = CHUNK) -> list[tuple[bytes, int, int]]:
    """``(body, json header length, samples)`` binary OIP requests of ``chunk`` samples covering ``array``."""
    encode, _ = oip_codec()
    requests = []
    for start in range(0, len(array), chunk):
        body, header_length = encode(array[start:start + chunk], datatype=datatype)
        requests.append((body, header_length, len(array[start:start + chunk])))
    return requests


def resolve_weights(names: list[str], weights_dir: Path, dest: Path, device, report: Report) -> dict[str, Path]:
    """``<dest>/<name>.pt`` for every model: copied from ``weights_dir``, or trained now when missing there.

    A private copy, so the served archives, the handlers and the CPU reference all read the same file.
    """
    from models.registry import get_spec

    dest.mkdir(parents=True, exist_ok=True)
    found, trained = {}, []
    for name in names:
        source = Path(weights_dir) / f"{name}.pt"
        if source.is_file():
            shutil.copy2(source, dest / source.name)
            found[name] = dest / source.name
            continue
        try:
            from train.trainer import train_model

            started = time.perf_counter()
            metrics = train_model(get_spec(name), dest, device=device, progress=False, log=lambda *a, **k: None)
            seconds = time.perf_counter() - started
        except Exception as err:
            report.check(f"weights[{name}]", "FAIL", f"{source} is missing and training it failed: "
                         f"{type(err).__name__}: {err} (copy or carry weights/ to this machine)")
            continue
        score = metrics.get("test_accuracy", metrics.get("held_out_accuracy"))
        score_text = f"held-out accuracy {score:.2%}" if score is not None else f"held-out R² {metrics.get('held_out_r2', float('nan')):.3f}"
        report.check(f"weights[{name}]", "PASS", f"{source} missing: trained now on {device} in {seconds:.1f} s "
                     f"(registry's training, {score_text})", seconds=round(seconds, 2))
        found[name] = dest / f"{name}.pt"
        trained.append(name)
    copied = [n for n in found if n not in trained]
    if copied:
        report.info(f"weights from {Path(weights_dir).resolve()}: {', '.join(copied)}")
    return found


# --------------------------------------------------------------------------------------- in process


def manifest_for(spec) -> dict:
    """The MANIFEST.json torch-model-archiver writes for this model (the fields the handlers read)."""
    return {
        "runtime": "python",
        "model": {"modelName": spec.name, "serializedFile": f"{spec.name}.pt",
                  "handler": Path(spec.handler).name, "modelFile": Path(spec.model_file).name,
                  "modelVersion": spec.version},
        "archiverVersion": "0.12.0",
    }


def model_yaml_config(spec) -> dict:
    """The archive's model-config.yaml as TorchServe hands it to the handler (serve/package.py's)."""
    try:
        from serve.package import model_config

        return model_config(spec)
    except ImportError:  # serve/package.py needs PyYAML; these are the same numbers
        return {"minWorkers": spec.workers, "maxWorkers": spec.workers, "batchSize": spec.batch_size,
                "maxBatchDelay": spec.max_batch_delay_ms, "responseTimeout": 120}


def gpu_id_of(device) -> int | None:
    """TorchServe's ``gpu_id`` for ``device``: its CUDA index, None for the CPU."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def load_handler(name: str, weights: Path, model_dir: Path, device, api=None):
    """The real handler of model ``name`` initialised like a TorchServe worker that extracted the archive
    into ``model_dir`` and was given ``device``'s GPU (or none). Returns ``(handler, context)``."""
    from handlers.image_classifier import ImageClassifier
    from handlers.tabular import TabularHandler
    from models.registry import get_spec

    spec = get_spec(name)
    Context, _, _ = api or context_api()
    model_dir.mkdir(parents=True, exist_ok=True)
    if weights.resolve() != (model_dir / f"{name}.pt").resolve():
        shutil.copy2(weights, model_dir / f"{name}.pt")
    manifest = manifest_for(spec)
    context = Context(name, str(model_dir), manifest, spec.batch_size, gpu_id_of(device), "0.12.0",
                      model_yaml_config=model_yaml_config(spec))
    handler = (ImageClassifier if spec.is_image_model else TabularHandler)()
    handler.initialize(context)
    return handler, context


def handle_requests(handler, context, requests, api=None) -> tuple[list[int], list[dict]]:
    """Send each ``(body, header length, n)`` through ``handler.handle`` as one TorchServe batch of one
    request, as ts.service.Service does; returns the statuses and the parsed OIP responses."""
    _, RequestProcessor, _ = api or context_api()
    _, decode = oip_codec()
    statuses, responses = [], []
    for i, (body, header_length, _) in enumerate(requests):
        context.request_processor = [RequestProcessor(oip_headers(header_length))]
        context.request_ids = {0: f"gpu-check-{i}"}
        (answer,) = handler.handle([{"body": bytearray(body)}], context)
        statuses.append(context.get_response_status(0)[0])
        response_headers = context.get_response_headers(0)
        responses.append(decode(bytes(answer), response_headers.get("Inference-Header-Content-Length")))
    return statuses, responses


def reference_outputs(spec, weights: Path, x) -> dict:
    """The network on the CPU in this process: ``{"probabilities"|"predictions": array}``."""
    import torch

    model = spec.build()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    with torch.inference_mode():
        out = model.eval()(x.float()).float()
    if spec.task == "classification":
        return {"probabilities": torch.softmax(out, dim=1).numpy()}
    values = out.reshape(len(out), -1).numpy()
    values = values[:, 0] if values.shape[1] == 1 else values
    return {"probabilities" if spec.task == "binary" else "predictions": values}


def compare(spec, statuses: list[int], responses: list[dict], expected: dict, labels=None) -> dict:
    """GPU answers vs CPU reference: ``{"status", "detail", numbers...}`` (PASS within tolerance)."""
    import numpy as np

    bad = [s for s in statuses if s != 200]
    if bad:
        return {"status": "FAIL", "detail": f"{len(bad)} of {len(statuses)} requests answered {sorted(set(bad))}: "
                f"{responses[statuses.index(bad[0])]}"}
    (key, want), = expected.items()
    got = np.concatenate([outputs_of(r)[key] for r in responses]).astype(np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return {"status": "FAIL", "detail": f"{key} has shape {got.shape}, expected {want.shape}"}
    diff = float(np.max(np.abs(got - want)))
    scale = 1.0 if key == "probabilities" else max(1.0, float(np.max(np.abs(want))))
    tolerance = PROB_TOLERANCE * scale
    result = {"samples": int(len(got)), "max_abs_diff": diff, "tolerance": tolerance}
    what = f"{len(got)} {'test digits' if spec.is_image_model else 'seeded rows'}, max |Δ{key}| {diff:.1e}"
    if spec.task != "regression":
        predicted = np.concatenate([outputs_of(r)["predicted_class"] for r in responses])
        reference = want.argmax(axis=1) if want.ndim == 2 else (want >= 0.5).astype(np.int64)
        result["class_mismatches"] = int(np.sum(predicted != reference))
        what += f", predicted class differs on {result['class_mismatches']}"
        if labels is not None:
            result["accuracy"] = float(np.mean(predicted == np.asarray(labels)))
            result["reference_accuracy"] = float(np.mean(reference == np.asarray(labels)))
            what += f", accuracy {result['accuracy']:.2%} (CPU {result['reference_accuracy']:.2%})"
    ok = diff <= tolerance
    result["status"] = "PASS" if ok else "FAIL"
    result["detail"] = f"{what}; {'≤' if ok else 'EXCEEDS'} {tolerance:.0e}"
    return result


def measure_handler(handler, context, request, seconds: float, device, api=None, warmup: float = 0.3) -> dict:
    """Samples/s of ``handler.handle`` answering one request ``(body, header length, n)`` per call,
    wall clock, with ``torch.cuda.synchronize`` around the timed calls on a GPU (``handle`` itself
    waits for its results: it copies the model output to the CPU)."""
    import torch

    _, RequestProcessor, _ = api or context_api()
    body, header_length, n = request
    headers = oip_headers(header_length)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def call():
        context.request_processor = [RequestProcessor(dict(headers))]
        context.request_ids = {0: "gpu-check"}
        handler.handle([{"body": bytearray(body)}], context)
        return context.get_response_status(0)[0]

    status = call()
    if status != 200:
        raise RuntimeError(f"the handler answered {status}: {context.get_response_status(0)[1]}")
    for phase_seconds in (warmup, seconds):
        sync()
        calls, started = 0, time.perf_counter()
        while True:
            call()
            calls += 1
            if time.perf_counter() - started >= phase_seconds:
                break
        sync()
        elapsed = time.perf_counter() - started
    return {"batch": n, "calls": calls, "seconds": round(elapsed, 3), "samples_per_s": calls * n / elapsed,
            "ms_per_call": elapsed / calls * 1e3}


def run_inprocess(report: Report, names: list[str], weights: dict[str, Path], device, work: Path,
                  seconds: float, api=None, digits=None) -> None:
    """The in-process checks: handler on ``device``, parity against the CPU, handler throughput."""
    import torch
    from models.registry import get_spec

    api = api or context_api()
    report.info(f"handlers get their context from {api[2]}")
    want = torch.device(device).type
    digits = digits if digits is not None else (mnist_test() if any(get_spec(n).is_image_model for n in names) else None)
    handlers = {}
    for name in names:
        spec = get_spec(name)
        try:
            handler, context = load_handler(name, weights[name], work / "models" / name, device, api)
        except Exception as err:
            report.check(f"handler[{name}]", "FAIL", f"initialize failed: {type(err).__name__}: {err}")
            continue
        on = {p.device.type for p in handler.model.parameters()}
        ok = handler.device.type == want and on == {want}
        report.check(f"handler[{name}]", "PASS" if ok else "FAIL",
                     f"{type(handler).__name__} serves {name} on {handler.device} (parameters on {', '.join(sorted(on))}; "
                     f"TorchServe gpu_id {context.system_properties['gpu_id']})")
        if not ok:
            continue
        handlers[name] = (handler, context)
        wire, datatype, x, labels = check_inputs(spec, digits)
        try:
            statuses, responses = handle_requests(handler, context, build_requests(wire, datatype), api)
            result = compare(spec, statuses, responses, reference_outputs(spec, weights[name], x), labels)
        except Exception as err:
            result = {"status": "FAIL", "detail": f"{type(err).__name__}: {err}"}
        status, detail = result.pop("status"), result.pop("detail")
        report.check(f"parity[{name}]", status, f"handle() on {handler.device} vs the network on the CPU: {detail}",
                     **result)

    name = throughput_model(list(handlers))
    if name is None:
        report.check("throughput[handler]", "SKIP", "no image model's handler loaded")
        return
    handler, context = handlers[name]
    images = (digits[0] if digits is not None else mnist_test()[0])[:CHUNK]
    for batch in (1, CHUNK):
        label = f"throughput[handler, {name}, {batch} image{'s' if batch > 1 else ''}/request]"
        try:
            (request,) = build_requests(images[:batch], "UINT8", chunk=batch)
            r = measure_handler(handler, context, request, seconds, device, api)
        except Exception as err:
            report.check(label, "FAIL", f"{type(err).__name__}: {err}")
            continue
        report.check(label, "PASS", f"{r['samples_per_s']:,.0f} samples/s on {handler.device} "
                     f"({r['ms_per_call']:.3f} ms per handle() call, {r['calls']} calls in {r['seconds']:.1f} s, wall clock)",
                     **r)


def throughput_model(names: list[str]) -> str | None:
    """mnistnet if there (the model bench/ measures), else the first image model."""
    from models.registry import get_spec

    image_models = [n for n in names if get_spec(n).is_image_model]
    return "mnistnet" if "mnistnet" in image_models else (image_models[0] if image_models else None)


# ------------------------------------------------------------------------------------------- served


def server_unavailable(device) -> str | None:
    """Why TorchServe cannot be started here (Java, ts, model_archiver, serve/'s imports), or None."""
    reasons = []
    if java_path() is None:
        reasons.append("java not found (JAVA_HOME or PATH)")
    for module, what in (("ts", "TorchServe"), ("model_archiver", "torch-model-archiver"),
                         ("serve.server", "serve/server.py"), ("serve.package", "serve/package.py")):
        try:
            importlib.import_module(module)
        except Exception as err:
            reasons.append(f"{what} not importable ({err})")
    return "; ".join(reasons) or None


def post(connection: http.client.HTTPConnection, path: str, body: bytes, headers: dict) -> tuple[int, bytes, str | None]:
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read(), response.getheader("Inference-Header-Content-Length")


def served_answers(port: int, key: str | None, name: str, requests) -> tuple[list[int], list[dict]]:
    """Each ``(body, header length, n)`` POSTed to ``/v2/models/<name>/infer``; statuses and parsed responses."""
    _, decode = oip_codec()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    statuses, responses = [], []
    try:
        for body, header_length, _ in requests:
            headers = oip_headers(header_length)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            status, answer, answer_length = post(connection, f"/v2/models/{name}/infer", body, headers)
            statuses.append(status)
            responses.append(decode(answer, answer_length) if status == 200 else {"error": answer[:300]})
    finally:
        connection.close()
    return statuses, responses


def http_load(port: int, path: str, body: bytes, headers: dict, connections: int, seconds: float,
              samples_per_request: int, warmup: float = 0.5) -> dict:
    """``connections`` threads, each with its own keep-alive connection, POST ``body`` back to back for
    ``seconds`` (after ``warmup``); requests/s, samples/s, latency percentiles, errors. A Python client:
    its numbers are lower bounds of what the server can do."""
    import numpy as np

    start_at = threading.Barrier(connections + 1)
    results: list[list[tuple[float, int]]] = [[] for _ in range(connections)]
    window = {}

    def worker(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            start_at.wait()
            while True:
                now = time.perf_counter()
                if now >= window["end"]:
                    break
                try:
                    status, _, _ = post(connection, path, body, headers)
                except (OSError, http.client.HTTPException):
                    status = -1
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                done = time.perf_counter()
                if now >= window["start"]:
                    results[index].append((done - now, status))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    window["start"] = time.perf_counter() + warmup
    window["end"] = window["start"] + seconds
    start_at.wait()
    for thread in threads:
        thread.join()
    samples = [r for per_thread in results for r in per_thread]
    latencies = np.array([latency for latency, status in samples if status == 200]) * 1e3
    errors = sum(1 for _, status in samples if status != 200)
    ok = len(latencies)
    return {
        "connections": connections, "images_per_request": samples_per_request, "seconds": seconds,
        "requests": ok, "errors": errors, "requests_per_s": ok / seconds,
        "samples_per_s": ok * samples_per_request / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if ok else None,
        "p99_ms": float(np.percentile(latencies, 99)) if ok else None,
    }


def worker_devices(log_dir: Path) -> dict[str, list[str]]:
    """model → the devices its workers logged (``serving <model> (<class>) on <device> with ...``)."""
    import re

    devices: dict[str, list[str]] = {}
    for path in sorted(Path(log_dir).glob("model_log*.log")):
        for match in re.finditer(r"serving (\S+) \((\w+)\) on (\S+) with", path.read_text(errors="replace")):
            devices.setdefault(match.group(1), []).append(match.group(3))
    return devices


def check_workers(report: Report, server, names: list[str], descriptions: dict, want: str, timeout: float = 15.0) -> None:
    """Every worker logged its device and it is of type ``want``; the describe API's gpu flags agree."""
    expected = {name: len(descriptions[name].get("workers", [])) for name in names}
    deadline = time.monotonic() + timeout  # log4j writes asynchronously (async_logging=true)
    while True:
        logged = worker_devices(server.log_dir)
        if all(len(logged.get(n, [])) >= expected[n] for n in names) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    flags = {n: [w.get("gpu") for w in descriptions[n].get("workers", [])] for n in names}
    wrong = {n: logged.get(n, []) for n in names
             if len(logged.get(n, [])) < expected[n] or any(not d.startswith(want) for d in logged.get(n, []))}
    wrong_flags = {n: f for n, f in flags.items() if any(flag is not None and bool(flag) != (want == "cuda") for flag in f)}
    props = load_number_of_gpu()
    summary = ", ".join(f"{n} {'/'.join(logged.get(n, [])) or 'nothing logged'}" for n in names)
    workers = sum(expected.values())
    if wrong or wrong_flags:
        hint = "" if want != "cuda" else (
            f" (config.properties number_of_gpu={props}; TorchServe counts GPUs with nvidia-smi: is it on PATH?)")
        report.check("workers", "FAIL", f"expected every worker on {want}: {summary}; describe gpu flags "
                     f"{flags}{hint}", logged=logged, gpu_flags=flags)
    else:
        report.check("workers", "PASS", f"{workers} workers of {len(names)} models logged 'serving ... on {want}': "
                     f"{summary}; describe API gpu={sorted({str(f) for fl in flags.values() for f in fl})}",
                     logged=logged, gpu_flags=flags)


def load_number_of_gpu() -> str:
    from serve.server import DEFAULT_CONFIG, load_properties

    return load_properties(DEFAULT_CONFIG).get("number_of_gpu", "unset (all GPUs)")


def run_served(report: Report, names: list[str], weights: dict[str, Path], device, work: Path,
               seconds: float, digits=None) -> None:
    """Package, start TorchServe, check the workers' devices, served parity and HTTP throughput, stop."""
    import torch
    from models.registry import get_spec
    from serve.package import package_models
    from serve.server import Ports, Server

    want = torch.device(device).type
    report.info(f"TorchServe: config.properties number_of_gpu={load_number_of_gpu()}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}")
    try:
        started = time.perf_counter()
        store = work / "store"
        package_models(names, weights[names[0]].parent, store, rebuild=True)
        report.check("package", "PASS", f"{len(names)} archives built by serve/package.py in "
                     f"{time.perf_counter() - started:.1f} s into {store}")
    except Exception as err:
        report.check("package", "FAIL", f"{type(err).__name__}: {err}")
        return
    server = Server(ports=Ports.free(), tmpdir=work / "tmp", workdir=work / "work", model_store=store,
                    models=names, log_dir=work / "logs")
    try:
        started = time.perf_counter()
        server.start()
        descriptions = server.wait_ready(timeout=300, progress=False)
        report.check("server", "PASS", f"TorchServe with {len(names)} models READY in {time.perf_counter() - started:.1f} s "
                     f"(inference port {server.ports.inference})", cold_start_s=round(time.perf_counter() - started, 2))
    except Exception as err:
        report.check("server", "FAIL", f"{type(err).__name__}: {err}")
        server.stop()
        return
    try:
        check_workers(report, server, names, descriptions, want)
        key = server.keys().get("inference")
        digits = digits if digits is not None else (mnist_test() if any(get_spec(n).is_image_model for n in names) else None)
        for name in names:
            spec = get_spec(name)
            wire, datatype, x, labels = check_inputs(spec, digits)
            try:
                statuses, responses = served_answers(server.ports.inference, key, name, build_requests(wire, datatype))
                result = compare(spec, statuses, responses, reference_outputs(spec, weights[name], x), labels)
            except Exception as err:
                result = {"status": "FAIL", "detail": f"{type(err).__name__}: {err}"}
            status, detail = result.pop("status"), result.pop("detail")
            report.check(f"served-parity[{name}]", status, f"POST /v2/models/{name}/infer (binary OIP, {CHUNK}/request) "
                         f"vs the network on the CPU: {detail}", **result)

        name = throughput_model(names)
        if name is None:
            report.check("throughput[served]", "SKIP", "no image model served")
            return
        images = (digits[0] if digits is not None else mnist_test()[0])[:CHUNK]
        for connections, batch in SERVED_LOAD:
            (request,) = build_requests(images[:batch], "UINT8", chunk=batch)
            body, header_length, _ = request
            headers = {**oip_headers(header_length), **({"Authorization": f"Bearer {key}"} if key else {})}
            label = f"throughput[served, {name}, {connections} connection{'s' if connections > 1 else ''}, {batch} image{'s' if batch > 1 else ''}/request]"
            r = http_load(server.ports.inference, f"/v2/models/{name}/infer", body, headers, connections, seconds, batch)
            ok = r["requests"] > 0 and r["errors"] == 0
            p50 = f"{r['p50_ms']:.2f}" if r["p50_ms"] is not None else "-"
            p99 = f"{r['p99_ms']:.2f}" if r["p99_ms"] is not None else "-"
            report.check(label, "PASS" if ok else "FAIL",
                         f"{r['requests_per_s']:,.0f} req/s = {r['samples_per_s']:,.0f} samples/s, p50 {p50} ms, p99 {p99} ms, "
                         f"{r['errors']} errors ({r['requests']} requests in {seconds:g} s, Python client threads)", **r)
    finally:
        if report.failed:
            report.info("TorchServe logs, last lines:\n" + server.output_tail(20))
        server.stop()


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR,
                        help="directory of <name>.pt state_dicts (default: weights/); missing ones are trained")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    parser.add_argument("--models", default="all", help="comma-separated model names (default: all seven)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput measurement (default 3)")
    parser.add_argument("--device", help="default: cuda when available; 'cpu' = dry run of the logic on the CPU")
    parser.add_argument("--no-server", action="store_true", help="skip the TorchServe checks even if Java is there")
    parser.add_argument("--minimal-context", action="store_true",
                        help="use MinimalContext even where ts.context.Context can be imported")
    return parser.parse_args(argv)


def write_summary(path: Path | None, summary: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError as err:
        print(f"FAIL torch: not importable ({err}); the GPU check needs PyTorch")
        return 1
    if args.device is None or torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            print(NO_GPU_MESSAGE)
            write_summary(args.out, {"gpu": False, "message": NO_GPU_MESSAGE, "ok": True, "checks": []})
            return 0
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    report = Report()
    env = probe_environment(device)
    gpus = ", ".join(env["gpus"]) or "none"
    report.info(f"python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}), GPUs: {gpus}; "
                f"checking on {device}" + (" (dry run on the CPU: proves nothing about a GPU)" if device.type == "cpu" else ""))
    report.info("modules: " + ", ".join(f"{m} {v or 'MISSING'}" for m, v in env["modules"].items())
                + f"; java {env['java'] or 'MISSING'}")
    if env["modules"]["numpy"] is None:
        report.check("numpy", "FAIL", "not importable: handlers/ and train/ need it (carry a numpy wheel); nothing checked")
        write_summary(args.out, {"gpu": device.type == "cuda", "ok": False, "device": str(device),
                                 "environment": env, "checks": report.checks})
        return 1
    if stub_pillow_if_missing():
        report.info("Pillow missing: a stand-in PIL lets the handlers import (image bodies are not checked)")

    work = Path(tempfile.mkdtemp(prefix="gpuchk-", dir="/tmp"))  # short: TorchServe's socket paths live in it
    started = time.perf_counter()
    try:
        from models.registry import REGISTRY, get_spec

        names = list(REGISTRY) if args.models in ("", "all") else [n.strip() for n in args.models.split(",") if n.strip()]
        for name in names:
            get_spec(name)
        weights = resolve_weights(names, args.weights, work / "weights", device, report)
        names = [n for n in names if n in weights]
        if names:
            api = context_api(minimal=args.minimal_context)
            run_inprocess(report, names, weights, device, work, args.seconds, api)
            reason = "--no-server" if args.no_server else server_unavailable(device)
            if reason:
                report.check("server", "SKIP", f"{reason}: TorchServe's GPU workers, served parity and HTTP "
                             "throughput not checked (the in-process checks above ran the same handlers)")
            else:
                run_served(report, names, weights, device, work, args.seconds)
    except Exception as err:  # a bug or a broken environment: report it as a failed check, keep the summary
        import traceback

        traceback.print_exc()
        report.check("gpu-check", "FAIL", f"stopped by {type(err).__name__}: {err}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    counts = {s: report.count(s) for s in ("PASS", "FAIL", "SKIP")}
    verdict = "FAILED" if report.failed else "OK"
    print(f"gpu-check {verdict}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"on {device} in {time.perf_counter() - started:.0f} s")
    write_summary(args.out, {"gpu": device.type == "cuda", "ok": not report.failed, "device": str(device),
                             "counts": counts, "environment": env, "notes": report.notes, "checks": report.checks})
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
