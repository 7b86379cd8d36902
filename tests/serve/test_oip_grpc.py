"""serve/oip_grpc.py, the Open Inference Protocol gRPC front, against a REST STAND-IN (not TorchServe).

These are unit tests of the gRPC ↔ REST translation: ``RestStandIn`` below is a small http.server + numpy
imitation of TorchServe's REST OIP surface (``/v2``, health, model metadata/ready, binary-data ``infer``,
``{"error": ...}`` bodies, Bearer token auth), written from the protocol, not from the real plugin.
The end-to-end tests of the gRPC front against a real TorchServe are separate (they need the Java
plugin and handlers and start a real server); nothing here starts TorchServe.

The front is driven by the STOCK ``tritonclient.grpc.InferenceServerClient`` with its defaults
(``set_data_from_numpy`` → ``raw_input_contents``) and by hand-built ``ModelInferRequest`` messages
(typed ``contents``, malformed requests) on the generated stub.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, triton_to_np_dtype

from paths import REPO_ROOT
from serve.oip_grpc import OipError, start_server


def np_dtype(datatype: str) -> np.dtype:
    """tritonclient's own numpy dtype for an OIP datatype, little-endian as the wire carries it."""
    return np.dtype(triton_to_np_dtype(datatype)).newbyteorder("<")


def serialize_bytes(values) -> bytes:
    """tritonclient's own BYTES framing of ``values``."""
    return serialize_byte_tensor(np.array(values, dtype=np.object_)).item()


TOKEN = "s3cret-inference-key"

# ------------------------------------------------------------------------------------ REST stand-in


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _classifier(inputs):
    x = inputs["input"]
    return [("probabilities", "FP32", softmax(x)), ("predicted_class", "INT64", x.argmax(axis=1).astype(np.int64))]


def _adder(inputs):
    a, b = inputs["a"], inputs["b"]
    return [
        ("sum", "FP32", (a + b).astype(np.float32)),
        ("diff", "FP32", (a - b).astype(np.float32)),
        ("b_twice", "INT64", (2 * b).astype(np.int64)),
    ]


def _echo(inputs):
    return [(f"{name}_out", datatype, value) for name, (datatype, value) in inputs["__typed__"].items()]


def _meta(name, inputs, outputs):
    return {
        "name": name, "versions": ["1.0"], "platform": "pytorch_torchserve",
        "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in inputs],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs],
    }


STAND_IN_MODELS = {
    "classifier": (_meta("classifier", [("input", "FP32", [-1, 4])],
                         [("probabilities", "FP32", [-1, 4]), ("predicted_class", "INT64", [-1])]), _classifier),
    "adder": (_meta("adder", [("a", "FP32", [-1, 3]), ("b", "INT32", [-1, 3])],
                    [("sum", "FP32", [-1, 3]), ("diff", "FP32", [-1, 3]), ("b_twice", "INT64", [-1, 3])]), _adder),
    "echo": (_meta("echo", [], []), _echo),
    "jsonout": (_meta("jsonout", [], []), _echo),  # answers JSON "data" even when binary was asked for
    "slow": (_meta("slow", [], []), _echo),  # sleeps 1 s first
    "loading": (_meta("loading", [], []), _echo),  # known but not ready
}


