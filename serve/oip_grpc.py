"""Open Inference Protocol gRPC front: ``inference.GRPCInferenceService`` forwarded to TorchServe's REST OIP.

TorchServe 0.12's own OIP gRPC is partial (no ``raw_input_contents``, which the stock
``tritonclient.grpc`` client sends by default), so this small process serves the exact proto the stock
Triton/KServe clients speak (the generated stubs shipped in ``tritonclient[grpc]``) and translates every
call into ONE request to TorchServe's REST OIP surface on the inference address:

=================  ===================================================================================
RPC                REST request
=================  ===================================================================================
ServerLive         ``GET /v2/health/live``: 200 → live, other 4xx and 503 → not live
ServerReady        ``GET /v2/health/ready``: 200 → ready, other 4xx and 503 → not ready
ServerMetadata     ``GET /v2`` → name, version, extensions
ModelReady         ``GET /v2/models/{m}[/versions/{v}]/ready``: 200 → ready, 400 → not ready, 404 → NOT_FOUND
ModelMetadata      ``GET /v2/models/{m}[/versions/{v}]`` → name, versions, platform, inputs, outputs
ModelInfer         ``POST /v2/models/{m}[/versions/{v}]/infer`` with the binary tensor data extension
=================  ===================================================================================

Every other RPC of the service answers UNIMPLEMENTED (the generated base class does that).

ModelInfer takes its tensors from ``raw_input_contents`` (one little-endian blob per input, in input
order; tritonclient's default) or from the typed ``contents`` fields (``fp32_contents``,
``int64_contents``, ...; converted with numpy to the declared datatype's little-endian bytes), checks
each against shape × element size before anything is forwarded (INVALID_ARGUMENT naming the input
otherwise), sends one binary REST request whose outputs all ask for ``binary_data`` (the request's
``outputs`` list, or every output through ``binary_data_output`` when it names none) and answers with
``raw_output_contents``. Outputs that REST still returns as JSON ``data`` are converted too.

Request IDs: the caller's ``x-request-id`` and ``traceparent`` metadata go out as those HTTP headers, the
request ``id`` in the REST body; the ID the answer names (REST's ``X-Request-ID``) comes back as trailing
metadata ``x-request-id`` (errors included) and as the response ``id`` when the request had none; a
request ``id`` without ``x-request-id`` metadata also goes out as ``X-Request-ID``.
ModelStatistics forwards to REST ``GET /v2/models[/{m}[/versions/{v}]]/stats``.

The caller's ``authorization`` metadata goes out unchanged as the HTTP ``Authorization`` header, so
TorchServe's token auth applies as it does to REST (no or wrong key → UNAUTHENTICATED: TorchServe 0.12's
own token check answers 400 ``InvalidKeyException``, which maps like a 401). REST errors map to gRPC
codes with REST's ``error`` message as the details (see ``HTTP_TO_GRPC``); a REST surface that cannot
be reached → UNAVAILABLE.

Each gRPC worker thread keeps one persistent keep-alive ``http.client.HTTPConnection`` (reconnecting
when the server dropped it), so a call costs one REST round trip on an open connection.

    python -m serve.oip_grpc --listen 127.0.0.1:7070 --rest http://127.0.0.1:8080 [--threads 16]

In-process (tests): ``server = start_server("http://127.0.0.1:8080", "127.0.0.1:0")``, then
``server.port``, ``server.address`` and ``server.stop()``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote, urlsplit

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from wire import oip

LOG = logging.getLogger("serve.oip_grpc")

DEFAULT_LISTEN = "127.0.0.1:7070"
DEFAULT_REST = "http://127.0.0.1:8080"
DEFAULT_THREADS = 16
# Longest a REST call may take when the gRPC caller set no (shorter) deadline; TorchServe's own
# default_response_timeout is 120 s.
DEFAULT_REST_TIMEOUT_S = 130.0
DEFAULT_GRACE_S = 5.0
# 1024 MNIST images are 3.2 MB of FP32; leave ample room for larger inputs and outputs.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
INFERENCE_HEADER = oip.HEADER_LENGTH

# REST status → gRPC code; every other non-2xx status → INTERNAL.
HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    429: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
}

# OIP datatype → the InferTensorContents field that carries it (FP16 and BF16: raw only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
ALL_CONTENTS_FIELDS = tuple(pb.InferTensorContents.DESCRIPTOR.fields_by_name)


class OipError(Exception):
    """A call that fails with ``code`` and ``message`` (the gRPC status details)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------------- REST

