"""Wire protocols: one request in → float32 samples; named output arrays → that protocol's response.

``ServingHandler`` (handlers/base.py) only sees decoded samples and named outputs; this module is
the only one that knows request and response formats. Which one a request uses:

1. header ``inference-header-content-length`` present → **Open Inference Protocol (KServe v2) with the
   binary tensor extension** (Triton's ``extension_binary_data.md``, what ``tritonclient.http`` sends):
   the body is N bytes of JSON header, then the raw little-endian row-major bytes of every input whose
   ``parameters.binary_data_size`` is set, in input order; other inputs carry JSON ``data``.
2. a KServe route (``/v1/models/{m}:predict``, ``/v2/models/{m}[/versions/{v}]/infer``; see
   :func:`is_kserve_route`) → ``{"instances": [...]}`` is **KServe v1**, anything else must be OIP JSON
   with ``inputs`` (else 400): no native forms there.
3. otherwise (``/predictions``) a JSON object with ``inputs`` → OIP JSON, ``{"instances": [...]}`` →
   KServe v1, anything else → the native forms of handlers/decoding.py.

OIP request: exactly one input ``{"name", "shape", "datatype", "data" | parameters.binary_data_size}``;
datatype FP16/FP32/FP64, (U)INT8..64 (BOOL, BYTES → 400); shape ``[N, 784]``, ``[N, 28, 28]`` or
``[N, 1, 28, 28]`` (images) or ``[N, W]`` (``[N]`` when W == 1), 1 <= N <= MAX_SAMPLES; UINT8 image
data are 0..255 pixels (divided by 255), other datatypes intensities in [0, 1]. Optional request
``id``, ``parameters.binary_data_output`` and ``outputs: [{"name", "parameters": {"binary_data"}}]``.
Every size is checked against the bytes actually received before anything is allocated.

OIP response: ``{"model_name", "model_version", "id", "outputs": [{"name", "datatype", "shape",
"data"}]}`` with the model's outputs (``ModelSpec.outputs``; only the requested ones, in the requested
order, if ``outputs`` was given; an unknown name → 400). ``id`` echoes the request's, else TorchServe's
request id. An output is binary when its ``parameters.binary_data`` is true, else when the request's
``parameters.binary_data_output`` is true: its entry then has ``parameters: {"binary_data_size": n}``
instead of ``data``, the body is the JSON header followed by the binary outputs' bytes in output order,
with response headers ``Inference-Header-Content-Length: <JSON length>`` and Content-Type
``application/octet-stream``. Without binary outputs: plain JSON, ``application/json``.
Header ``explain: True`` (``/explanations``, ``/v1/models/{m}:explain``, ``/v2/models/{m}/explain``) →
an explanation (handlers/explain.py): the request decodes as above and ``Decoded.explain`` carries its
parameters (``target``, ``steps``); OIP explanations answer the outputs of ``explain.oip_outputs``.

KServe v1: ``{"instances": [i0, i1, ...]}`` → ``{"predictions": [p0, p1, ...]}``, one per instance, in
order. Image instance: one 28x28 image or 784 intensities, or ``{"data"|"b64": "<base64 PNG/JPEG>"}``.
Tabular instance: one row of W numbers (W == 1: a bare number too). A prediction is the model's single
output for that instance (regression: the number), or, for several outputs, an object of them keyed by
their OIP names: images ``{"probabilities": [...], "predicted_class": k}``, mlp
``{"probabilities": p(class 1), "predicted_class": c}``. A bad instance → 400 naming ``instances[i]``.

Errors of every protocol are JSON ``{"error": "<message>", "code": <status>}`` (handlers/base.py).
"""
from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlers.decoding import (
    JPEG_MAGIC,
    MAX_SAMPLES,
    PNG_MAGIC,
    V2_DATATYPES,
    InputError,
    _check_count,
    _finish,
    _fmt_shape,
    _is_int,
    _parse_json,
    _short,
    _type_name,
    _what,
    decode_image_bytes,
    decode_native,
    numeric_array,
    parse_payload,
    request_payload,
)
from handlers.jsoncodec import encode_json

