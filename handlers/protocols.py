"""Wire protocols for the handlers: one TorchServe request in → float32 samples; named output arrays (or an
explanation) → that protocol's response, with its content type and headers.

``ServingHandler`` (handlers/base.py) only sees decoded samples and named outputs; this is the only handler
module that knows request and response formats (native JSON/PNG, KServe v1, Open Inference Protocol JSON and
binary, TorchServe's request envelopes). It tells each request's protocol apart and dispatches; native forms,
images and number arrays go to handlers/decoding.py, the OIP byte layout is wire/oip.py's. The formats:
docs/protocols.md.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlers import tracing
from handlers.decoding import (
    MAX_SAMPLES,
    InputError,
    check_count,
    decode_image_bytes,
    decode_native,
    finish,
    is_image,
    numeric_array,
    other_image_format,
)
from handlers.jsoncodec import encode_json, json_loads
from wire import oip
from wire.values import fmt_shape, is_int, short, type_name, what

HEADER_LENGTH = "inference-header-content-length"  # request header names arrive lowercased
OIP_REQUEST = "oip-request"
EXPLAIN = "explain"
URL_PATH = "url_path"
RESPONSE_HEADER_LENGTH = oip.HEADER_LENGTH
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
# OIP input datatypes the models take (numbers; BOOL and BYTES are refused), in the order messages list them.
INPUT_DATATYPES = ("FP16", "FP32", "FP64", *(f"{kind}{bits}" for kind in ("UINT", "INT") for bits in (8, 16, 32, 64)))


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


def request_payload(request: Any) -> Any:
    """The payload of one TorchServe request dict: field ``data`` if present (multipart), else ``body``.

    Its Python type depends on the request's Content-Type: ``application/json`` arrives already parsed
    (dict, list, number, str or None), ``text/*`` as ``str``, anything else (and JSON that failed to
    parse) as ``bytes``/``bytearray``.
    """
    if not isinstance(request, dict):
        raise InputError(f"malformed request: expected a dict of fields, got {type(request).__name__}")
    for key in ("data", "body"):
        if key in request:
            return request[key]
    fields = ", ".join(short(str(name), 30) for name in sorted(map(str, request))[:5]) or "none"
    # Most often a raw body sent as application/x-www-form-urlencoded, which TorchServe parses as a form.
    raise InputError(
        f"no request body and no form field 'data' reached the model (form fields: {fields}); a body sent "
        "as application/x-www-form-urlencoded (curl -d's default) is parsed as a form by TorchServe: send "
        "JSON with 'Content-Type: application/json', an image with 'Content-Type: image/png' or "
        "'image/jpeg', or a multipart form field named 'data'"
    )


def parse_payload(payload: Any) -> Any:
    """Turn raw bytes/str into a JSON value; PNG/JPEG bytes are returned as ``bytes``; parsed JSON passes.

    Raises InputError for an empty body, undecodable text or malformed JSON.
    """
    if isinstance(payload, (bytes, bytearray, memoryview)):
        raw = bytes(payload)
        if is_image(raw):
            return raw
        if not raw.strip():
            raise InputError("empty request body; send JSON like {\"data\": [...]} or a PNG/JPEG image")
        other = other_image_format(raw)
        if other:
            raise InputError(f"only PNG and JPEG images are accepted; the body looks like a {other} image")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InputError("request body is neither UTF-8 JSON nor a PNG/JPEG image") from None
        return parse_json(text)
    if isinstance(payload, str):
        if not payload.strip():
            raise InputError("empty request body; send JSON like {\"data\": [...]} or a PNG/JPEG image")
        return parse_json(payload)
    return payload


def parse_json(text: str) -> Any:
    """A request's JSON text parsed (handlers/jsoncodec.py); InputError naming what is malformed."""
    try:
        return json_loads(text.removeprefix("\ufeff"))  # a byte-order mark is harmless, json refuses it
    except RecursionError:
        raise InputError("malformed JSON: nested too deeply") from None
    except json.JSONDecodeError as err:
        raise InputError(f"malformed JSON: {err}") from None
    except ValueError:  # Python refuses integer literals over sys.get_int_max_str_digits() digits
        limit = sys.get_int_max_str_digits()
        raise InputError(f"malformed JSON: a number has more than {limit} digits") from None


def decode_request(request: Any, spec, headers: dict[str, str] | None = None) -> Decoded:
    """Decode one TorchServe request dict for ``spec`` (a ``models.registry.ModelSpec``).

    Which protocol: header ``inference-header-content-length`` → OIP with binary tensors; a KServe route
    (:func:`is_kserve_route`) → KServe v1 ``instances`` or OIP JSON; otherwise OIP JSON (``inputs``),
    KServe v1 (``instances``) or a native form. Header ``explain: True`` → an explanation request.
    """
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
    ``/predictions|/explanations``, but ``url_path`` only on the latter; serve/torchserve/java adds ``oip-request: v2``
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
    """The JSON of a body sent to a KServe route (no native forms there)."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        raw = bytes(payload)
        if is_image(raw):
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
        return parse_json(payload)
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
    try:
        return oip.split_body(payload, header_length, loads=parse_json)
    except oip.WireError as err:
        raise InputError(str(err)) from None


# -------------------------------------------------------------------------------- OIP decoding


def decode_oip(body: Any, spec, binary: memoryview | None = None, explain: bool = False) -> Decoded:
    """Decode an OIP request (JSON header ``body``, plus its ``binary`` section for the binary extension).
    An :class:`InputError` about a request with an ``id`` carries it as ``request_id`` (its error names it)."""
    if not isinstance(body, dict):
        raise InputError(
            f"an Open Inference Protocol request must be a JSON object with 'inputs'; got {what(body)}"
        )
    request_id = oip_id(body)
    try:
        return _decode_oip(body, spec, binary, explain)
    except InputError as err:
        err.request_id = request_id
        raise


def oip_id(body: dict) -> str | None:
    """The request's ``id``: None when absent, else a usable request ID (handlers/tracing.py), or a 400."""
    value = body.get("id")
    if value is not None and not (isinstance(value, str) and tracing.usable_id(value)):
        raise InputError(f"'id' must be a string of 1-{tracing.MAX_ID_LENGTH} printable ASCII characters "
                         f"without spaces (it names the request); got {what(value)}")
    return value


def _decode_oip(body: dict, spec, binary: memoryview | None, explain: bool) -> Decoded:
    if "inputs" not in body:
        keys = ", ".join(repr(k) for k in sorted(map(str, body))) or "none"
        raise InputError(
            f"the Open Inference Protocol request has no 'inputs' (KServe v1 sends 'instances'); got keys: {keys}"
        )
    inputs = body["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1:
        got = f"{len(inputs)} inputs" if isinstance(inputs, list) else type_name(inputs)
        raise InputError(f"'inputs' must be a list holding exactly one input tensor; got {got}")
    try:
        (tensor_bytes,) = oip.binary_tensors(inputs, binary, "inputs")
    except oip.WireError as err:
        raise InputError(str(err)) from None
    request = _oip_request(body, spec, explain)
    return Decoded(_decode_tensor(inputs[0], spec, tensor_bytes), "oip", oip=request)


def _oip_request(body: dict, spec, explain: bool = False) -> OipRequest:
    """The request's id and its requested outputs (name, binary?), checked against ``spec.outputs``
    (an explanation's: ``explain.oip_outputs(spec)``)."""
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InputError(f"'parameters' must be an object; got {what(parameters)}")
    binary_all = parameters.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise InputError(f"parameters.binary_data_output must be true or false; got {what(binary_all)}")
    known = [name for name, _, _ in output_specs(spec, explain)]
    requested = body.get("outputs")
    if requested is None:
        return OipRequest(body.get("id"), [(name, binary_all) for name in known])
    if not isinstance(requested, list) or not requested:
        raise InputError(f"'outputs' must be a non-empty list of {{\"name\": ...}} objects; got {what(requested)}")
    outputs = []
    for i, output in enumerate(requested):
        name = output.get("name") if isinstance(output, dict) else None
        if not isinstance(name, str):
            raise InputError(f"outputs[{i}] must be an object with a string 'name'; got {what(output)}")
        if name not in known:
            raise InputError(f"outputs[{i}] names unknown output {short(name)}; the outputs of model "
                             f"{spec.name!r} are " + ", ".join(repr(k) for k in known))
        if any(name == seen for seen, _ in outputs):
            raise InputError(f"outputs[{i}] requests {name!r} twice")
        out_parameters = output.get("parameters") or {}
        if not isinstance(out_parameters, dict):
            raise InputError(f"outputs[{i}].parameters must be an object; got {what(out_parameters)}")
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in out_parameters:
                raise InputError(f"outputs[{i}].parameters.{unsupported} is not supported by this server")
        binary = out_parameters.get("binary_data", binary_all)
        if not isinstance(binary, bool):
            raise InputError(f"outputs[{i}].parameters.binary_data must be true or false; got {what(binary)}")
        outputs.append((name, binary))
    return OipRequest(body.get("id"), outputs)


def _decode_tensor(tensor: Any, spec, binary: memoryview | None) -> np.ndarray:
    """Samples from ``inputs[0]``: JSON ``data``, or (``binary`` given) exactly the bytes of the binary section."""
    if not isinstance(tensor, dict):
        raise InputError(f"inputs[0] must be an object with shape, datatype and data; got {type_name(tensor)}")
    missing = [k for k in ("shape", "datatype") if k not in tensor]
    if binary is None and "data" not in tensor:
        missing.append("data")
    if missing:
        raise InputError(f"inputs[0] is missing {', '.join(repr(k) for k in missing)}")
    if binary is not None and "data" in tensor:
        raise InputError("inputs[0] has both 'data' and parameters.binary_data_size; send one of them")
    datatype = tensor["datatype"]
    if datatype not in INPUT_DATATYPES:
        raise InputError(
            f"inputs[0].datatype must be one of {', '.join(INPUT_DATATYPES)}; got {short(datatype)}"
            + (" (this model takes numbers)" if datatype in ("BOOL", "BYTES") else "")
        )
    shape = _v2_shape(tensor["shape"], spec)
    count = math.prod(shape)
    if binary is not None:
        dtype = oip.NUMPY_DTYPES[datatype]
        if len(binary) != count * dtype.itemsize:
            raise InputError(
                f"inputs[0].parameters.binary_data_size is {len(binary)} bytes but shape {fmt_shape(shape)} of "
                f"{datatype} needs {count} x {dtype.itemsize} = {count * dtype.itemsize} bytes"
            )
        values = np.frombuffer(binary, dtype=dtype).reshape(shape[0], -1)  # a view of the received bytes
        if dtype.kind == "f" and spec.is_image_model and values.size:
            # min and max propagate NaN, and an infinity is one of them: the range check's two passes also
            # find what the finiteness check would (one pass and a boolean array fewer over the body).
            bounds = (float(values.min()), float(values.max()))
            if not (math.isfinite(bounds[0]) and math.isfinite(bounds[1])):
                raise InputError("inputs[0] binary data holds NaN or infinite values; they are not allowed")
            return finish(values, spec, bounds)
        if dtype.kind == "f" and not np.all(np.isfinite(values)):
            raise InputError("inputs[0] binary data holds NaN or infinite values; they are not allowed")
    else:
        values = numeric_array(tensor["data"], "inputs[0].data")
        if values.ndim > 1 and values.shape != shape:
            raise InputError(
                f"inputs[0].data is nested with shape {fmt_shape(values.shape)} but shape says {fmt_shape(shape)}"
            )
        if values.size != count:
            raise InputError(f"inputs[0].shape {fmt_shape(shape)} holds {count} values but data has {values.size}")
        values = _check_integers(values.reshape(shape[0], -1), datatype)
    if spec.is_image_model and datatype == "UINT8":
        values = values / 255.0
    return finish(values, spec)


def _v2_shape(shape: Any, spec) -> tuple[int, ...]:
    if not isinstance(shape, list) or not shape or not all(is_int(d) and d >= 0 for d in shape):
        raise InputError(f"inputs[0].shape must be a list of non-negative integers; got {short(shape)}")
    shape = tuple(shape)
    if math.prod(shape) > MAX_SAMPLES * spec.input_width:
        raise InputError(
            f"too many samples: inputs[0].shape {short(list(shape))} holds more than {MAX_SAMPLES} samples "
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
        raise InputError(f"inputs[0].shape must be {expected} for model {spec.name!r}; got {fmt_shape(shape)}")
    if shape[0] == 0:
        raise InputError("inputs[0].shape has N = 0 samples; send at least one")
    check_count(shape[0])
    return shape


def _check_integers(values: np.ndarray, datatype: str) -> np.ndarray:
    bounds = oip.INTEGER_RANGES.get(datatype)
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
    """Samples of a KServe v1 ``instances`` list, one per instance (docs/protocols.md, "KServe v1")."""
    if not isinstance(instances, list) or not instances:
        raise InputError(f"'instances' must be a non-empty list; got {what(instances)}")
    check_count(len(instances))
    return np.concatenate([decode_instance(instance, spec, f"instances[{i}]") for i, instance in enumerate(instances)])


def decode_instance(instance: Any, spec, where: str) -> np.ndarray:
    """One sample (float32 (1, *input_shape)) from one v1 instance; errors name ``where``."""
    try:
        if isinstance(instance, dict):
            key = next((k for k in ("data", "b64") if k in instance), None)
            if key is None:
                raise InputError(f"an object instance needs 'data' or 'b64'; got {short(instance)}")
            instance = instance[key]
            if isinstance(instance, str):
                return _instance_image(instance, spec)
        if spec.is_image_model:
            values = numeric_array(instance, where)
            h, w = spec.image_size
            if values.shape not in ((h, w), (h * w,), (1, h, w)):
                raise InputError(f"expected one {h}x{w} image, {h * w} intensities or base64 PNG/JPEG; "
                                 f"got {'a single number' if values.ndim == 0 else fmt_shape(values.shape)}")
            return finish(values.reshape(1, -1), spec)
        values = numeric_array(instance, where)
        if values.size != spec.input_width or values.ndim > 1:
            raise InputError(f"expected one row of {spec.input_width} number(s); got "
                             + ("a single number" if values.ndim == 0 else fmt_shape(values.shape)))
        return finish(values.reshape(1, -1), spec)
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
    if not is_image(raw):
        raise InputError("the base64 data is not a PNG or JPEG image")
    return finish(decode_image_bytes(raw, spec.image_size).reshape(1, -1), spec)


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
        return _answer_oip(oip_response(outputs, decoded.oip, handler, request_id(handler, context, idx)), context, idx)
    if decoded.kind == "v1":
        response = {"predictions": instance_predictions(outputs, handler.spec)}
    else:
        response = handler.to_native(outputs, decoded.is_list)
    set_content_type(context, idx, JSON_TYPE)
    return encode_json(response)


def encode_explanation(
    decoded: Decoded, options, model_outputs: dict, result: dict, handler, context, idx: int
) -> bytes:
    """One explanation's body in its request's protocol, its content type / headers set on ``context``.

    ``options``: the request's ``explain.ExplainOptions``; ``model_outputs``: the handler's named outputs for
    its samples; ``result``: its rows of ``explain.Explainer.explain`` (handlers/explain.py says what is in it).
    """
    from handlers import explain

    if decoded.kind == "oip":
        arrays = explain.oip_arrays(handler.spec, model_outputs, result)
        answer = oip_response(arrays, decoded.oip, handler, request_id(handler, context, idx), explain=True,
                              parameters=explain.describe(handler.spec, options.steps))
        return _answer_oip(answer, context, idx)
    answers = explain.sample_objects(handler.spec, model_outputs, result, options.steps)
    if decoded.kind == "v1":
        response = {"explanations": answers}
    else:
        response = answers if decoded.is_list else answers[0]
    set_content_type(context, idx, JSON_TYPE)
    return encode_json(response)


def _answer_oip(answer: tuple[bytes, int | None], context, idx: int) -> bytes:
    """An OIP body from :func:`oip_response`, with its headers: binary (Inference-Header-Content-Length) or JSON."""
    body, header_length = answer
    if header_length is not None:
        set_header(context, idx, RESPONSE_HEADER_LENGTH, str(header_length))
        set_content_type(context, idx, BINARY_TYPE)
    else:
        set_content_type(context, idx, JSON_TYPE)
    return body


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
            blob = oip.tensor_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.astype(oip.NUMPY_DTYPES[datatype], copy=False).ravel().tolist()
        entries.append(entry)
    response = {
        "model_name": handler.model_name,
        "model_version": handler.model_version,
        "id": request.id if request.id is not None else fallback_id,
        "outputs": entries,
    }
    if parameters:
        response["parameters"] = parameters
    return oip.join_body(encode_json(response), blobs)


def instance_predictions(outputs: dict[str, np.ndarray], spec) -> list:
    """One KServe v1 prediction per sample: the single output's value, or ``{name: value}`` of each output."""
    names = [name for name, _, _ in spec.outputs]
    columns = [np.asarray(outputs[name]).tolist() for name in names]
    if len(names) == 1:
        return columns[0]
    return [dict(zip(names, values)) for values in zip(*columns)]


def request_id(handler, context, idx: int):
    """Request ``idx``'s ID (handlers/tracing.py): the handler's for this batch, else TorchServe's."""
    ids = getattr(handler, "request_ids", None)
    return ids[idx] if ids and idx < len(ids) and ids[idx] else context.get_request_id(idx)


def set_content_type(context, idx: int, value: str = JSON_TYPE) -> None:
    if has_request(context, idx):
        context.set_response_content_type(idx, value)


def set_header(context, idx: int, key: str, value: str) -> None:
    if has_request(context, idx):
        context.set_response_header(idx, key, value)