@dataclass
class RestResponse:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def rest_error_message(status: int, reason: str, body: bytes) -> str:
    """REST's ``error`` message (TorchServe's own errors say ``message``), else a short excerpt of the body."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict):
        for key in ("error", "message"):
            if isinstance(parsed.get(key), str) and parsed[key]:
                return parsed[key]
    text = body[:300].decode("utf-8", "replace").strip()
    return text or f"HTTP {status} {reason}".strip()


def is_auth_failure(response: RestResponse) -> bool:
    """A refused token: 401, or TorchServe 0.12's own token check, which answers 400 with
    ``"type": "InvalidKeyException"`` (its auth filter runs before any OIP code can answer 401)."""
    if response.status == 401:
        return True
    if response.status != 400 or b"InvalidKeyException" not in response.body:
        return False
    try:
        return json.loads(response.body).get("type") == "InvalidKeyException"
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def rest_failure(response: RestResponse, reason: str = "") -> OipError:
    """The gRPC error a non-2xx REST response maps to."""
    if is_auth_failure(response):
        code = grpc.StatusCode.UNAUTHENTICATED
    else:
        code = HTTP_TO_GRPC.get(response.status, grpc.StatusCode.INTERNAL)
    return OipError(code, rest_error_message(response.status, reason, response.body))


class RestClient:
    """Requests to the REST OIP surface, one persistent keep-alive connection per calling thread."""

    # A reused connection failing this way was most likely closed by the server while idle: retry once.
    STALE_CONNECTION_ERRORS = (
        http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionResetError, BrokenPipeError,
        ConnectionAbortedError,
    )

    def __init__(self, base_url: str, timeout: float = DEFAULT_REST_TIMEOUT_S):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"REST address must look like http://HOST:PORT, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self._local = threading.local()

    def _new_connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close the calling thread's connection (the others close when their threads end)."""
        self._drop()

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> RestResponse:
        """Send one request on this thread's connection; OipError UNAVAILABLE / DEADLINE_EXCEEDED on failure."""
        timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        if timeout <= 0:
            raise OipError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the REST request was sent")
        url = self.prefix + path
        for attempt in (1, 2):
            conn = getattr(self._local, "conn", None)
            reused = conn is not None and conn.sock is not None
            if conn is None:
                conn = self._local.conn = self._new_connection(timeout)
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(method, url, body=body, headers=headers or {})
                response = conn.getresponse()
                data = response.read()
            except (socket.timeout, TimeoutError):
                self._drop()
                raise OipError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer from {self.base_url} within {timeout:.3g} s"
                ) from None
            except self.STALE_CONNECTION_ERRORS as exc:
                self._drop()
                if reused and attempt == 1:
                    continue
                raise OipError(grpc.StatusCode.UNAVAILABLE, f"cannot reach {self.base_url}: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                raise OipError(grpc.StatusCode.UNAVAILABLE, f"cannot reach {self.base_url}: {exc}") from None
            if response.will_close:
                self._drop()
            return RestResponse(response.status, response.headers, data)
        raise AssertionError("unreachable")


# -------------------------------------------------------------------------------------- translation

def model_path(name: str, version: str = "") -> str:
    """``/v2/models/{name}[/versions/{version}]``, each part percent-encoded (no path tricks)."""
    if not name:
        raise OipError(grpc.StatusCode.INVALID_ARGUMENT, "model name is required")
    path = "/v2/models/" + quote(name, safe="")
    if version:
        path += "/versions/" + quote(version, safe="")
    return path


def parameter_value(param: pb.InferParameter) -> Any:
    """The Python value of one InferParameter (None when unset)."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def parameters_dict(params) -> dict[str, Any]:
    return {key: value for key, param in params.items() if (value := parameter_value(param)) is not None}


def set_parameter(param: pb.InferParameter, value: Any) -> bool:
    """Fill an InferParameter from a JSON value; False for values it cannot hold (lists, objects, null)."""
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if value >= 2**63:
            param.uint64_param = value
        else:
            param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        return False
    return True


def element_count(name: str, shape) -> int:
    count = 1
    for dim in shape:
        if dim < 0:
            raise OipError(
                grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}': shape {list(shape)} has a negative dimension"
            )
        count *= dim
    return count


def check_bytes_tensor(name: str, data: bytes | memoryview, count: int) -> None:
    """A BYTES tensor is ``count`` elements, each a 4-byte little-endian length and that many bytes."""
    try:
        oip.deserialize_bytes(data, count)
    except oip.WireError as err:
        raise OipError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}': {err}") from None


def typed_contents_bytes(tensor: pb.ModelInferRequest.InferInputTensor, count: int) -> bytes:
    """The little-endian bytes of an input given in the typed ``contents`` fields."""
    name, datatype, contents = tensor.name, tensor.datatype, tensor.contents
    used = [field for field in ALL_CONTENTS_FIELDS if len(getattr(contents, field))]
    expected = CONTENTS_FIELDS.get(datatype)
    if not used:
        if count == 0:
            return b""
        raise OipError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input '{name}' has no data: send raw_input_contents or contents.{expected or '<none>'}",
        )
    if expected is None:
        raise OipError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input '{name}': datatype {datatype} can only be sent in raw_input_contents",
        )
    if used != [expected]:
        raise OipError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input '{name}' has datatype {datatype}, so its data belongs in contents.{expected}, "
            f"not in contents.{', contents.'.join(f for f in used if f != expected)}",
        )
    values = getattr(contents, expected)
    if len(values) != count:
        raise OipError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input '{name}': {len(values)} values in contents.{expected}, but shape {list(tensor.shape)} "
            f"needs {count}",
        )
    if datatype == "BYTES":
        return oip.serialize_bytes(values)
    dtype = oip.NUMPY_DTYPES[datatype]
    if dtype.kind in "iu":
        wide = np.array(values, dtype=np.int64 if dtype.kind == "i" else np.uint64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise OipError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input '{name}': values of contents.{expected} out of range for {datatype}",
            )
        array = wide.astype(dtype)
    else:
        array = np.array(values, dtype=dtype)
    return array.tobytes()


def input_tensors(request: pb.ModelInferRequest) -> tuple[list[dict], list[bytes]]:
    """The REST header entries and the binary data of the request's inputs, checked against their shapes."""
    if not request.inputs:
        raise OipError(grpc.StatusCode.INVALID_ARGUMENT, "the request has no inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise OipError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send one per input, in input order",
        )
    names = set()
    entries, blobs = [], []
    for index, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        if not name:
            raise OipError(grpc.StatusCode.INVALID_ARGUMENT, f"input {index} has no name")
        if name in names:
            raise OipError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}' appears more than once")
        names.add(name)
        if datatype not in oip.DATATYPES:
            raise OipError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input '{name}': unknown datatype {datatype!r} (one of {', '.join(oip.DATATYPES)})",
            )
        params = parameters_dict(tensor.parameters)
        if any(key.startswith("shared_memory") for key in params):
            raise OipError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}': shared memory is not supported")
        count = element_count(name, tensor.shape)
        if raw:
            if tensor.HasField("contents") and any(len(getattr(tensor.contents, f)) for f in ALL_CONTENTS_FIELDS):
                raise OipError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input '{name}' has both contents and raw_input_contents; send one or the other",
                )
            data = raw[index]
            if datatype == "BYTES":
                check_bytes_tensor(name, data, count)
            elif len(data) != count * oip.ELEMENT_SIZES[datatype]:
                size = oip.ELEMENT_SIZES[datatype]
                raise OipError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input '{name}': {len(data)} bytes of raw_input_contents, but shape {list(tensor.shape)} "
                    f"of {datatype} needs {count} x {size} = {count * size}",
                )
        else:
            data = typed_contents_bytes(tensor, count)
        params["binary_data_size"] = len(data)
        entries.append({"name": name, "shape": list(tensor.shape), "datatype": datatype, "parameters": params})
        blobs.append(data)
    return entries, blobs