HEADER_LENGTH = "inference-header-content-length"  # request header names arrive lowercased
OIP_REQUEST = "oip-request"
EXPLAIN = "explain"
URL_PATH = "url_path"
RESPONSE_HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"

# Little-endian numpy dtype of every OIP datatype we read or write.
NUMPY_DTYPES = {
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
    **{f"UINT{b}": f"<u{b // 8}" for b in (8, 16, 32, 64)},
    **{f"INT{b}": f"<i{b // 8}" for b in (8, 16, 32, 64)},
}


@dataclass
class OipRequest:
    """What an OIP response needs from its request: the id and the outputs to return, with binary flags."""

    id: Any
    outputs: list[tuple[str, bool]]  # (name, as binary) in response order


@dataclass
class Decoded:
    """One decoded request: float32 ``samples`` (N, *input_shape) and how to answer it.

    ``kind``: ``native`` (``is_list`` False when a single sample was sent), ``oip`` (``oip`` set),
    ``v1`` (KServe v1), or ``instance``/``tensor`` (one row of a TorchServe request envelope).
    ``explain``: None for a prediction; for an explanation request its raw parameters (a dict, maybe
    empty), validated later by ``explain.options``.
    """

    samples: np.ndarray
    kind: str
    is_list: bool = True
    oip: OipRequest | None = field(default=None)
    explain: dict | None = field(default=None)


# --------------------------------------------------------------------------------------- requests


def request_headers(context, idx: int) -> dict[str, str]:
    """Request ``idx``'s text headers with lowercased names; empty when the context has no such request."""
    if not has_request(context, idx):
        return {}
    try:
        headers = context.get_all_request_header(idx) or {}
    except Exception:  # a context without per-request headers
        return {}
    return {str(k).lower(): v.decode("latin-1") if isinstance(v, bytes) else v
            for k, v in headers.items() if isinstance(v, (str, bytes))}


def has_request(context, idx: int) -> bool:
    """True when TorchServe's context holds a request processor for batch row ``idx``.

    TorchServe's own ``kserve``/``kservev2`` envelopes hand ``handle`` one row per instance, which
    can be more rows than requests: statuses and headers of those rows must not be set.
    """
    processors = getattr(context, "request_processor", None)
    return processors is not None and 0 <= idx < len(processors) and processors[idx] is not None


def decode_request(request: Any, spec, headers: dict[str, str] | None = None) -> Decoded:
    """Decode one TorchServe request dict for ``spec`` (a ``models.registry.ModelSpec``); see module doc."""
    headers = headers or {}
    payload = request_payload(request)
    kserve = is_kserve_route(headers)
    explain = is_explain(headers)
    if HEADER_LENGTH in headers:
        header, binary = split_binary_body(payload, headers[HEADER_LENGTH])
        decoded, body = decode_oip(header, spec, binary, explain=explain), header
    elif kserve:
        body = _oip_json(payload)
        if isinstance(body, dict) and "instances" in body and "inputs" not in body:
            decoded = Decoded(decode_instances(body["instances"], spec), "v1")
        else:
            decoded = decode_oip(body, spec, explain=explain)
    else:
        decoded, body = _decode_payload(payload, spec, explain=explain)
    if explain:
        decoded.explain = explain_parameters(decoded, body, request, headers)
    return decoded


def is_explain(headers: dict[str, str]) -> bool:
    """True for a request TorchServe routed from an explanation URL (header ``explain: True``)."""
    return str(headers.get(EXPLAIN, "")).strip().lower() == "true"


