"""ServingHandler: the TorchServe handler lifecycle and batching shared by every served model.

It loads the archive's network once per worker, then answers each batch: every request is decoded on its
own (handlers/protocols.py), the valid predictions share one forward pass and the explanations one
Integrated Gradients call (handlers/explain.py), and each request gets its answer in its own protocol. A bad
request gets its own JSON error (4xx; 500 for an internal failure) without failing the others. Subclasses
turn model output into the named outputs of ``ModelSpec.outputs`` (``postprocess``).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch

from handlers import explain, protocols, tracing
from handlers.decoding import InputError
from handlers.jsoncodec import json_loads
from handlers.metrics import ModelMetrics
from models.registry import get_spec

logger = logging.getLogger(__name__)

THREADS_ENV = "HANDLER_NUM_THREADS"
DEFAULT_THREADS = 1
# Response header naming the model version (the archive manifest's) that answered, on every protocol's HTTP answer.
VERSION_HEADER = "X-Model-Version"


def select_device(gpu_id: int | None, cuda_available: bool) -> torch.device:
    """``cuda:<gpu_id>`` when CUDA is available and TorchServe assigned a GPU, else ``cpu``.

    TorchServe passes ``gpu_id`` None when it runs the worker without a GPU (no GPU found, or
    ``number_of_gpu=0``), so a machine with CUDA can still be told to serve on CPU.
    """
    if cuda_available and gpu_id is not None:
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def thread_count(handler_config: dict | None = None, environ: dict | None = None) -> int:
    """Intra-op threads per worker: env ``HANDLER_NUM_THREADS``, else ``num_threads`` in the
    model-config YAML's ``handler:`` section, else 1.

    Why 1: every TorchServe worker is its own process, and torch's default of one thread per core in
    each of them oversubscribes the CPU; these small nets gain nothing from splitting a batch (measured:
    bench/README.md, "Tuning conclusions"). More workers are the way to use more cores.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(THREADS_ENV) or (handler_config or {}).get("num_threads") or DEFAULT_THREADS
    try:
        threads = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{THREADS_ENV}/num_threads must be a positive integer; got {value!r}") from None
    if threads < 1:
        raise ValueError(f"{THREADS_ENV}/num_threads must be a positive integer; got {threads}")
    return threads


def resolve_model_name(manifest: dict, handler_config: dict | None = None) -> str:
    """Registry name of the network to serve: ``model_name`` in the model-config YAML's ``handler:`` section
    (an archive served under another name, e.g. a canary), else the manifest's ``modelName`` (what
    ``torch-model-archiver --model-name`` wrote, which serve/package.py sets to the registry name).
    """
    if (handler_config or {}).get("model_name"):
        return str(handler_config["model_name"])
    name = (manifest or {}).get("model", {}).get("modelName")
    if not name:
        raise RuntimeError("cannot tell which model to serve: the archive names none (manifest modelName)")
    return name