def output_bytes_from_json(output: dict) -> bytes:
    """Raw little-endian bytes of an output REST returned as JSON ``data``."""
    datatype, name = output.get("datatype"), output.get("name")
    if datatype not in oip.NUMPY_DTYPES and datatype != "BYTES":
        raise OipError(grpc.StatusCode.INTERNAL, f"REST returned output '{name}' with unusable datatype {datatype!r}")
    try:
        return oip.tensor_bytes(output.get("data", []), datatype)
    except (TypeError, ValueError) as exc:
        raise OipError(grpc.StatusCode.INTERNAL, f"REST returned unusable data for output '{name}': {exc}") from None


def split_infer_response(response: RestResponse) -> tuple[dict, memoryview]:
    """The JSON header and the binary part of a REST infer response."""
    try:
        return oip.split_body(response.body, response.headers.get(INFERENCE_HEADER))
    except oip.WireError as exc:
        raise OipError(grpc.StatusCode.INTERNAL, f"unreadable REST infer response: {exc}") from None


def infer_response(request: pb.ModelInferRequest, header: dict, binary) -> pb.ModelInferResponse:
    """The gRPC response for REST's JSON header and binary data; outputs in the requested order."""
    outputs = header.get("outputs") if isinstance(header, dict) else None
    if not isinstance(outputs, list):
        raise OipError(grpc.StatusCode.INTERNAL, "REST infer response has no outputs list")
    result = pb.ModelInferResponse(
        model_name=request.model_name,
        model_version=request.model_version or str(header.get("model_version") or ""),
        id=request.id,
    )
    for key, value in (header.get("parameters") or {}).items():
        set_parameter(result.parameters[key], value)
    try:
        parts = oip.binary_tensors(outputs, memoryview(binary), "outputs")
    except oip.WireError as exc:
        raise OipError(grpc.StatusCode.INTERNAL, f"REST infer response: {exc}") from None
    decoded = []
    for output, part in zip(outputs, parts):
        params = dict(output.get("parameters") or {})
        params.pop("binary_data_size", None)
        data = output_bytes_from_json(output) if part is None else bytes(part)
        decoded.append((output, params, data))
    if request.outputs:
        by_name = {item[0].get("name"): item for item in decoded}
        missing = [o.name for o in request.outputs if o.name not in by_name]
        if missing:
            raise OipError(grpc.StatusCode.INTERNAL, f"REST did not return the requested output(s) {missing}")
        decoded = [by_name[o.name] for o in request.outputs]
    for output, params, data in decoded:
        name, datatype, shape = output.get("name"), output.get("datatype"), output.get("shape")
        if not isinstance(name, str) or datatype not in oip.DATATYPES or not isinstance(shape, list):
            raise OipError(grpc.StatusCode.INTERNAL, f"REST returned an incomplete output description: {output}")
        if datatype != "BYTES":
            needed = oip.byte_size(datatype, shape)
            if needed != len(data):
                raise OipError(
                    grpc.StatusCode.INTERNAL,
                    f"REST output '{name}' has {len(data)} bytes, but shape {shape} of {datatype} needs {needed}",
                )
        tensor = result.outputs.add(name=name, datatype=datatype, shape=shape)
        for key, value in params.items():
            if key != "binary_data":
                set_parameter(tensor.parameters[key], value)
        result.raw_output_contents.append(data)
    return result