def explain_parameters(decoded: Decoded, body: Any, request: Any, headers: dict[str, str] | None = None) -> dict:
    """An explanation request's raw parameters: OIP ``parameters``; KServe v1 ``parameters`` or top-level
    keys; a native JSON object's keys; over form fields ``target``/``steps``; over headers
    ``X-Explain-Target``/``X-Explain-Steps`` (any body, e.g. a PNG)."""
    from handlers import explain

    found = explain.text_parameters(request, headers)
    if decoded.kind == "oip":
        found.update(explain.read_parameters(body.get("parameters"), "'parameters'"))
    elif isinstance(body, dict):
        found.update(explain.read_parameters(body, "the request"))
        if decoded.kind == "v1" and "parameters" in body:
            found.update(explain.read_parameters(body["parameters"], "'parameters'"))
    return found


def is_kserve_route(headers: dict[str, str]) -> bool:
    """True for a request TorchServe routed from ``/v1/models/{m}:predict|explain`` or
    ``/v2/models/{m}[/versions/{v}]/infer|explain``, where only the KServe protocols are spoken.

    TorchServe 0.12's InferenceRequestHandler adds header ``explain`` on those routes and on
    ``/predictions|/explanations``, but ``url_path`` only on the latter; serve/java adds ``oip-request: v2``
    on the versioned ``/v2`` route. (Legacy ``/invocations`` and ``/{m}/predict`` add neither: native.)
    """
    if str(headers.get(OIP_REQUEST, "")).strip().lower() == "v2":
        return True
    return EXPLAIN in headers and URL_PATH not in headers


def decode_payload(payload: Any, spec) -> Decoded:
    """Decode a body that came without protocol headers: OIP JSON, KServe v1 or a native form."""
    return _decode_payload(payload, spec)[0]


def _decode_payload(payload: Any, spec, explain: bool = False) -> tuple[Decoded, Any]:
    """:func:`decode_payload`, also returning the parsed body (image bytes for an image)."""
    body = parse_payload(payload)
    if is_v2_request(body):
        return decode_oip(body, spec, explain=explain), body
    if isinstance(body, dict) and "instances" in body:
        return Decoded(decode_instances(body["instances"], spec), "v1"), body
    samples, is_list = decode_native(body, spec)
    return Decoded(samples, "native", is_list), body


def is_v2_request(body: Any) -> bool:
    """True when ``body`` is an Open Inference Protocol (KServe v2) request: a dict with key ``inputs``."""
    return isinstance(body, dict) and "inputs" in body


def _oip_json(payload: Any) -> Any:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        raw = bytes(payload)
        if raw.startswith(PNG_MAGIC) or raw.startswith(JPEG_MAGIC):
            raise InputError("an Open Inference Protocol request must be JSON with 'inputs', not an image")
        if not raw.strip():
            raise InputError("empty request body; an Open Inference Protocol request needs JSON with 'inputs'")
        try:
            payload = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InputError(
                "request body is not UTF-8 JSON; binary tensor data needs the Inference-Header-Content-Length header"
            ) from None
    if isinstance(payload, str):
        if not payload.strip():
            raise InputError("empty request body; an Open Inference Protocol request needs JSON with 'inputs'")
        return _parse_json(payload)
    return payload


# ------------------------------------------------------------------------- binary tensor extension


def split_binary_body(payload: Any, header_length: Any) -> tuple[Any, memoryview]:
    """``(JSON header, binary section)`` of a binary-extension body; the binary section is a view, not a copy.

    A body TorchServe already parsed as JSON (sent as application/json) has no binary section.
    """
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        return payload, memoryview(b"")
    body = memoryview(payload).cast("B")
    text = str(header_length).strip()
    if not re.fullmatch(r"[+-]?\d{1,100}", text):
        raise InputError(f"Inference-Header-Content-Length must be an integer; got {_short(text)}")
    length = int(text)
    if length < 0:
        raise InputError(f"Inference-Header-Content-Length must not be negative; got {length}")
    if length > len(body):
        raise InputError(
            f"Inference-Header-Content-Length is {length} but the body has only {len(body)} bytes"
        )
    if length == 0:
        raise InputError("Inference-Header-Content-Length is 0: the body has no JSON inference header")
    try:
        text = bytes(body[:length]).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(
            f"the first {length} bytes of the body (Inference-Header-Content-Length) are not UTF-8 JSON"
        ) from None
    try:
        header = _parse_json(text)
    except InputError as err:
        raise InputError(f"the JSON inference header ({length} bytes) is not valid JSON: {err.message}") from None
    return header, body[length:]


