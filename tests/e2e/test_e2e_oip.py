"""The Open Inference Protocol surface, driven by the STOCK clients (tritonclient http and grpc, defaults on:
binary tensors) against the session's real TorchServe (REST: TorchServe + serve/torchserve/java; gRPC: the same agent, inside the JVM).

Every endpoint (server live/ready/metadata, model ready/metadata, infer) for every model, with and
without a version; datatypes FP32, FP64, UINT8, INT64; JSON and binary both ways; requested-output
subsets; a 256-image request; and the malformed requests of the binary extension, sent raw, each of which
must get a 4xx JSON error naming the problem while the workers keep serving.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import requests

import tritonclient.grpc as tritongrpc  # pinned in requirements-dev.txt: imported plainly, never skipped
import tritonclient.http as tritonhttp
from tritonclient.utils import InferenceServerException

from client.api import binary_v2_request, parse_binary_v2_response
from e2e_support import TOLERANCE
from servers import post, workers
from models.registry import REGISTRY, get_spec

pytestmark = pytest.mark.e2e
ALL_MODELS = list(REGISTRY)


@pytest.fixture
def auth(server) -> dict[str, str]:
    """A fresh dict per test: tritonclient.http writes Inference-Header-Content-Length into the headers
    dict it is given, so a shared one would carry a stale length into the next JSON request."""
    return {"Authorization": f"Bearer {server.keys()['inference']}"}


@pytest.fixture
def grpc_auth(auth) -> dict[str, str]:
    return {"authorization": auth["Authorization"]}


def sample_inputs(name: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` valid float32 samples in the metadata's input shape: real-looking digits or table rows."""
    spec = get_spec(name)
    rng = np.random.default_rng(seed)
    if spec.is_image_model:
        return rng.random((n, *spec.input_shape), dtype=np.float32)
    return rng.normal(size=(n, *spec.input_shape)).astype(np.float32)