# ---------------------------------------------------------------------------------------- servicer

def _rpc(method: Callable) -> Callable:
    """Run an RPC; an OipError becomes its gRPC status, anything else INTERNAL (and a log line)."""

    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except OipError as exc:
            context.abort(exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - the client gets INTERNAL, the log the traceback
            LOG.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six OIP RPCs and ModelStatistics, each one REST request; the base class answers every other RPC
    UNIMPLEMENTED."""

    def __init__(self, rest: RestClient):
        self.rest = rest

    # -------------------------------------------------------------------------------------- helpers

    FORWARDED = {"authorization": "Authorization", "x-request-id": "X-Request-ID", "traceparent": "traceparent"}

    @classmethod
    def _headers(cls, context) -> dict[str, str]:
        """The caller's metadata that REST reads: the key, the request ID and the W3C trace context."""
        headers = {}
        for key, value in context.invocation_metadata() or ():
            if key in cls.FORWARDED and isinstance(value, str):
                headers[cls.FORWARDED[key]] = value
        return headers

    def _get(self, path: str, context) -> RestResponse:
        return self.rest.request("GET", path, headers=self._headers(context), timeout=context.time_remaining())

    def _get_json(self, path: str, context) -> dict:
        response = self._get(path, context)
        if response.status != 200:
            raise rest_failure(response)
        try:
            body = json.loads(response.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise OipError(grpc.StatusCode.INTERNAL, f"unreadable REST answer from {path}: {exc}") from None
        if not isinstance(body, dict):
            raise OipError(grpc.StatusCode.INTERNAL, f"REST answer from {path} is not a JSON object")
        return body

    def _health(self, path: str, context) -> bool:
        response = self._get(path, context)
        if response.status == 200:
            return True
        if response.status in (401, 403) or is_auth_failure(response) or not (
            400 <= response.status < 500 or response.status == 503
        ):
            raise rest_failure(response)
        return False

    # ---------------------------------------------------------------------------------------- RPCs

    @_rpc
    def ServerLive(self, request, context):
        """``GET /v2/health/live``."""
        return pb.ServerLiveResponse(live=self._health("/v2/health/live", context))

    @_rpc
    def ServerReady(self, request, context):
        """``GET /v2/health/ready``."""
        return pb.ServerReadyResponse(ready=self._health("/v2/health/ready", context))

    @_rpc
    def ServerMetadata(self, request, context):
        """``GET /v2``."""
        body = self._get_json("/v2", context)
        return pb.ServerMetadataResponse(
            name=str(body.get("name", "")), version=str(body.get("version", "")),
            extensions=[str(e) for e in body.get("extensions") or []],
        )

    @_rpc
    def ModelReady(self, request, context):
        """``GET /v2/models/{m}[/versions/{v}]/ready``: 200 ready, 400 not ready, 404 NOT_FOUND."""
        response = self._get(model_path(request.name, request.version) + "/ready", context)
        if response.status == 200:
            return pb.ModelReadyResponse(ready=True)
        if response.status == 400 and not is_auth_failure(response):
            return pb.ModelReadyResponse(ready=False)
        raise rest_failure(response)

    @_rpc
    def ModelMetadata(self, request, context):
        """``GET /v2/models/{m}[/versions/{v}]``."""
        body = self._get_json(model_path(request.name, request.version), context)
        result = pb.ModelMetadataResponse(
            name=str(body.get("name", request.name)), platform=str(body.get("platform", "")),
            versions=[str(v) for v in body.get("versions") or []],
        )
        try:
            for kind in ("inputs", "outputs"):
                for tensor in body.get(kind) or []:
                    getattr(result, kind).add(
                        name=tensor["name"], datatype=tensor["datatype"], shape=[int(d) for d in tensor["shape"]]
                    )
        except (KeyError, TypeError, ValueError) as exc:
            raise OipError(grpc.StatusCode.INTERNAL, f"unusable REST model metadata: {exc!r}") from None
        return result

    @_rpc
    def ModelInfer(self, request, context):
        """``POST /v2/models/{m}[/versions/{v}]/infer`` with binary inputs and binary outputs."""
        path = model_path(request.model_name, request.model_version) + "/infer"
        inputs, blobs = input_tensors(request)
        header: dict[str, Any] = {}
        if request.id:
            header["id"] = request.id
        params = parameters_dict(request.parameters)
        header["inputs"] = inputs
        if request.outputs:
            header["outputs"] = [
                {"name": o.name, "parameters": {**parameters_dict(o.parameters), "binary_data": True}}
                for o in request.outputs
            ]
        else:
            params["binary_data_output"] = True
        header["parameters"] = params
        body, header_length = oip.join_body(header, blobs)
        headers = {
            "Content-Type": "application/octet-stream",
            INFERENCE_HEADER: str(header_length),
            **self._headers(context),
        }
        if request.id and "X-Request-ID" not in headers:  # the OIP id names the request unless metadata does
            headers["X-Request-ID"] = request.id
        response = self.rest.request("POST", path, body=body, headers=headers, timeout=context.time_remaining())
        request_id = response.headers.get("X-Request-ID")
        if request_id:
            context.set_trailing_metadata((("x-request-id", request_id),))
        if response.status != 200:
            raise rest_failure(response)
        result = infer_response(request, *split_infer_response(response))
        if not result.id and request_id:
            result.id = request_id
        return result

    @_rpc
    def ModelStatistics(self, request, context):
        """``GET /v2/models[/{m}[/versions/{v}]]/stats`` (the statistics extension, Triton's JSON)."""
        path = (model_path(request.name, request.version) if request.name else "/v2/models") + "/stats"
        body = self._get_json(path, context)
        try:
            return json_format.ParseDict(body, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise OipError(grpc.StatusCode.INTERNAL, f"unusable REST statistics: {exc}") from None


# ------------------------------------------------------------------------------------------ server

class ListenError(RuntimeError):
    """The gRPC server could not listen on the address it was given."""


@dataclass
class OipGrpcServer:
    """A started gRPC front: its bound ``port`` and ``address``; ``stop()`` ends it."""

    server: grpc.Server
    rest: RestClient
    address: str
    port: int

    def stop(self, grace: float | None = DEFAULT_GRACE_S) -> None:
        """Refuse new calls, let running ones finish for up to ``grace`` seconds, then cancel them."""
        self.server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)


def check_can_listen(listen: str) -> None:
    """``ListenError`` naming ``listen`` when it cannot be bound (checked before grpc, which would log noise)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ListenError(f"cannot listen on {listen}: expected HOST:PORT with a port of 0-65535")
    port = int(port_text)
    if port == 0:
        return
    host = host.strip("[]") or None
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no conflict
            probe.bind(sockaddr)
    except OSError as exc:
        raise ListenError(f"cannot listen on {listen}: {exc.strerror or exc}") from None


def start_server(
    rest_url: str = DEFAULT_REST,
    listen: str = DEFAULT_LISTEN,
    threads: int = DEFAULT_THREADS,
    rest_timeout: float = DEFAULT_REST_TIMEOUT_S,
) -> OipGrpcServer:
    """Build and start the gRPC front on ``listen`` (``host:0`` picks a free port) forwarding to ``rest_url``.

    Raises ``ListenError`` when the address cannot be bound (in use, bad host) and ``ValueError`` for a
    malformed REST address.
    """
    rest = RestClient(rest_url, timeout=rest_timeout)
    check_can_listen(listen)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="oip-grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Without this a second server could share a port that is already taken.
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(rest), server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        server.stop(None)
        raise ListenError(f"cannot listen on {listen}: address in use or not available ({exc})") from None
    if port == 0:  # older grpcio reports a failed bind this way
        server.stop(None)
        raise ListenError(f"cannot listen on {listen}: address in use or not available")
    server.start()
    host = listen.rsplit(":", 1)[0]
    return OipGrpcServer(server=server, rest=rest, address=f"{host}:{port}", port=port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve.oip_grpc",
        description="Open Inference Protocol gRPC (inference.GRPCInferenceService) in front of TorchServe's REST OIP.",
    )
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"gRPC address HOST:PORT (default {DEFAULT_LISTEN})")
    parser.add_argument("--rest", default=DEFAULT_REST, help=f"TorchServe inference address (default {DEFAULT_REST})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"gRPC worker threads, each with one keep-alive REST connection (default {DEFAULT_THREADS})")
    parser.add_argument("--rest-timeout", type=float, default=DEFAULT_REST_TIMEOUT_S,
                        help=f"seconds a REST call may take when the caller's deadline is later (default {DEFAULT_REST_TIMEOUT_S:g})")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                        help=f"seconds running calls get to finish on SIGTERM/SIGINT (default {DEFAULT_GRACE_S:g})")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    stop = threading.Event()
    received = []

    def on_signal(signum, _frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = start_server(args.rest, args.listen, threads=args.threads, rest_timeout=args.rest_timeout)
    except (ListenError, ValueError) as exc:
        print(f"oip_grpc: {exc}", file=sys.stderr, flush=True)
        return 1
    LOG.info("OIP gRPC serving on %s, forwarding to %s (%d threads)", server.address, args.rest, args.threads)
    while not stop.wait(1.0):
        pass
    started = time.monotonic()
    server.stop(args.grace)
    LOG.info("stopped on %s after %.1f s", received[0] if received else "signal", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