def _binary_sizes(inputs: list, binary: memoryview | None) -> list[int | None]:
    """Each input's ``binary_data_size`` (None when it carries JSON data); they must add up to the binary section."""
    sizes = []
    for i, tensor in enumerate(inputs):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if parameters is not None and not isinstance(parameters, dict):
            raise InputError(f"inputs[{i}].parameters must be an object; got {_what(parameters)}")
        size = (parameters or {}).get("binary_data_size")
        if size is not None and not (_is_int(size) and size >= 0):
            raise InputError(
                f"inputs[{i}].parameters.binary_data_size must be a non-negative integer; got {_what(size)}"
            )
        sizes.append(size)
    declared = sum(s for s in sizes if s is not None)
    received = 0 if binary is None else len(binary)
    if declared and binary is None:
        raise InputError(
            "inputs declare binary_data_size but the request has no Inference-Header-Content-Length header"
        )
    if declared > received:
        raise InputError(
            f"inputs declare {declared} bytes of binary data but the body holds only {received} after the JSON header"
        )
    if declared < received:
        raise InputError(
            f"the body holds {received} bytes after the JSON header but inputs declare only {declared}: "
            f"{received - declared} trailing bytes"
        )
    return sizes


# -------------------------------------------------------------------------------- OIP decoding