class RestStandIn:
    """A threaded HTTP/1.1 keep-alive server speaking the REST OIP surface the gRPC front forwards to."""

    def __init__(self, port: int = 0):
        self.token: str | None = None
        self.torchserve_auth = False  # refuse a key as TorchServe 0.12 does (400 InvalidKeyException), not 401
        self.drop_connections = False  # close each connection after its response, without saying so
        self.auth_seen: list[str | None] = []
        self.paths: list[tuple[str, str]] = []
        self.infer_headers: list[dict] = []
        self.peers: list[tuple[str, int]] = []  # the client address (connection) of every request
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        handler = type("Handler", (_StandInHandler,), {"standin": self})
        self.httpd = _QuietServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.token = None
        self.torchserve_auth = False
        self.drop_connections = False
        with self._lock:
            self.auth_seen.clear()
            self.paths.clear()
            self.infer_headers.clear()
            self.peers.clear()

    def close(self) -> None:
        """Stop accepting and cut every open keep-alive connection (as a REST restart would)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # e.g. a caller that gave up on "slow"
            super().handle_error(request, client_address)


class _StandInHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    standin: RestStandIn

    def log_message(self, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        with self.standin._lock:
            self.standin._sockets.append(self.connection)

    # ------------------------------------------------------------------------------------ replies

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        if self.standin.drop_connections:
            self.close_connection = True

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization")
        with self.standin._lock:
            self.standin.auth_seen.append(auth)
            self.standin.paths.append((self.command, self.path))
            self.standin.peers.append(self.client_address)
        if self.standin.token and auth != f"Bearer {self.standin.token}":
            message = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
            if self.standin.torchserve_auth:
                self._json(400, {"code": 400, "type": "InvalidKeyException", "message": message, "error": message})
            else:
                self._error(401, message)
            return False
        return True

    def _model(self, parts: list[str]):
        """(name, metadata, fn, rest) for /v2/models/{m}[/versions/{v}]/rest..., or None after a 404."""
        name, rest = parts[0], parts[1:]
        if name.startswith("status-"):
            status = int(name.split("-")[1])
            self._error(status, f"stand-in answers {status}")
            return None
        if name not in STAND_IN_MODELS:
            self._error(404, f"Model not found: {name}")
            return None
        if rest[:1] == ["versions"]:
            if rest[1:2] != ["1.0"]:
                self._error(404, f"Model version not found: {name}/{'/'.join(rest[1:2])}")
                return None
            rest = rest[2:]
        meta, fn = STAND_IN_MODELS[name]
        return name, meta, fn, rest

    # ------------------------------------------------------------------------------------ routes

    def do_GET(self):
        if not self._authorized():
            return
        parts = self.path.strip("/").split("/")
        if parts == ["v2"]:
            return self._json(200, {"name": "torchserve", "version": "0.12.0", "extensions": ["binary_tensor_data"]})
        if parts in (["v2", "health", "live"], ["v2", "health", "ready"]):
            return self._json(200, {})
        if parts[:2] == ["v2", "models"] and len(parts) > 2:
            found = self._model(parts[2:])
            if found is None:
                return
            name, meta, _, rest = found
            if rest == []:
                return self._json(200, meta)
            if rest == ["ready"]:
                return self._json(400, {"error": "not ready"}) if name == "loading" else self._json(200, {})
        self._error(404, f"no route {self.path}")

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        if not self._authorized():
            return
        parts = self.path.strip("/").split("/")
        if parts[:2] != ["v2", "models"] or len(parts) < 4 or parts[-1] != "infer":
            return self._error(404, f"no route {self.path}")
        found = self._model(parts[2:-1])
        if found is None:
            return
        name, _, fn, rest = found
        if rest != []:
            return self._error(404, f"no route {self.path}")
        header_length = self.headers.get("Inference-Header-Content-Length")
        if header_length is None:
            return self._error(400, "stand-in expects binary data")
        header = json.loads(body[: int(header_length)])
        with self.standin._lock:
            self.standin.infer_headers.append(header)
        offset, inputs, typed = int(header_length), {}, {}
        for tensor in header["inputs"]:
            size = tensor["parameters"]["binary_data_size"]
            raw = body[offset: offset + size]
            offset += size
            if tensor["datatype"] == "BYTES":
                typed[tensor["name"]] = ("BYTES", raw)
                continue
            dtype = np_dtype(tensor["datatype"])
            if len(raw) != int(np.prod(tensor["shape"])) * dtype.itemsize:
                return self._error(400, f"stand-in: wrong size for {tensor['name']}")
            value = np.frombuffer(raw, dtype=dtype).reshape(tensor["shape"])
            inputs[tensor["name"]] = value
            typed[tensor["name"]] = (tensor["datatype"], value)
        if offset != len(body):
            return self._error(400, "stand-in: trailing bytes")
        if name == "slow":
            time.sleep(1.0)
        inputs["__typed__"] = typed
        try:
            produced = fn(inputs)
        except KeyError as exc:
            return self._error(400, f"missing input {exc}")
        binary_all = bool(header.get("parameters", {}).get("binary_data_output"))
        wanted = {o["name"]: o.get("parameters", {}) for o in header.get("outputs", [])}
        unknown = set(wanted) - {n for n, _, _ in produced}
        if unknown:
            return self._error(400, f"unknown output(s) {sorted(unknown)}")
        outputs, blobs = [], []
        for out_name, datatype, value in produced:  # the model's order, whatever order was asked for
            if wanted and out_name not in wanted:
                continue
            binary = (binary_all or wanted.get(out_name, {}).get("binary_data")) and name != "jsonout"
            if datatype == "BYTES":
                shape = [int(x) for x in header["inputs"][0]["shape"]]
                entry = {"name": out_name, "datatype": "BYTES", "shape": shape}
                data = value
                json_data = None
            else:
                entry = {"name": out_name, "datatype": datatype, "shape": list(value.shape)}
                data = np.ascontiguousarray(value, dtype=np_dtype(datatype)).tobytes()
                json_data = value.reshape(-1).tolist()
            if binary:
                entry["parameters"] = {"binary_data_size": len(data)}
                blobs.append(data)
            else:
                entry["data"] = json_data
            outputs.append(entry)
        response = {"model_name": name, "model_version": "1.0", "outputs": outputs}
        if "id" in header:
            response["id"] = header["id"]
        json_header = json.dumps(response).encode()
        self._send(200, json_header + b"".join(blobs), {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(json_header)),
        })


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def standin_server():
    standin = RestStandIn()
    front = start_server(standin.url, "127.0.0.1:0", threads=4)
    yield standin, front
    front.stop(0)
    standin.close()


@pytest.fixture
def standin(standin_server):
    standin_server[0].reset()
    yield standin_server[0]
    standin_server[0].reset()


@pytest.fixture
def front(standin_server, standin):
    return standin_server[1]


@pytest.fixture
def client(front):
    with triton.InferenceServerClient(f"127.0.0.1:{front.port}") as c:
        yield c


@pytest.fixture
def stub(front):
    channel = grpc.insecure_channel(f"127.0.0.1:{front.port}")
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raw_request(model: str, tensors: list[tuple[str, str, list[int], bytes]], **kwargs) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **kwargs)
    for name, datatype, shape, data in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(data)
    return request


def grpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


# ------------------------------------------------------------------------------- health, metadata


def test_health_server_metadata_and_model_ready(client, standin):
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    meta = client.get_server_metadata()
    assert (meta.name, meta.version, list(meta.extensions)) == ("torchserve", "0.12.0", ["binary_tensor_data"])
    assert client.is_model_ready("classifier") is True
    assert client.is_model_ready("classifier", "1.0") is True
    assert client.is_model_ready("loading") is False
    with pytest.raises(InferenceServerException) as info:
        client.is_model_ready("nosuchmodel")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert ("GET", "/v2/models/classifier/versions/1.0/ready") in standin.paths


def test_model_metadata(client, standin):
    meta = client.get_model_metadata("adder", as_json=True)
    assert meta["name"] == "adder" and meta["versions"] == ["1.0"] and meta["platform"] == "pytorch_torchserve"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("a", "FP32", ["-1", "3"]), ("b", "INT32", ["-1", "3"])]  # int64 shapes print as strings in proto JSON
    assert [t["name"] for t in meta["outputs"]] == ["sum", "diff", "b_twice"]
    versioned = client.get_model_metadata("adder", "1.0")
    assert versioned.name == "adder" and list(versioned.inputs[0].shape) == [-1, 3]
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("adder", "9.9")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "Model version not found" in info.value.message()


def test_model_metadata_of_the_registry_passes_unchanged(standin, stub, monkeypatch):
    from models.registry import REGISTRY

    spec = REGISTRY["mnistnet"]
    monkeypatch.setitem(STAND_IN_MODELS, "mnistnet", (spec.oip_metadata(), _classifier))
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="mnistnet"))
    expected = spec.oip_metadata()
    assert meta.name == expected["name"] and list(meta.versions) == expected["versions"]
    assert meta.platform == expected["platform"]
    for kind in ("inputs", "outputs"):
        got = [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in getattr(meta, kind)]
        assert got == expected[kind]


# ------------------------------------------------------------------------------------------ infer


def test_infer_stock_client_raw_inputs_all_outputs(client, standin):
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("classifier", [inp], request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("probabilities"), softmax(x), rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("predicted_class"), x.argmax(axis=1))
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-7", "classifier", "1.0")
    assert [o.name for o in response.outputs] == ["probabilities", "predicted_class"]
    assert [list(o.shape) for o in response.outputs] == [[5, 4], [5]]
    assert [o.datatype for o in response.outputs] == ["FP32", "INT64"]
    # ONE binary REST request: binary input, all outputs asked for as binary
    assert standin.paths == [("POST", "/v2/models/classifier/infer")]
    (header,) = standin.infer_headers
    assert header["id"] == "req-7" and "outputs" not in header
    assert header["parameters"] == {"binary_data_output": True}
    assert header["inputs"] == [
        {"name": "input", "shape": [5, 4], "datatype": "FP32", "parameters": {"binary_data_size": 80}}]


def test_infer_requested_outputs_in_requested_order_and_version(client, standin):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1, -2, 3], [40, 50, -60]], dtype=np.int32)
    # inputs deliberately in the reverse of the metadata's order
    inputs = [triton.InferInput("b", [2, 3], "INT32"), triton.InferInput("a", [2, 3], "FP32")]
    inputs[0].set_data_from_numpy(b)
    inputs[1].set_data_from_numpy(a)
    outputs = [triton.InferRequestedOutput("b_twice"), triton.InferRequestedOutput("sum")]
    result = client.infer("adder", inputs, model_version="1.0", outputs=outputs)
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["b_twice", "sum"]  # the stand-in answers sum first
    np.testing.assert_array_equal(result.as_numpy("b_twice"), 2 * b.astype(np.int64))
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    assert result.as_numpy("diff") is None
    assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == (2 * b).reshape(-1).tolist()
    assert standin.paths == [("POST", "/v2/models/adder/versions/1.0/infer")]
    (header,) = standin.infer_headers
    assert [t["name"] for t in header["inputs"]] == ["b", "a"]
    assert header["outputs"] == [
        {"name": "b_twice", "parameters": {"binary_data": True}}, {"name": "sum", "parameters": {"binary_data": True}}]
    assert "binary_data_output" not in header["parameters"]


def test_infer_typed_fp32_contents_matches_raw(stub, standin):
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="classifier", id="typed")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[3, 4])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    typed = stub.ModelInfer(request)
    raw = stub.ModelInfer(raw_request("classifier", [("input", "FP32", [3, 4], x.tobytes())], id="typed"))
    assert typed == raw
    assert typed.id == "typed" and typed.model_name == "classifier"
    probabilities = np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(3, 4)
    np.testing.assert_allclose(probabilities, softmax(x), rtol=1e-6)
    assert [h["inputs"][0]["parameters"]["binary_data_size"] for h in standin.infer_headers] == [48, 48]


@pytest.mark.parametrize(
    "datatype, field, values",
    [
        ("BOOL", "bool_contents", [True, False, True, True]),
        ("INT8", "int_contents", [-128, 127, 0, -1]),
        ("INT16", "int_contents", [-32768, 32767, 5, -5]),
        ("INT32", "int_contents", [-2**31, 2**31 - 1, 7, 0]),
        ("INT64", "int64_contents", [-2**63, 2**63 - 1, 1, 2]),
        ("UINT8", "uint_contents", [0, 255, 1, 2]),
        ("UINT16", "uint_contents", [0, 65535, 3, 4]),
        ("UINT32", "uint_contents", [0, 2**32 - 1, 5, 6]),
        ("UINT64", "uint64_contents", [0, 2**64 - 1, 7, 8]),
        ("FP32", "fp32_contents", [0.5, -1.25, 3e38, 1e-3]),
        ("FP64", "fp64_contents", [0.1, -2.5, 1e300, -0.0]),
    ],
)
def test_typed_contents_become_little_endian_bytes(stub, standin, datatype, field, values):
    request = pb.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, 2])
    getattr(tensor.contents, field).extend(values)
    response = stub.ModelInfer(request)
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("x_out", datatype, [2, 2])
    expected = np.array(values, dtype=np_dtype(datatype))
    assert response.raw_output_contents[0] == expected.tobytes()


def test_typed_bytes_contents_and_raw_bytes(stub, client, standin):
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="s", datatype="BYTES", shape=[3]).contents.bytes_contents.extend([b"ab", b"", b"\xff\x00"])
    response = stub.ModelInfer(request)
    assert response.raw_output_contents[0] == serialize_bytes([b"ab", b"", b"\xff\x00"])
    strings = np.array([b"hello", b"w"], dtype=np.object_)
    inp = triton.InferInput("s", [2], "BYTES")
    inp.set_data_from_numpy(strings)
    assert client.infer("echo", [inp]).as_numpy("s_out").tolist() == [b"hello", b"w"]


def test_json_outputs_from_rest_are_converted(client, standin):
    a = np.array([[1.5, -2.0]], dtype=np.float32)
    inp = triton.InferInput("a", [1, 2], "FP32")
    inp.set_data_from_numpy(a)
    result = client.infer("jsonout", [inp])
    np.testing.assert_array_equal(result.as_numpy("a_out"), a)


def test_large_request_passes_message_limits(client, standin):
    # 1024 x 1568 FP32 = 6.4 MB each way: over gRPC's 4 MiB default in both directions
    x = np.random.default_rng(2).random((1024, 1568), dtype=np.float32)
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("echo", [inp]).as_numpy("x_out"), x)


def test_concurrent_calls(front, standin):
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(1, 4)).astype(np.float32) for _ in range(16)]

    def call(x):
        with triton.InferenceServerClient(f"127.0.0.1:{front.port}") as c:
            inp = triton.InferInput("input", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            return c.infer("classifier", [inp]).as_numpy("predicted_class")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, batches))
    assert [r.tolist() for r in results] == [x.argmax(axis=1).tolist() for x in batches]


# ----------------------------------------------------------------------------- invalid requests


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: raw_request("classifier", [("input", "FP32", [2, 2], b"\0" * 15)]),
         "input 'input': 15 bytes of raw_input_contents, but shape [2, 2] of FP32 needs 4 x 4 = 16"),
        (lambda: raw_request("adder", [("a", "FP32", [1, 3], b"\0" * 12), ("b", "INT32", [1, 3], b"\0" * 16)]),
         "input 'b': 16 bytes"),
        (lambda: raw_request("classifier", [("input", "FP32", [-1, 4], b"")]), "negative dimension"),
        (lambda: raw_request("classifier", [("input", "FP99", [1], b"\0" * 4)]), "unknown datatype 'FP99'"),
        (lambda: raw_request("echo", [("s", "BYTES", [2], serialize_bytes([b"abc"]))]), "ends after 1 of 2"),
        (lambda: raw_request("classifier", []), "the request has no inputs"),
    ],
)
def test_raw_size_mismatch_is_invalid_argument_before_forwarding(stub, standin, build, message):
    error = grpc_error(stub.ModelInfer, build())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert standin.paths == []


def test_typed_and_mixed_mistakes_are_invalid_argument(stub, standin):
    request = pb.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend([1.0] * 7)
    error = grpc_error(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "input 'input': 7 values in contents.fp32_contents, but shape [2, 4] needs 8"

    request = pb.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="input", datatype="FP32", shape=[2]).contents.int64_contents.extend([1, 2])
    assert "belongs in contents.fp32_contents, not in contents.int64_contents" in grpc_error(
        stub.ModelInfer, request).details()

    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="INT8", shape=[2]).contents.int_contents.extend([1, 300])
    assert "out of range for INT8" in grpc_error(stub.ModelInfer, request).details()

    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    assert "FP16 can only be sent in raw_input_contents" in grpc_error(stub.ModelInfer, request).details()

    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    assert "has no data" in grpc_error(stub.ModelInfer, request).details()

    request = raw_request("adder", [("a", "FP32", [1, 3], b"\0" * 12)])
    request.inputs.add(name="b", datatype="INT32", shape=[1, 3]).contents.int_contents.extend([1, 2, 3])
    assert "1 raw_input_contents for 2 inputs" in grpc_error(stub.ModelInfer, request).details()

    request = raw_request("classifier", [("input", "FP32", [1], b"\0" * 4)])
    request.inputs[0].contents.fp32_contents.append(1.0)
    assert "both contents and raw_input_contents" in grpc_error(stub.ModelInfer, request).details()

    request = raw_request("echo", [("x", "FP32", [1], b"\0" * 4), ("x", "FP32", [1], b"\0" * 4)])
    assert "appears more than once" in grpc_error(stub.ModelInfer, request).details()

    request = raw_request("", [("x", "FP32", [1], b"\0" * 4)])
    assert grpc_error(stub.ModelInfer, request).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert standin.paths == []


# -------------------------------------------------------------------------------- auth and errors


@pytest.mark.parametrize("torchserve_auth", [False, True], ids=["401", "torchserve-400-InvalidKeyException"])
def test_authorization_metadata_is_forwarded_unchanged(front, standin, torchserve_auth):
    standin.token = TOKEN
    standin.torchserve_auth = torchserve_auth
    x = np.ones((1, 4), dtype=np.float32)
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    with triton.InferenceServerClient(f"127.0.0.1:{front.port}") as client:
        good = {"authorization": f"Bearer {TOKEN}"}
        assert client.infer("classifier", [inp], headers=good).as_numpy("predicted_class").tolist() == [0]
        assert client.is_server_live(headers=good) and client.is_model_ready("classifier", headers=good)
        assert client.get_model_metadata("classifier", headers=good).name == "classifier"
        assert client.get_server_metadata(headers=good).name == "torchserve"
        assert standin.auth_seen == [f"Bearer {TOKEN}"] * 5
        standin.auth_seen.clear()
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            for call in (lambda: client.infer("classifier", [inp], headers=headers),
                         lambda: client.is_server_ready(headers=headers),
                         lambda: client.is_model_ready("loading", headers=headers),
                         lambda: client.get_model_metadata("classifier", headers=headers)):
                with pytest.raises(InferenceServerException) as info:
                    call()
                assert info.value.status() == "StatusCode.UNAUTHENTICATED"
                assert info.value.message().startswith("Token Authorization failed")
        assert standin.auth_seen == [None] * 4 + ["Bearer wrong"] * 4 + [TOKEN] * 4


@pytest.mark.parametrize(
    "status, code",
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT), (413, grpc.StatusCode.INVALID_ARGUMENT),
        (422, grpc.StatusCode.INVALID_ARGUMENT), (401, grpc.StatusCode.UNAUTHENTICATED),
        (403, grpc.StatusCode.PERMISSION_DENIED), (404, grpc.StatusCode.NOT_FOUND),
        (408, grpc.StatusCode.DEADLINE_EXCEEDED), (504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (429, grpc.StatusCode.UNAVAILABLE), (503, grpc.StatusCode.UNAVAILABLE),
        (500, grpc.StatusCode.INTERNAL), (502, grpc.StatusCode.INTERNAL), (409, grpc.StatusCode.INTERNAL),
    ],
)
def test_rest_status_maps_to_grpc_code(stub, standin, status, code):
    request = raw_request(f"status-{status}", [("x", "FP32", [1], b"\0" * 4)])
    error = grpc_error(stub.ModelInfer, request)
    assert (error.code(), error.details()) == (code, f"stand-in answers {status}")
    error = grpc_error(stub.ModelMetadata, pb.ModelMetadataRequest(name=f"status-{status}"))
    assert (error.code(), error.details()) == (code, f"stand-in answers {status}")


def test_unknown_model_and_version_are_not_found(client, standin):
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    for kwargs in ({"model_name": "nosuchmodel"}, {"model_name": "classifier", "model_version": "2.0"},
                   {"model_name": "../classifier"}):
        with pytest.raises(InferenceServerException) as info:
            client.infer(inputs=[inp], **kwargs)
        assert info.value.status() == "StatusCode.NOT_FOUND"
    assert info.value.message() == "Model not found: ..%2Fclassifier"
    assert ("POST", "/v2/models/..%2Fclassifier/infer") in standin.paths  # percent-encoded, no path tricks


def test_unimplemented_rpcs(client):
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("classifier")
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"


def test_rest_unreachable_is_unavailable():
    front = start_server(f"http://127.0.0.1:{free_port()}", "127.0.0.1:0", threads=2)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{front.port}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for call, request in ((stub.ServerLive, pb.ServerLiveRequest()),
                              (stub.ModelInfer, raw_request("m", [("x", "FP32", [1], b"\0" * 4)]))):
            error = grpc_error(call, request)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "cannot reach http://127.0.0.1:" in error.details()
        channel.close()
    finally:
        front.stop(0)


def test_rest_timeout_is_deadline_exceeded():
    standin = RestStandIn()
    front = start_server(standin.url, "127.0.0.1:0", threads=2, rest_timeout=0.3)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            error = grpc_error(stub.ModelInfer, raw_request("slow", [("x", "FP32", [1], b"\0" * 4)]))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # the caller's own deadline is honoured too (and the connection is usable afterwards)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    finally:
        front.stop(0)
        standin.close()


# ------------------------------------------------------------------------------------ connections


def test_connections_are_kept_alive(client, standin):
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    for _ in range(30):
        client.infer("classifier", [inp])
    assert len(standin.paths) == 30
    assert 1 <= len(set(standin.peers)) <= 4  # at most one per gRPC thread (threads=4)


def test_dropped_connections_are_reopened(client, standin):
    standin.drop_connections = True  # every response closes its connection without a Connection: close
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    for _ in range(10):
        assert client.infer("classifier", [inp]).as_numpy("predicted_class").tolist() == [0]
    assert len(standin.paths) == 10 and len(set(standin.peers)) == 10


def test_rest_restart_recovers():
    port = free_port()
    standin = RestStandIn(port)
    front = start_server(standin.url, "127.0.0.1:0", threads=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = raw_request("classifier", [("input", "FP32", [1, 4], b"\0" * 16)])
            assert stub.ModelInfer(request).model_name == "classifier"
            standin.close()
            assert grpc_error(stub.ModelInfer, request).code() == grpc.StatusCode.UNAVAILABLE
            standin = RestStandIn(port)
            assert stub.ModelInfer(request).model_name == "classifier"
    finally:
        front.stop(0)
        standin.close()


# --------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "serve.oip_grpc", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_exits_cleanly_on_signal(standin, sig):
    port = free_port()
    process = _cli("--listen", f"127.0.0.1:{port}", "--rest", standin.url, "--threads", "2")
    try:
        line = process.stdout.readline()
        assert f"OIP gRPC serving on 127.0.0.1:{port}, forwarding to {standin.url}" in line
        with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
            assert client.is_server_live()
        process.send_signal(sig)
        assert process.wait(timeout=20) == 0
        assert "stopped on " + sig.name in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_port_in_use_exits_non_zero_naming_the_address():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        process = _cli("--listen", address, "--rest", "http://127.0.0.1:1")
        output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    lines = output.strip().splitlines()
    assert len(lines) == 1 and address in lines[0], output


def test_oip_error_carries_code():
    error = OipError(grpc.StatusCode.NOT_FOUND, "x")
    assert (error.code, error.message, str(error)) == (grpc.StatusCode.NOT_FOUND, "x", "x")