def expected(reference, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The outputs the server must return for float32 inputs ``x`` (intensities for image models)."""
    spec = get_spec(name)
    model_input = x
    if spec.normalize:
        mean, std = spec.normalize
        model_input = ((x - np.float32(mean)) / np.float32(std)).astype(np.float32)
    out = reference(name, model_input)
    if spec.task == "classification":
        return {"probabilities": out, "predicted_class": out.argmax(axis=1)}
    if spec.task == "binary":
        return {"probabilities": out, "predicted_class": (out >= 0.5).astype(np.int64)}
    return {"predictions": out}


def infer_input(module, x: np.ndarray, datatype: str = "FP32", binary: bool = True):
    tensor = module.InferInput("input", list(x.shape), datatype)
    if module is tritonhttp:
        tensor.set_data_from_numpy(x, binary_data=binary)
    else:
        tensor.set_data_from_numpy(x)
    return tensor


# -------------------------------------------------------------------------------- health, metadata


def test_server_live_ready_and_metadata_over_both_protocols(http, grpc, auth, grpc_auth):
    assert http.is_server_live(headers=auth) and http.is_server_ready(headers=auth)
    assert grpc.is_server_live(headers=grpc_auth) and grpc.is_server_ready(headers=grpc_auth)
    rest = http.get_server_metadata(headers=auth)
    assert "binary_tensor_data" in rest["extensions"] and rest["version"]
    over_grpc = grpc.get_server_metadata(headers=grpc_auth, as_json=True)
    assert over_grpc["name"] == rest["name"] and "binary_tensor_data" in over_grpc["extensions"]


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("version", ["", "1.0"])
def test_model_ready_and_metadata_come_from_the_registry(http, grpc, auth, grpc_auth, name, version):
    spec = get_spec(name).oip_metadata()
    assert http.is_model_ready(name, version, headers=auth)
    assert grpc.is_model_ready(name, version, headers=grpc_auth)
    for metadata in (http.get_model_metadata(name, version, headers=auth),
                     grpc.get_model_metadata(name, version, headers=grpc_auth, as_json=True)):
        assert metadata["name"] == name and metadata["versions"] == ["1.0"]
        assert metadata["platform"] == "pytorch_torchserve"
        for side in ("inputs", "outputs"):
            got = [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata[side]]
            assert got == [(t["name"], t["datatype"], t["shape"]) for t in spec[side]]


def test_unknown_model_and_version_are_404_json_naming_them(http, grpc, auth, grpc_auth, server):
    for path in ("/v2/models/nosuch", "/v2/models/nosuch/ready", "/v2/models/mnistnet/versions/9.9",
                 "/v2/models/mnistnet/versions/9.9/ready"):
        response = requests.get(server.inference_url + path, headers=auth, timeout=30)
        assert response.status_code == 404, path
        assert "nosuch" in response.json()["error"] or "9.9" in response.json()["error"]
    assert not http.is_model_ready("nosuch", headers=auth)
    with pytest.raises(InferenceServerException) as err:
        http.get_model_metadata("nosuch", headers=auth)
    assert err.value.status() == "404" and "nosuch" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        grpc.get_model_metadata("nosuch", headers=grpc_auth)
    assert "NOT_FOUND" in str(err.value.status()) and "nosuch" in err.value.message()


# ------------------------------------------------------------------------------------------ infer


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("version", ["", "1.0"])
def test_stock_http_client_defaults_binary_every_model(http, auth, reference, name, version):
    x = sample_inputs(name, 3)
    result = http.infer(name, [infer_input(tritonhttp, x)], model_version=version, headers=auth)
    response = result.get_response()
    assert response["model_name"] == name and response["model_version"] == "1.0"
    for output, want in expected(reference, name, x).items():
        got = result.as_numpy(output)
        assert got.shape == want.shape, output
        np.testing.assert_allclose(got, want, atol=TOLERANCE)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_stock_grpc_client_defaults_raw_contents_every_model(grpc, grpc_auth, reference, name):
    x = sample_inputs(name, 4, seed=1)
    result = grpc.infer(name, [infer_input(tritongrpc, x)], headers=grpc_auth, model_version="1.0")
    for output, want in expected(reference, name, x).items():
        np.testing.assert_allclose(result.as_numpy(output), want, atol=TOLERANCE)


def test_json_tensors_both_ways_and_requested_output_subset(http, auth, reference):
    x = sample_inputs("mnistnet", 2)
    outputs = [tritonhttp.InferRequestedOutput("predicted_class", binary_data=False)]
    result = http.infer("mnistnet", [infer_input(tritonhttp, x, binary=False)], outputs=outputs, headers=auth)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["predicted_class"]
    assert response["outputs"][0]["data"] == expected(reference, "mnistnet", x)["predicted_class"].tolist()


def test_datatypes_fp64_uint8_int64(http, grpc, auth, grpc_auth, reference, mnist_test):
    images, labels = mnist_test
    pixels = images[:8].reshape(8, 784)
    want = expected(reference, "mnistnet", pixels.astype(np.float32) / 255)
    for client, headers, module in ((http, auth, tritonhttp), (grpc, grpc_auth, tritongrpc)):
        uint8 = client.infer("mnistnet", [infer_input(module, pixels, "UINT8")], headers=headers)
        np.testing.assert_allclose(uint8.as_numpy("probabilities"), want["probabilities"], atol=TOLERANCE)
        assert (uint8.as_numpy("predicted_class") == labels[:8]).mean() >= 0.75
        fp64 = client.infer("mnistnet", [infer_input(module, pixels / 255.0, "FP64")], headers=headers)
        np.testing.assert_allclose(fp64.as_numpy("probabilities"), want["probabilities"], atol=TOLERANCE)
    rows = np.array([[-3], [0], [7]], dtype=np.int64)
    result = http.infer("linearregression", [infer_input(tritonhttp, rows, "INT64")], headers=auth)
    np.testing.assert_allclose(result.as_numpy("predictions"), expected(reference, "linearregression",
                               rows.astype(np.float32))["predictions"], atol=TOLERANCE)


def test_256_real_digits_in_one_binary_request(http, grpc, auth, grpc_auth, mnist_test):
    images, labels = mnist_test
    x = (images[:256].astype(np.float32) / 255).reshape(256, 784)
    for client, headers, module in ((http, auth, tritonhttp), (grpc, grpc_auth, tritongrpc)):
        result = client.infer("mnistnet", [infer_input(module, x)], headers=headers)
        accuracy = (result.as_numpy("predicted_class") == labels[:256]).mean()
        assert result.as_numpy("probabilities").shape == (256, 10) and accuracy > 0.95


# --------------------------------------------------------------------------------------- bad input


def raw_binary(header: dict, data: bytes, header_length: int | None = None) -> tuple[bytes, dict]:
    encoded = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream"}
    headers["Inference-Header-Content-Length"] = str(len(encoded) if header_length is None else header_length)
    return encoded + data, headers


def one_input(shape, datatype="FP32", size=None, **extra) -> dict:
    params = {} if size is None else {"binary_data_size": size}
    return {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "parameters": params, **extra}]}


GOOD = np.zeros((1, 784), np.float32).tobytes()
MALFORMED = {
    "header length past the body": raw_binary(one_input([1, 784], size=3136), GOOD, header_length=10**6),
    "header length not a number": (GOOD, {"Inference-Header-Content-Length": "abc"}),
    "negative header length": raw_binary(one_input([1, 784], size=3136), GOOD, header_length=-5),
    "header is not JSON": (b"{nope" + GOOD, {"Inference-Header-Content-Length": "5"}),
    "data shorter than declared": raw_binary(one_input([1, 784], size=3136), GOOD[:100]),
    "trailing bytes": raw_binary(one_input([1, 784], size=3136), GOOD + b"xxxx"),
    "size not shape x datatype": raw_binary(one_input([1, 784], size=784), GOOD[:784]),
    "absurd declared size": raw_binary(one_input([1, 784], size=2**62), GOOD),
    "absurd shape": raw_binary(one_input([2**40, 784], size=3136), GOOD),
    "negative size": raw_binary(one_input([1, 784], size=-4), GOOD),
    "wrong shape": raw_binary(one_input([1, 10], size=40), GOOD[:40]),
    "BYTES datatype": raw_binary(one_input([1, 784], "BYTES", size=3136), GOOD),
    "unknown requested output": raw_binary({**one_input([1, 784], size=3136), "outputs": [{"name": "nosuch"}]}, GOOD),
    "no inputs": raw_binary({"id": "x"}, b""),
}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("route", ["/v2/models/mnistnet/infer", "/v2/models/mnistnet/versions/1.0/infer"])
def test_malformed_binary_requests_get_4xx_json(server, auth, case, route):
    body, headers = MALFORMED[case]
    response = post(server, route, data=body, headers={**headers, **auth})
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:300])
    assert response.json()["error"], case


def test_bad_requests_through_the_stock_clients_are_clear(http, grpc, auth, grpc_auth):
    wrong_shape = np.zeros((1, 10), np.float32)
    with pytest.raises(InferenceServerException) as err:
        http.infer("mnistnet", [infer_input(tritonhttp, wrong_shape)], headers=auth)
    assert err.value.status() == "400" and "shape" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        grpc.infer("mnistnet", [infer_input(tritongrpc, wrong_shape)], headers=grpc_auth)
    assert "INVALID_ARGUMENT" in str(err.value.status()) and "shape" in err.value.message()
    for client, headers, module in ((http, auth, tritonhttp), (grpc, grpc_auth, tritongrpc)):
        with pytest.raises(InferenceServerException) as err:
            client.infer("nosuch", [infer_input(module, np.zeros((1, 784), np.float32))], headers=headers)
        assert "nosuch" in err.value.message()
        with pytest.raises(InferenceServerException) as err:
            client.infer("mnistnet", [infer_input(module, np.zeros((1, 784), np.float32))], model_version="9.9",
                         headers=headers)
        assert "9.9" in err.value.message()


def test_requests_without_the_key_are_refused_on_both_protocols(http, grpc):
    with pytest.raises(InferenceServerException):
        http.infer("mnistnet", [infer_input(tritonhttp, np.zeros((1, 784), np.float32))])
    with pytest.raises(InferenceServerException) as err:
        grpc.infer("mnistnet", [infer_input(tritongrpc, np.zeros((1, 784), np.float32))])
    assert "UNAUTHENTICATED" in str(err.value.status())


def test_bad_requests_do_not_disturb_their_batch_neighbours(server, auth, reference):
    """Good and malformed binary requests at once (so they share batches): the good ones get their answers.

    Plain requests in threads: tritonclient.http runs on gevent and must not be called from several threads."""
    before = workers(server)
    x = sample_inputs("mnistnet", 1, seed=5)
    want = expected(reference, "mnistnet", x)["probabilities"]
    body, header_length = binary_v2_request(x)
    results, errors = [], []

    def good():
        headers = {**auth, "Inference-Header-Content-Length": str(header_length),
                   "Content-Type": "application/octet-stream"}
        response = post(server, "/v2/models/mnistnet/infer", data=body, headers=headers)
        answer = parse_binary_v2_response(response.content, response.headers.get("Inference-Header-Content-Length"))
        results.append(next(o["data"] for o in answer["outputs"] if o["name"] == "probabilities"))

    def bad(case):
        body, headers = MALFORMED[case]
        errors.append(post(server, "/v2/models/mnistnet/infer", data=body, headers={**headers, **auth}).status_code)

    threads = [threading.Thread(target=good) for _ in range(12)]
    threads += [threading.Thread(target=bad, args=(case,)) for case in list(MALFORMED)[:8]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 12 and all(np.allclose(r, want, atol=TOLERANCE) for r in results)
    assert len(errors) == 8 and all(400 <= code < 500 for code in errors)
    assert workers(server) == before