def decode_oip(body: Any, spec, binary: memoryview | None = None, explain: bool = False) -> Decoded:
    """Decode an OIP request (JSON header ``body``, plus its ``binary`` section for the binary extension)."""
    if not isinstance(body, dict):
        raise InputError(
            f"an Open Inference Protocol request must be a JSON object with 'inputs'; got {_what(body)}"
        )
    if "inputs" not in body:
        keys = ", ".join(repr(k) for k in sorted(map(str, body))) or "none"
        raise InputError(
            f"the Open Inference Protocol request has no 'inputs' (KServe v1 sends 'instances'); got keys: {keys}"
        )
    inputs = body["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1:
        got = f"{len(inputs)} inputs" if isinstance(inputs, list) else _type_name(inputs)
        raise InputError(f"'inputs' must be a list holding exactly one input tensor; got {got}")
    (size,) = _binary_sizes(inputs, binary)
    request = _oip_request(body, spec, explain)
    return Decoded(_decode_tensor(inputs[0], spec, binary if size is not None else None), "oip", oip=request)


def _oip_request(body: dict, spec, explain: bool = False) -> OipRequest:
    """The request's id and its requested outputs (name, binary?), checked against ``spec.outputs``
    (an explanation's: ``explain.oip_outputs(spec)``)."""
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InputError(f"'parameters' must be an object; got {_what(parameters)}")
    binary_all = parameters.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise InputError(f"parameters.binary_data_output must be true or false; got {_what(binary_all)}")
    known = [name for name, _, _ in output_specs(spec, explain)]
    requested = body.get("outputs")
    if requested is None:
        return OipRequest(body.get("id"), [(name, binary_all) for name in known])
    if not isinstance(requested, list) or not requested:
        raise InputError(f"'outputs' must be a non-empty list of {{\"name\": ...}} objects; got {_what(requested)}")
    outputs = []
    for i, output in enumerate(requested):
        name = output.get("name") if isinstance(output, dict) else None
        if not isinstance(name, str):
            raise InputError(f"outputs[{i}] must be an object with a string 'name'; got {_what(output)}")
        if name not in known:
            raise InputError(f"outputs[{i}] names unknown output {_short(name)}; the outputs of model "
                             f"{spec.name!r} are " + ", ".join(repr(k) for k in known))
        if any(name == seen for seen, _ in outputs):
            raise InputError(f"outputs[{i}] requests {name!r} twice")
        out_parameters = output.get("parameters") or {}
        if not isinstance(out_parameters, dict):
            raise InputError(f"outputs[{i}].parameters must be an object; got {_what(out_parameters)}")
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in out_parameters:
                raise InputError(f"outputs[{i}].parameters.{unsupported} is not supported by this server")
        binary = out_parameters.get("binary_data", binary_all)
        if not isinstance(binary, bool):
            raise InputError(f"outputs[{i}].parameters.binary_data must be true or false; got {_what(binary)}")
        outputs.append((name, binary))
    return OipRequest(body.get("id"), outputs)


def _decode_tensor(tensor: Any, spec, binary: memoryview | None) -> np.ndarray:
    """Samples from ``inputs[0]``: JSON ``data``, or (``binary`` given) exactly the bytes of the binary section."""
    if not isinstance(tensor, dict):
        raise InputError(f"inputs[0] must be an object with shape, datatype and data; got {_type_name(tensor)}")
    missing = [k for k in ("shape", "datatype") if k not in tensor]
    if binary is None and "data" not in tensor:
        missing.append("data")
    if missing:
        raise InputError(f"inputs[0] is missing {', '.join(repr(k) for k in missing)}")
    if binary is not None and "data" in tensor:
        raise InputError("inputs[0] has both 'data' and parameters.binary_data_size; send one of them")
    datatype = tensor["datatype"]
    if datatype not in V2_DATATYPES:
        raise InputError(
            f"inputs[0].datatype must be one of {', '.join(V2_DATATYPES)}; got {_short(datatype)}"
            + (" (this model takes numbers)" if datatype in ("BOOL", "BYTES") else "")
        )
    shape = _v2_shape(tensor["shape"], spec)
    count = math.prod(shape)
    if binary is not None:
        dtype = np.dtype(NUMPY_DTYPES[datatype])
        if len(binary) != count * dtype.itemsize:
            raise InputError(
                f"inputs[0].parameters.binary_data_size is {len(binary)} bytes but shape {_fmt_shape(shape)} of "
                f"{datatype} needs {count} x {dtype.itemsize} = {count * dtype.itemsize} bytes"
            )
        values = np.frombuffer(binary, dtype=dtype).reshape(shape[0], -1)  # a view of the received bytes
        if dtype.kind == "f" and not np.all(np.isfinite(values)):
            raise InputError("inputs[0] binary data holds NaN or infinite values; they are not allowed")
    else:
        values = numeric_array(tensor["data"], "inputs[0].data")
        if values.ndim > 1 and values.shape != shape:
            raise InputError(
                f"inputs[0].data is nested with shape {_fmt_shape(values.shape)} but shape says {_fmt_shape(shape)}"
            )
        if values.size != count:
            raise InputError(f"inputs[0].shape {_fmt_shape(shape)} holds {count} values but data has {values.size}")
        values = _check_integers(values.reshape(shape[0], -1), datatype)
    if spec.is_image_model and datatype == "UINT8":
        values = values / 255.0
    return _finish(values, spec)


def _v2_shape(shape: Any, spec) -> tuple[int, ...]:
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and d >= 0 for d in shape):
        raise InputError(f"inputs[0].shape must be a list of non-negative integers; got {_short(shape)}")
    shape = tuple(shape)
    if math.prod(shape) > MAX_SAMPLES * spec.input_width:
        raise InputError(
            f"too many samples: inputs[0].shape {_short(list(shape))} holds more than {MAX_SAMPLES} samples "
            f"of {spec.input_width} values; split the request",
            status=413,
        )
    if spec.is_image_model:
        h, w = spec.image_size
        allowed = [(h * w,), (h, w), (1, h, w)]
        expected = f"[N, {h * w}], [N, {h}, {w}] or [N, 1, {h}, {w}]"
    else:
        allowed = [(spec.input_width,)] + ([()] if spec.input_width == 1 else [])
        expected = f"[N, {spec.input_width}]" + (" or [N]" if spec.input_width == 1 else "")
    if shape[1:] not in allowed:
        raise InputError(f"inputs[0].shape must be {expected} for model {spec.name!r}; got {_fmt_shape(shape)}")
    if shape[0] == 0:
        raise InputError("inputs[0].shape has N = 0 samples; send at least one")
    _check_count(shape[0])
    return shape