class ServingHandler:
    """Base handler; subclasses set ``tasks`` (the ModelSpec tasks they serve) and implement ``postprocess``."""

    tasks: tuple[str, ...] = ()
    # The JSON parser for request bodies that TorchServe decodes before the handler sees them; the leaner
    # worker loop (serve/torchserve/worker.py) takes it from the loaded handler.
    json_loads = staticmethod(json_loads)

    def __init__(self):
        self.spec = None
        self.model = None
        self.device = torch.device("cpu")
        self.model_name = None
        self.model_version = None
        self.metrics = ModelMetrics(None, "", "")  # off until initialize() finds the metrics declared
        self._explainer = None
        self.initialized = False
        # The running batch's request IDs (by batch row) and per-request stage times in ms (handlers/tracing.py).
        self.request_ids: list = []
        self._traces: list = []
        self._timing: list = []

    # ----------------------------------------------------------------------------------- lifecycle

    def initialize(self, context) -> None:
        """Build the registry's network for this archive and load its weights (``serializedFile``).

        Weights are a state_dict loaded with ``torch.load(weights_only=True)`` straight onto the
        device chosen by :func:`select_device`; the model is put in eval mode (dropout off).
        """
        properties = context.system_properties
        manifest = context.manifest or {}
        handler_config = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
        model_dir = properties.get("model_dir") or ""

        torch.set_num_threads(thread_count(handler_config))
        self.device = select_device(properties.get("gpu_id"), torch.cuda.is_available())
        self.spec = get_spec(resolve_model_name(manifest, handler_config))
        if self.tasks and self.spec.task not in self.tasks:
            raise RuntimeError(
                f"{type(self).__name__} serves {'/'.join(self.tasks)} models; "
                f"{self.spec.name!r} is a {self.spec.task} model"
            )
        self.model = self._load_model(manifest, model_dir)
        model_info = manifest.get("model", {})
        self.model_name = model_info.get("modelName", self.spec.name)
        self.model_version = model_info.get("modelVersion", self.spec.version)
        self.metrics = ModelMetrics(getattr(context, "metrics", None), self.model_name, self.spec.task)
        self.initialized = True
        logger.info(
            "serving %s (%s) on %s with %d thread(s)",
            self.model_name, self.spec.model_class.__name__, self.device, torch.get_num_threads(),
        )

    def _load_model(self, manifest: dict, model_dir: str) -> torch.nn.Module:
        serialized = manifest.get("model", {}).get("serializedFile")
        if not serialized:
            raise RuntimeError(f"the archive for {self.spec.name!r} has no serialized weights (serializedFile)")
        path = os.path.join(model_dir, serialized)
        state_dict = torch.load(path, map_location=self.device, weights_only=True)
        model = self.spec.build()
        model.load_state_dict(state_dict)
        return model.to(self.device).eval()

    # -------------------------------------------------------------------------------------- serving

    def handle(self, data: list, context) -> list:
        """Answer a batch of requests: one response per request, in order (see module docstring)."""
        metrics = self.metrics
        metrics.begin()
        started = time.perf_counter()
        envelope = protocols.envelope_kind(data, context)  # rows from a TorchServe request envelope?
        status_context = None if envelope else context  # envelope rows are not requests: set no status
        responses: list[Any] = [None] * len(data)
        pending, explaining = [], []  # (index, protocols.Decoded) of every valid prediction / explanation
        headers = [{} if envelope else protocols.request_headers(context, idx) for idx in range(len(data))]
        frontend_ids = [_torchserve_id(context, idx) for idx in range(len(data))]
        self.request_ids = ids = [tracing.request_id(h, i) for h, i in zip(headers, frontend_ids)]
        now_us = time.time_ns() // 1000
        self._timing = [{"queue": tracing.queue_ms(i, now_us)} for i in frontend_ids]
        self._traces = [tracing.trace_id(h) for h in headers]
        tracing.log_context.begin(ids, self._traces)
        try:
            return self._handle(data, context, envelope, status_context, responses, pending, explaining, headers,
                                started)
        finally:
            tracing.log_context.end()

    def _handle(self, data, context, envelope, status_context, responses, pending, explaining, headers, started):
        metrics = self.metrics
        timing = self._timing
        for idx, request in enumerate(data):
            begun = time.perf_counter()
            try:
                if envelope:
                    decoded = protocols.decode_envelope_row(request, self.spec, idx, envelope)
                else:
                    decoded = protocols.decode_request(request, self.spec, headers[idx])
                    if decoded.oip is not None and decoded.oip.id is not None:
                        self._name_request(status_context, idx, headers[idx], decoded.oip.id)
                if decoded.explain is not None:
                    options = explain.options(decoded.explain, self.spec, len(decoded.samples))
                    explaining.append((idx, decoded, options))
                else:
                    pending.append((idx, decoded))
            except InputError as err:
                if getattr(err, "request_id", None) is not None:  # an OIP body's id names even its error
                    self._name_request(status_context, idx, headers[idx], err.request_id)
                responses[idx] = self._error(status_context, idx, err.status, err.message)
            except Exception:
                logger.exception("decoding request %d failed unexpectedly", idx)
                responses[idx] = self._error(status_context, idx, 500, "internal error while reading the request")
            timing[idx]["decode"] = (time.perf_counter() - begun) * 1000
        metrics.stage("decode", time.perf_counter() - started)
        if pending:
            self._predict(pending, responses, context, status_context)
        if explaining:
            self._explain(explaining, responses, context, status_context)
        if status_context is not None:  # (the frontend writes X-Request-ID: serve/torchserve/java/Session.java)
            for idx in range(len(data)):
                protocols.set_header(context, idx, tracing.SERVER_TIMING, tracing.server_timing(timing[idx]))
        for idx in range(len(getattr(context, "request_processor", None) or [])):  # which version answered
            protocols.set_header(context, idx, VERSION_HEADER, self.model_version or "")
        if envelope:  # Python values: the envelope wraps them into one JSON response per request
            for idx in range(len(context.request_processor or [])):
                protocols.set_content_type(context, idx)
            metrics.flush()
            return responses
        answers = [r if isinstance(r, (bytes, bytearray)) else encode_json(r) for r in responses]
        metrics.flush()
        return answers

    def _predict(self, pending: list, responses: list, context, status_context) -> None:
        """One forward pass over all valid requests' samples, then each request's response."""
        metrics = self.metrics
        started = time.perf_counter()
        try:
            # One request (a lone caller, or one request carrying many samples): its own array, not a copy.
            samples = pending[0][1].samples if len(pending) == 1 else np.concatenate(
                [decoded.samples for _, decoded in pending])
            outputs = self.forward(samples)
        except Exception as err:
            logger.exception("forward pass failed for a batch of %d request(s)", len(pending))
            for idx, _ in pending:
                responses[idx] = self._error(status_context, idx, 500, f"inference failed: {type(err).__name__}")
            return
        encoding = time.perf_counter()
        metrics.stage("forward", encoding - started)
        forward_ms = (encoding - started) * 1000  # the batch's forward pass, which its requests share
        try:  # postprocess works row by row: one call for the batch, sliced per request below
            batch_named = self.postprocess(outputs)
        except Exception:  # then one call per request, so that a failure stays with its request
            batch_named = None
        answered = []  # each answered request's named outputs, for the metrics
        start = 0
        for idx, decoded in pending:
            rows = slice(start, start + len(decoded.samples))
            start = rows.stop
            begun = time.perf_counter()
            try:
                if batch_named is None:
                    named = self.postprocess(outputs[rows])
                else:
                    named = {name: array[rows] for name, array in batch_named.items()}
                responses[idx] = protocols.encode_response(decoded, named, self, context, idx)
                answered.append(named)
            except Exception as err:
                logger.exception("postprocessing request %d failed", idx)
                responses[idx] = self._error(status_context, idx, 500, f"postprocessing failed: {type(err).__name__}")
            self._timing[idx].update(infer=forward_ms, encode=(time.perf_counter() - begun) * 1000)
        metrics.stage("encode", time.perf_counter() - encoding)
        metrics.predictions(answered)

    def _explain(self, explaining: list, responses: list, context, status_context) -> None:
        """Integrated Gradients for every valid explanation request of the batch, then each one's answer."""
        metrics = self.metrics
        started = time.perf_counter()
        samples = np.concatenate([decoded.samples for _, decoded, _ in explaining])
        targets, steps = [], []
        for _, decoded, options in explaining:
            n = len(decoded.samples)
            targets += options.target if options.target is not None else [None] * n
            steps += [options.steps] * n
        try:
            if self._explainer is None:
                self._explainer = explain.Explainer(self.model, self.spec, self.device)
            result = self._explainer.explain(samples, targets, steps)
        except Exception as err:
            logger.exception("explaining a batch of %d request(s) failed", len(explaining))
            for idx, _, _ in explaining:
                responses[idx] = self._error(status_context, idx, 500, f"explanation failed: {type(err).__name__}")
            return
        explain_ms = (time.perf_counter() - started) * 1000  # the batch's, which its requests share
        metrics.stage("explain", explain_ms / 1000)
        start = 0
        for idx, decoded, options in explaining:
            begun = time.perf_counter()
            n = len(decoded.samples)
            rows, start = slice(start, start + n), start + n
            part = {key: value[rows] for key, value in result.items()}
            try:
                model_outputs = self.postprocess(torch.from_numpy(part["outputs"]))
                responses[idx] = protocols.encode_explanation(
                    decoded, options, model_outputs, part, self, context, idx)
            except Exception as err:
                logger.exception("encoding explanation %d failed", idx)
                responses[idx] = self._error(status_context, idx, 500, f"encoding the explanation failed: {type(err).__name__}")
            self._timing[idx].update(explain=explain_ms, encode=(time.perf_counter() - begun) * 1000)

    def forward(self, samples: np.ndarray) -> torch.Tensor:
        """The model's output for float32 ``samples`` (N, *input_shape), on the CPU."""
        with torch.inference_mode():
            return self.model(torch.from_numpy(samples).to(self.device)).cpu()

    def postprocess(self, output: torch.Tensor) -> dict[str, np.ndarray]:
        """Named output arrays for rows of model output (first axis = samples), row by row: called once per
        batch, its arrays are then sliced per request.

        Exactly the outputs of ``self.spec.outputs`` (names, dtypes, per-sample shapes): they become the
        OIP ``outputs`` and the KServe v1 predictions; :meth:`to_native` turns them into native JSON.
        """
        raise NotImplementedError

    def to_native(self, outputs: dict[str, np.ndarray], is_list: bool) -> Any:
        """Native JSON response; default ``{name: values as nested lists}`` for every output."""
        return {name: array.tolist() for name, array in outputs.items()}

    def _name_request(self, context, idx: int, headers: dict, oip_id: str) -> None:
        """An OIP body's ``id`` is request ``idx``'s ID when the caller sent no usable ``X-Request-ID``: in its
        error body and log lines here, and (answer header ``X-Request-ID``) the frontend's header and access
        log (serve/torchserve/java/Session.java)."""
        if context is None or tracing.request_id(headers) is not None or self.request_ids[idx] == oip_id:
            return
        self.request_ids[idx] = oip_id
        protocols.set_header(context, idx, tracing.REQUEST_ID_HEADER, oip_id)
        tracing.log_context.begin(self.request_ids, self._traces)

    def _error(self, context, idx: int, status: int, message: str) -> dict:
        """Mark request ``idx`` failed with ``status`` (when the context has that request) and return
        its JSON error body, which names the request's ID (handlers/tracing.py)."""
        self.metrics.rejected(status, message)
        request_id = self.request_ids[idx] if idx < len(self.request_ids) else None
        logger.info("request %s answered %d: %s", request_id, status, message)
        if protocols.has_request(context, idx):
            # The message doubles as the HTTP reason phrase: keep it one printable ASCII line.
            phrase = " ".join(message.encode("ascii", "replace").decode().split())[:200]
            context.set_response_status(status, phrase, idx)
            protocols.set_content_type(context, idx)
        return {"error": message, "code": status, "request_id": request_id}


def _torchserve_id(context, idx: int) -> str | None:
    """The ID TorchServe's frontend gave batch row ``idx`` (None when the context has none)."""
    try:
        return context.get_request_id(idx)
    except Exception:  # a context without request IDs
        return None


encode_json = protocols.encode_json