def _check_integers(values: np.ndarray, datatype: str) -> np.ndarray:
    bounds = V2_DATATYPES[datatype]
    if bounds is None:
        return values
    if not np.all(values == np.floor(values)):
        raise InputError(f"datatype {datatype} needs integer values; inputs[0].data has fractions")
    lo, hi = bounds
    low, high = values.min(), values.max()
    if low < lo or high > hi:
        raise InputError(f"datatype {datatype} allows values in [{lo}, {hi}]; got values in [{low:g}, {high:g}]")
    return values


# ------------------------------------------------------------------------------------ KServe v1


def decode_instances(instances: Any, spec) -> np.ndarray:
    """Samples of a KServe v1 ``instances`` list, one per instance (see module doc)."""
    if not isinstance(instances, list) or not instances:
        raise InputError(f"'instances' must be a non-empty list; got {_what(instances)}")
    _check_count(len(instances))
    return np.concatenate([decode_instance(instance, spec, f"instances[{i}]") for i, instance in enumerate(instances)])


def decode_instance(instance: Any, spec, where: str) -> np.ndarray:
    """One sample (float32 (1, *input_shape)) from one v1 instance; errors name ``where``."""
    try:
        if isinstance(instance, dict):
            key = next((k for k in ("data", "b64") if k in instance), None)
            if key is None:
                raise InputError(f"an object instance needs 'data' or 'b64'; got {_short(instance)}")
            instance = instance[key]
            if isinstance(instance, str):
                return _instance_image(instance, spec)
        if spec.is_image_model:
            values = numeric_array(instance, where)
            h, w = spec.image_size
            if values.shape not in ((h, w), (h * w,), (1, h, w)):
                raise InputError(f"expected one {h}x{w} image, {h * w} intensities or base64 PNG/JPEG; "
                                 f"got {'a single number' if values.ndim == 0 else _fmt_shape(values.shape)}")
            return _finish(values.reshape(1, -1), spec)
        values = numeric_array(instance, where)
        if values.size != spec.input_width or values.ndim > 1:
            raise InputError(f"expected one row of {spec.input_width} number(s); got "
                             + ("a single number" if values.ndim == 0 else _fmt_shape(values.shape)))
        return _finish(values.reshape(1, -1), spec)
    except InputError as err:
        message = err.message if err.message.startswith(where) else f"{where}: {err.message}"
        raise InputError(message, err.status) from None


def _instance_image(text: str, spec) -> np.ndarray:
    if not spec.is_image_model:
        raise InputError(f"model {spec.name!r} takes rows of numbers, not an image")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("not valid base64") from None
    if not (raw.startswith(PNG_MAGIC) or raw.startswith(JPEG_MAGIC)):
        raise InputError("the base64 data is not a PNG or JPEG image")
    return _finish(decode_image_bytes(raw, spec.image_size).reshape(1, -1), spec)


# ----------------------------------------------------------------------- TorchServe's envelopes


def envelope_kind(data: list, context) -> str | None:
    """How TorchServe's ``service_envelope`` reshaped the batch, or None for plain requests.

    ``tensor``: the ``kservev2`` envelope (it sets ``context.input_names``) hands one OIP input tensor
    per row; ``instance``: more rows than requests, i.e. the ``kserve`` envelope's v1 instances. The
    ``kserve`` envelope with one instance per request is indistinguishable from a request and is not
    supported: /v1 and /v2 requests need no envelope (this module reads them itself).
    """
    if getattr(context, "input_names", None) is not None:
        return "tensor"
    processors = getattr(context, "request_processor", None)
    return "instance" if processors is not None and len(data) > len(processors) else None


def decode_envelope_row(row: Any, spec, idx: int, kind: str) -> Decoded:
    """One envelope row: a v1 instance, or a ``kservev2`` input tensor (whose data the envelope nested)."""
    if kind == "tensor":
        tensor = row
        if isinstance(row, dict) and "shape" in row and "data" in row:
            tensor = {**row, "data": np.asarray(row["data"]).reshape(-1).tolist()}
        return Decoded(_decode_tensor(tensor, spec, None), kind)
    return Decoded(decode_instance(row, spec, f"instances[{idx}]"), kind)


# ------------------------------------------------------------------------------------ responses


def encode_response(decoded: Decoded, outputs: dict[str, np.ndarray], handler, context, idx: int) -> Any:
    """The response body for one request and its content type / headers (set on ``context``).

    ``outputs`` are the handler's named arrays for this request's N samples (``ModelSpec.outputs``).
    Returns bytes, except for envelope rows, which go back as Python values for the envelope to wrap:
    an ``instance`` its v1 prediction, a ``tensor`` the model's first output as nested lists.
    """
    if decoded.kind == "instance":
        return instance_predictions(outputs, handler.spec)[0]
    if decoded.kind == "tensor":
        return np.asarray(outputs[handler.spec.outputs[0][0]]).tolist()
    if decoded.kind == "oip":
        body, header_length = oip_response(outputs, decoded.oip, handler, context.get_request_id(idx))
        if header_length is not None:
            set_header(context, idx, RESPONSE_HEADER_LENGTH, str(header_length))
            set_content_type(context, idx, BINARY_TYPE)
        else:
            set_content_type(context, idx, JSON_TYPE)
        return body
    if decoded.kind == "v1":
        response = {"predictions": instance_predictions(outputs, handler.spec)}
    else:
        response = handler.to_native(outputs, decoded.is_list)
    set_content_type(context, idx, JSON_TYPE)
    return encode_json(response)


def output_specs(spec, explain: bool = False) -> tuple:
    """``(name, datatype, sample shape)`` of every OIP output of a prediction, or of an explanation."""
    if explain:
        from handlers import explain as explanations

        return explanations.oip_outputs(spec)
    return spec.outputs


def oip_response(
    outputs: dict[str, np.ndarray], request: OipRequest, handler, fallback_id, explain: bool = False,
    parameters: dict | None = None,
) -> tuple[bytes, int | None]:
    """``(body, JSON header length or None)`` of an OIP response; None means the body is plain JSON.
    ``explain``: the outputs are an explanation's; ``parameters``: the response's ``parameters`` object."""
    specs = {name: (datatype, shape) for name, datatype, shape in output_specs(handler.spec, explain)}
    entries, blobs = [], []
    for name, binary in request.outputs:
        datatype, sample_shape = specs[name]
        array = np.asarray(outputs[name])
        shape = [len(array), *sample_shape]
        if list(array.shape) != shape:
            raise ValueError(f"output {name!r} has shape {list(array.shape)}; the registry says {shape}")
        entry = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.astype(NUMPY_DTYPES[datatype], copy=False).ravel().tolist()
        entries.append(entry)
    response = {
        "model_name": handler.model_name,
        "model_version": handler.model_version,
        "id": request.id if request.id is not None else fallback_id,
        "outputs": entries,
    }
    if parameters:
        response["parameters"] = parameters
    header = encode_json(response)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def instance_predictions(outputs: dict[str, np.ndarray], spec) -> list:
    """One KServe v1 prediction per sample: the single output's value, or ``{name: value}`` of each output."""
    names = [name for name, _, _ in spec.outputs]
    columns = [np.asarray(outputs[name]).tolist() for name in names]
    if len(names) == 1:
        return columns[0]
    return [dict(zip(names, values)) for values in zip(*columns)]


def set_content_type(context, idx: int, value: str = JSON_TYPE) -> None:
    if has_request(context, idx):
        context.set_response_content_type(idx, value)


def set_header(context, idx: int, key: str, value: str) -> None:
    if has_request(context, idx):
        context.set_response_header(idx, key, value)
