"""handlers/protocols.py through the real handlers and TorchServe's own Context/RequestProcessor objects:
Open Inference Protocol JSON and binary (requests built and responses parsed by tritonclient.http, to
prove wire compatibility), KServe v1, malformed requests, mixed batches and TorchServe's envelopes."""
from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from test_handlers import _frame_request, _through_worker_socket, png, serve, softmax_of
from ts.context import RequestProcessor
from ts.protocol.otf_message_handler import create_predict_response
from ts.service import Service
from ts.torch_handler.request_envelope.kserve import KServeEnvelope
from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope

from handlers.decoding import MAX_SAMPLES
from handlers.protocols import decode_request, request_headers
from models.registry import get_spec
from train.data import mnist_arrays

from paths import REPO_ROOT as REPO
OIP = {"oip-request": "v2", "explain": "False"}


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    images, _ = mnist_arrays("test")
    return np.array(images[:8])


@pytest.fixture()
def mnist(tmp_path):
    return serve("mnistnet", tmp_path)


def triton_request(array: np.ndarray, datatype: str, outputs=None, request_id="", binary=True):
    """(body, headers) exactly as tritonclient.http sends an infer request for ``array`` (defaults kept)."""
    tensor = triton.InferInput("input", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=outputs, request_id=request_id)
    headers = dict(OIP)
    if header_length is not None:
        headers["inference-header-content-length"] = str(header_length)
    return body, headers


def raw_request(header: dict, *blobs: bytes, header_length=None) -> tuple[bytes, dict]:
    """A hand-made binary-extension request; ``header_length`` overrides the true JSON length."""
    text = json.dumps(header).encode()
    length = len(text) if header_length is None else header_length
    return text + b"".join(blobs), {**OIP, "inference-header-content-length": str(length)}


def handle(handler, context, requests: list[tuple]) -> list[bytes]:
    """handle() a batch of (payload, headers) pairs, one real RequestProcessor per request."""
    context.request_processor = [RequestProcessor(headers) for _, headers in requests]
    context.request_ids = {i: f"ts-req-{i}" for i in range(len(requests))}
    return handler.handle([{"body": payload} for payload, _ in requests], context)


def parse(context, idx: int, body: bytes):
    """tritonclient's own parser on our response, with our Inference-Header-Content-Length."""
    assert context.get_response_status(idx)[0] == 200, body[:300]
    length = context.get_response_headers(idx).get("Inference-Header-Content-Length")
    return triton.InferenceServerClient.parse_response_body(body, header_length=None if length is None else int(length))


def error(context, idx: int, body: bytes) -> tuple[int, str]:
    status = context.get_response_status(idx)[0]
    answer = json.loads(body)
    # No X-Request-ID sent: the body names the ID the frontend gave the job.
    assert answer == {"error": answer["error"], "code": status, "request_id": context.get_request_id(idx)}
    assert context.get_response_content_type(idx) == "application/json"
    return status, answer["error"]


# ------------------------------------------------------------------------------ binary extension


@pytest.mark.parametrize("datatype", ["UINT8", "FP32", "FP64", "FP16"])
def test_tritonclient_binary_request_and_response(mnist, digits, datatype):
    handler, context, reference = mnist
    if datatype == "UINT8":
        array, pixels = digits.reshape(8, 784), digits
    else:
        array = (digits / 255.0).astype(np.dtype(datatype.replace("FP", "float")).newbyteorder("<"))
        pixels = array.astype(np.float64) * 255.0
    body, headers = triton_request(array, datatype, request_id="r-1")
    (answer,) = handle(handler, context, [(body, headers)])
    result = parse(context, 0, answer)
    assert context.get_response_content_type(0) == "application/octet-stream"
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("mnistnet", "1.0", "r-1")
    assert [(o["name"], o["datatype"], o["shape"]) for o in response["outputs"]] == [
        ("probabilities", "FP32", [8, 10]), ("predicted_class", "INT64", [8])]
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in response["outputs"])
    expected = softmax_of(reference, pixels)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("predicted_class"), expected.argmax(axis=1))


def test_binary_matches_native_json_to_1e6_and_shapes(mnist, digits):
    handler, context, _ = mnist
    images = (digits / 255.0).astype(np.float32)
    requests = [
        triton_request(images.reshape(8, 784), "FP32"),
        triton_request(images.reshape(8, 28, 28), "FP32"),
        triton_request(images.reshape(8, 1, 28, 28), "FP32"),
        triton_request(images.reshape(8, 784), "FP32", binary=False),  # tritonclient's JSON data
        ({"data": images.astype(np.float64).tolist()}, {}),  # native
    ]
    answers = handle(handler, context, requests)
    native = np.array([a["probabilities"] for a in json.loads(answers[4])])
    for idx in range(4):
        np.testing.assert_allclose(parse(context, idx, answers[idx]).as_numpy("probabilities"), native, atol=1e-6)
    # tritonclient asks for binary outputs by default, also for a JSON-data request
    assert context.get_response_headers(3)["content-type"] == "application/octet-stream"


def test_requested_outputs_subset_order_and_binary_flags(mnist, digits):
    handler, context, reference = mnist
    array = digits[:3].reshape(3, 784)
    requests = [
        triton_request(array, "UINT8", outputs=[triton.InferRequestedOutput("predicted_class")]),
        triton_request(array, "UINT8", outputs=[triton.InferRequestedOutput("predicted_class", binary_data=False),
                                                triton.InferRequestedOutput("probabilities")]),
        triton_request(array, "UINT8", outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)]),
        triton_request(array, "UINT8", outputs=[triton.InferRequestedOutput("logits")]),
    ]
    answers = handle(handler, context, requests)
    expected = softmax_of(reference, digits[:3])

    only_class = parse(context, 0, answers[0])
    assert [o["name"] for o in only_class.get_response()["outputs"]] == ["predicted_class"]
    np.testing.assert_array_equal(only_class.as_numpy("predicted_class"), expected.argmax(axis=1))

    both = parse(context, 1, answers[1])
    class_entry, probabilities_entry = both.get_response()["outputs"]
    assert class_entry == {"name": "predicted_class", "datatype": "INT64", "shape": [3],
                           "data": expected.argmax(axis=1).tolist()}
    assert probabilities_entry["parameters"] == {"binary_data_size": 3 * 10 * 4}
    np.testing.assert_allclose(both.as_numpy("probabilities"), expected, atol=1e-6)

    # no binary output: plain JSON, no Inference-Header-Content-Length
    assert "Inference-Header-Content-Length" not in context.get_response_headers(2)
    assert context.get_response_content_type(2) == "application/json"
    (entry,) = json.loads(answers[2])["outputs"]
    np.testing.assert_allclose(np.reshape(entry["data"], (3, 10)), expected, atol=1e-6)

    status, message = error(context, 3, answers[3])
    assert status == 400 and '"logits"' in message and "'probabilities', 'predicted_class'" in message


def test_tabular_binary_int64_and_fp64(tmp_path):
    handler, context, reference = serve("regressionnet", tmp_path)
    rows = np.arange(30, dtype=np.int64).reshape(3, 10) - 15
    answers = handle(handler, context, [triton_request(rows, "INT64"),
                                        triton_request(rows.astype(np.float64) / 7, "FP64")])
    with torch.inference_mode():
        expected = reference(torch.tensor(np.concatenate([rows, rows / 7]), dtype=torch.float32)).reshape(-1).numpy()
    for idx in range(2):
        result = parse(context, idx, answers[idx])
        (output,) = result.get_response()["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("predictions", "FP32", [3])
        np.testing.assert_allclose(result.as_numpy("predictions"), expected[3 * idx : 3 * idx + 3], atol=1e-6)


@pytest.mark.parametrize("name", ["mnistnet", "linearregression", "regressionnet", "mlp"])
def test_oip_outputs_are_the_registry_metadata(name, tmp_path):
    """Names, datatypes and shapes of every response equal ``oip_metadata()`` with -1 = N, JSON or binary."""
    handler, context, _ = serve(name, tmp_path)
    spec = get_spec(name)
    x = np.full((3, spec.input_width), 0.5, np.float32)
    answers = handle(handler, context, [triton_request(x, "FP32"),
                                        triton_request(x, "FP32", binary=False, outputs=[
                                            triton.InferRequestedOutput(n, binary_data=False)
                                            for n, _, _ in spec.outputs])])
    want = [(o["name"], o["datatype"], [3, *o["shape"][1:]]) for o in spec.oip_metadata()["outputs"]]
    for idx, answer in enumerate(answers):
        result = parse(context, idx, answer)
        outputs = result.get_response()["outputs"]
        assert [(o["name"], o["datatype"], o["shape"]) for o in outputs] == want
        for output_name, datatype, shape in want:
            array = result.as_numpy(output_name)
            assert list(array.shape) == shape and array.dtype == {"FP32": np.float32, "INT64": np.int64}[datatype]


def _mnist_header(shape=(1, 784), datatype="UINT8", size=784, **extra) -> dict:
    tensor = {"name": "input", "shape": list(shape), "datatype": datatype, "parameters": {"binary_data_size": size}}
    return {"inputs": [tensor], **extra}


PIXELS = bytes(784)
MALFORMED = [
    # (body, headers, status, fragments)
    pytest.param(*raw_request(_mnist_header(), PIXELS, header_length="12x"), 400, ["must be an integer", "12x"],
                 id="header-not-integer"),
    pytest.param(*raw_request(_mnist_header(), PIXELS, header_length=-3), 400, ["must not be negative"], id="negative"),
    pytest.param(*raw_request(_mnist_header(), PIXELS, header_length=10**6), 400, ["is 1000000", "only"],
                 id="past-the-end"),
    pytest.param(*raw_request(_mnist_header(), PIXELS, header_length=10**40), 400, ["only"], id="huge-header-length"),
    pytest.param(*raw_request(_mnist_header(), PIXELS, header_length=0), 400, ["no JSON"], id="zero"),
    pytest.param(*raw_request(_mnist_header(), PIXELS, header_length=20), 400, ["not valid JSON"], id="json-cut"),
    pytest.param(b"\xff\xfe" + PIXELS, {**OIP, "inference-header-content-length": "2"}, 400, ["not UTF-8"],
                 id="header-not-utf8"),
    pytest.param(*raw_request([1, 2]), 400, ["must be a JSON object with 'inputs'"], id="header-not-object"),
    pytest.param(*raw_request({"instances": [1]}, PIXELS), 400, ["no 'inputs'", "'instances'"], id="no-inputs"),
    pytest.param(*raw_request(_mnist_header(size="784"), PIXELS), 400, ["binary_data_size must be a non-negative",
                                                                        'string "784"'], id="size-string"),
    pytest.param(*raw_request(_mnist_header(size=784.0), PIXELS), 400, ["binary_data_size must be"], id="size-float"),
    pytest.param(*raw_request(_mnist_header(size=True), PIXELS), 400, ["binary_data_size must be"], id="size-bool"),
    pytest.param(*raw_request(_mnist_header(size=-784), PIXELS), 400, ["binary_data_size must be"], id="size-neg"),
    pytest.param(*raw_request(_mnist_header(), PIXELS[:-1]), 400, ["declare 784 bytes", "only 783"], id="too-short"),
    pytest.param(*raw_request(_mnist_header(), PIXELS + b"\0\0"), 400, ["2 trailing bytes"], id="trailing"),
    pytest.param(*raw_request(_mnist_header(size=10**18), PIXELS), 400, ["declare 1000000000000000000"],
                 id="absurd-size"),
    pytest.param(*raw_request(_mnist_header(datatype="FP32"), PIXELS), 400, ["784 bytes", "784 x 4 = 3136"],
                 id="size-vs-shape"),
    pytest.param(*raw_request(_mnist_header(shape=(10**12, 784)), PIXELS), 413, ["too many samples"],
                 id="shape-too-large"),
    pytest.param(*raw_request(_mnist_header(shape=(MAX_SAMPLES + 1, 784), size=(MAX_SAMPLES + 1) * 784),
                              bytes((MAX_SAMPLES + 1) * 784)), 413, ["too many samples"], id="too-many-samples"),
    pytest.param(*raw_request(_mnist_header(shape=(2, 10), size=20), bytes(20)), 400, ["[N, 784]", "[2, 10]"],
                 id="wrong-shape"),
    pytest.param(*raw_request(_mnist_header(datatype="BOOL"), PIXELS), 400, ["datatype must be one of", "numbers"],
                 id="bool"),
    pytest.param(*raw_request(_mnist_header(datatype="BYTES"), PIXELS), 400, ["datatype must be one of"], id="bytes"),
    pytest.param(*raw_request(_mnist_header(datatype="FP32", size=3136), np.full(784, np.nan, "<f4").tobytes()),
                 400, ["NaN or infinite"], id="nan"),
    pytest.param(*raw_request(_mnist_header(datatype="FP32", size=3136), np.full(784, 255, "<f4").tobytes()),
                 400, ["intensities in [0, 1]", "divide by 255"], id="fp32-0-255"),
    pytest.param(*raw_request({"inputs": [{**_mnist_header()["inputs"][0], "data": [0] * 784}]}, PIXELS), 400,
                 ["both 'data' and"], id="data-and-binary"),
    pytest.param(*raw_request({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 784]}]}), 400,
                 ["missing 'data'"], id="no-data"),
    pytest.param(*raw_request({**_mnist_header(), "parameters": {"binary_data_output": "yes"}}, PIXELS), 400,
                 ["binary_data_output must be true or false"], id="bad-binary-output"),
    pytest.param(*raw_request({**_mnist_header(), "outputs": [{"name": "probabilities",
                                                               "parameters": {"classification": 3}}]}, PIXELS),
                 400, ["classification is not supported"], id="classification-extension"),
    pytest.param(*raw_request({**_mnist_header(), "outputs": [{"name": "probabilities"}] * 2}, PIXELS), 400,
                 ["twice"], id="duplicate-output"),
    pytest.param(*raw_request({**_mnist_header(), "outputs": ["probabilities"]}, PIXELS), 400,
                 ["outputs[0] must be an object"], id="output-not-object"),
    pytest.param(PIXELS, OIP, 400, ["malformed JSON"], id="binary-body-without-header"),
    pytest.param(b"\x89PNG\r\n\x1a\nxxxx", OIP, 400, ["must be JSON with 'inputs', not an image"], id="oip-png"),
    pytest.param(b"", OIP, 400, ["empty request body"], id="oip-empty"),
    pytest.param(b"\xff\xfe garbage", OIP, 400, ["not UTF-8 JSON"], id="oip-garbage"),
    pytest.param({"data": [0.0] * 784}, OIP, 400, ["no 'inputs'", "'data'"], id="oip-native-body"),
    pytest.param(json.dumps(_mnist_header()).encode(), OIP, 400, ["no Inference-Header-Content-Length header"],
                 id="binary-size-without-header"),
    pytest.param({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}],
                  "parameters": {"target": 12}},
                 {**OIP, "explain": "True"}, 400, ["cannot explain target 12"], id="explain-bad-target"),
    *[pytest.param({"id": bad, "inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}]},
                   OIP, 400, ["'id' must be a string of 1-128 printable ASCII characters", got], id=f"bad-id-{got}")
      for bad, got in [(42, "int 42"), ("has space", '"has space"'), ("", '""'), ("x" * 129, "string"),
                       (["a"], "list")]],
]


@pytest.mark.parametrize("body, headers, status, fragments", MALFORMED)
def test_malformed_oip_requests_get_their_own_4xx(mnist, digits, body, headers, status, fragments):
    handler, context, _ = mnist
    good = triton_request(digits[:1].reshape(1, 784), "UINT8")
    answers = handle(handler, context, [good, (body, headers), good])
    got_status, message = error(context, 1, answers[1])
    assert got_status == status
    for fragment in fragments:
        assert fragment in message, message
    for idx in (0, 2):  # the neighbours are answered normally
        assert parse(context, idx, answers[idx]).as_numpy("predicted_class").shape == (1,)


def test_oip_json_body_arrives_parsed_as_bytes_or_as_text(mnist, digits):
    handler, context, reference = mnist
    body = {"id": "req-42", "inputs": [{"name": "x", "shape": [2, 784], "datatype": "UINT8",
                                  "data": digits[:2].reshape(-1).tolist()}]}
    text = json.dumps(body)
    answers = handle(handler, context, [(body, OIP), (text.encode(), OIP), (text, OIP), (text.encode(), {})])
    expected = softmax_of(reference, digits[:2])
    for idx, answer in enumerate(answers):
        response = json.loads(answer)
        assert response["id"] == "req-42" and context.get_response_content_type(idx) == "application/json"
        probabilities, predicted = response["outputs"]
        assert probabilities["shape"] == [2, 10] and predicted["data"] == expected.argmax(axis=1).tolist()
        np.testing.assert_allclose(np.reshape(probabilities["data"], (2, 10)), expected, atol=1e-6)


def test_binary_decoding_views_the_received_bytes(digits):
    """256 images: the samples equal the native path's, and the payload is only viewed (no copy of it)."""
    spec = get_spec("mnistnet")
    images = np.tile(digits.reshape(8, 784), (32, 1))
    body, headers = triton_request(images, "UINT8")
    decoded = decode_request({"body": bytearray(body)}, spec, headers)
    assert decoded.kind == "oip" and decoded.samples.shape == (256, 784) and decoded.samples.dtype == np.float32
    native = decode_request({"body": {"data": (images / 255.0).tolist()}}, spec, {})
    np.testing.assert_allclose(decoded.samples, native.samples, atol=1e-6)


def test_binary_fp32_decoding_is_the_training_normalisation_and_leaves_the_body_alone(digits):
    """FP32 intensities: the samples are exactly float32 ``(x - mean) / std`` (cast, subtract, divide, in that
    order, as before the one-pass cast-and-subtract), in a new array; the received bytes are not written to."""
    spec = get_spec("mnistnet")
    x = np.tile(digits.reshape(8, 784) / 255.0, (128, 1)).astype(np.float32)  # 1,024 images
    x[0, :3] = [-1e-7, 1 + 1e-7, 0.5]  # within the tolerance: clipped, not refused
    body, headers = triton_request(x, "FP32")
    received = bytearray(body)
    decoded = decode_request({"body": received}, spec, headers)
    mean, std = spec.normalize
    want = np.clip(x, 0, 1).astype(np.float32)
    want -= np.float32(mean)
    want /= np.float32(std)
    assert decoded.samples.dtype == np.float32 and decoded.samples.shape == (1024, 784)
    assert np.array_equal(decoded.samples, want)
    assert bytes(received) == body
    assert not np.shares_memory(decoded.samples, np.frombuffer(received, np.uint8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_binary_fp32_non_finite_anywhere_is_refused(bad):
    x = np.full((3, 784), 0.5, np.float32)
    x[2, 700] = bad  # one value, in the last image
    body, headers = triton_request(x, "FP32")
    spec = get_spec("mnistnet")
    with pytest.raises(Exception, match="NaN or infinite values"):
        decode_request({"body": bytearray(body)}, spec, headers)


def test_request_headers_are_read_case_insensitively():
    from ts.context import Context

    context = Context("m", "/tmp", {}, 1, None, "0.12")
    context.request_processor = [RequestProcessor({"Inference-Header-Content-Length": "5", "body": {"x": 1}})]
    assert request_headers(context, 0) == {"inference-header-content-length": "5"}
    assert request_headers(context, 1) == {}


# ------------------------------------------------------------------------------------ KServe v1


def test_kserve_v1_images(mnist, digits):
    handler, context, reference = mnist
    digit_7 = (REPO / "examples" / "digit_7.png").read_bytes()
    encoded = base64.b64encode(digit_7).decode()
    instances = [
        (digits[0] / 255.0).tolist(),  # 28x28
        (digits[1] / 255.0).reshape(-1).tolist(),  # flat 784
        {"data": encoded},  # KServe's TorchServe MNIST example
        {"b64": base64.b64encode(png(digits[2])).decode()},
    ]
    requests = [({"instances": instances}, {}),
                ({"instances": [instances[0], [0.5] * 10, instances[1]]}, {}),
                ({"instances": [{"data": "%%%"}]}, {}),
                ({"instances": [instances[0], (digits[0] * 1.0).tolist()]}, {}),
                ({"instances": []}, {}),
                ({"instances": [instances[1]] * (MAX_SAMPLES + 1)}, {}),
                (json.dumps({"instances": [{"data": encoded}]}).encode(), {}),
                (digit_7, {})]  # the same PNG on the native path
    answers = handle(handler, context, requests)
    predictions = json.loads(answers[0])["predictions"]
    assert len(predictions) == 4 and all(set(p) == {"probabilities", "predicted_class"} for p in predictions)
    expected = softmax_of(reference, digits[:3])
    for prediction, probs in zip([predictions[0], predictions[1], predictions[3]], expected):
        np.testing.assert_allclose(prediction["probabilities"], probs, atol=1e-6)
        assert prediction["predicted_class"] == int(probs.argmax())
    native_7 = json.loads(answers[7])
    assert predictions[2]["predicted_class"] == native_7["predicted_class"]
    np.testing.assert_allclose(predictions[2]["probabilities"], native_7["probabilities"], atol=1e-6)
    assert json.loads(answers[6])["predictions"] == [predictions[2]]

    for idx, status, fragments in [(1, 400, ["instances[1]", "784 intensities", "[10]"]),
                                   (2, 400, ["instances[0]", "not valid base64"]),
                                   (3, 400, ["instances[1]", "divide by 255"]),
                                   (4, 400, ["non-empty list"]),
                                   (5, 413, ["too many samples"])]:
        got, message = error(context, idx, answers[idx])
        assert got == status and all(f in message for f in fragments), message


def test_kserve_v1_tabular(tmp_path):
    handler, context, reference = serve("mlp", tmp_path)
    rows = [[1.0, -0.5], [-1.0, 0.5], [0.2, 0.3]]
    answers = handle(handler, context, [({"instances": rows}, {}), ({"instances": [[1.0, 2.0, 3.0]]}, {}),
                                        ({"instances": [{"data": "aGk="}]}, {})])
    with torch.inference_mode():
        p = reference(torch.tensor(rows)).reshape(-1).numpy()
    predictions = json.loads(answers[0])["predictions"]
    assert [x["predicted_class"] for x in predictions] == (p >= 0.5).astype(int).tolist()
    np.testing.assert_allclose([x["probabilities"] for x in predictions], p, atol=1e-6)
    assert "instances[0]" in error(context, 1, answers[1])[1]
    assert "not an image" in error(context, 2, answers[2])[1]

    (tmp_path / "lin").mkdir()
    handler, context, reference = serve("linearregression", tmp_path / "lin")
    (answer,) = handle(handler, context, [({"instances": [1.0, [2.0], 3.0]}, {})])
    with torch.inference_mode():
        expected = reference(torch.tensor([[1.0], [2.0], [3.0]])).reshape(-1).tolist()
    np.testing.assert_allclose(json.loads(answer)["predictions"], expected, atol=1e-6)


# ------------------------------------------------------------------------------- batches, envelopes


def test_mixed_batch_shares_one_forward_pass(mnist, digits):
    handler, context, reference = mnist
    calls = []
    handler.model.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    requests = [
        triton_request(digits[:2].reshape(2, 784), "UINT8"),  # binary OIP
        ({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8",
                      "data": digits[2].reshape(-1).tolist()}]}, OIP),  # JSON OIP
        ({"data": (digits[3] / 255.0).tolist()}, {}),  # native JSON
        (png(digits[4]), {}),  # PNG
        raw_request(_mnist_header(), PIXELS[:10]),  # bad: 10 of 784 bytes
        ({"instances": [(digits[5] / 255.0).tolist()]}, {}),  # KServe v1
    ]
    answers = handle(handler, context, requests)
    assert calls == [6]
    assert [context.get_response_status(i)[0] for i in range(6)] == [200, 200, 200, 200, 400, 200]
    expected = softmax_of(reference, digits[:6])
    np.testing.assert_allclose(parse(context, 0, answers[0]).as_numpy("probabilities"), expected[:2], atol=1e-6)
    np.testing.assert_allclose(parse(context, 1, answers[1]).as_numpy("probabilities"), expected[2:3], atol=1e-6)
    np.testing.assert_allclose(json.loads(answers[2])["probabilities"], expected[3], atol=1e-6)
    np.testing.assert_allclose(json.loads(answers[3])["probabilities"], expected[4], atol=1e-6)
    np.testing.assert_allclose(json.loads(answers[5])["predictions"][0]["probabilities"], expected[5], atol=1e-6)


def test_more_rows_than_requests_never_raises(mnist, digits):
    """TorchServe's envelopes hand handle() one row per instance: no status may index past the requests."""
    handler, context, reference = mnist
    context.request_processor = [RequestProcessor({})]
    context.request_ids = {0: "only"}
    rows = [{"data": (digits[0] / 255.0).tolist()}, [0.5] * 3, {"b64": base64.b64encode(png(digits[1])).decode()}]
    answers = handler.handle(rows, context)
    assert context.get_response_status(0)[0] == 200
    expected = softmax_of(reference, digits[:2])
    np.testing.assert_allclose(answers[0]["probabilities"], expected[0], atol=1e-6)
    assert answers[1]["code"] == 400 and "instances[1]" in answers[1]["error"]
    np.testing.assert_allclose(answers[2]["probabilities"], expected[1], atol=1e-6)


def test_torchserve_kserve_envelopes(mnist, digits):
    handler, context, reference = mnist
    expected = softmax_of(reference, digits[:3])
    instances = [{"data": base64.b64encode(png(d)).decode()} for d in digits[:3]]
    context.request_processor = [RequestProcessor({})]
    context.request_ids = {0: "r"}
    (response,) = KServeEnvelope(handler.handle).handle([{"body": {"instances": instances}}], context)
    assert len(response["predictions"]) == 3
    for prediction, probs in zip(response["predictions"], expected):
        np.testing.assert_allclose(prediction["probabilities"], probs, atol=1e-6)
    json.dumps(response)  # TorchServe serialises it

    body = {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32",
                        "data": (digits[0] / 255.0).reshape(-1).tolist()}]}
    context.request_processor = [RequestProcessor({})]
    (response,) = KServev2Envelope(handler.handle).handle([{"body": body}], context)
    json.dumps(response)
    (output,) = response["outputs"]  # the envelope names it after the input and flattens it
    assert output["name"] == "x" and context.get_response_status(0)[0] == 200
    np.testing.assert_allclose(output["data"], expected[0], atol=1e-6)


def test_binary_response_through_the_worker_wire_protocol(mnist, digits):
    """A binary request framed as the frontend sends it (lowercased headers), answered through
    TorchServe's own protocol code: status, content type, Inference-Header-Content-Length and body arrive."""
    handler, context, reference = mnist
    body, headers = triton_request(digits[:2].reshape(2, 784), "UINT8")
    _, message = _through_worker_socket([_frame_request("bin", headers, [("body", "application/octet-stream", body)])])
    request_headers_, inputs, request_ids = Service.retrieve_data_for_inference(message)
    context.request_processor, context.request_ids = request_headers_, request_ids
    response = create_predict_response(handler.handle(inputs, context), request_ids, "ok", 200, context)

    offset = 8 + struct.unpack_from("!i", response, 4)[0]

    def blob():
        nonlocal offset
        (length,) = struct.unpack_from("!i", response, offset)
        offset += 4 + length
        return response[offset - length : offset]

    assert blob() == b"bin" and blob() == b"application/octet-stream"
    (status,) = struct.unpack_from("!i", response, offset)
    offset += 4
    blob()  # phrase
    (count,) = struct.unpack_from("!i", response, offset)
    offset += 4
    response_headers = {blob().decode(): blob().decode() for _ in range(count)}
    payload = bytes(blob())
    assert status == 200
    result = triton.InferenceServerClient.parse_response_body(
        payload, header_length=int(response_headers["Inference-Header-Content-Length"]))
    np.testing.assert_allclose(result.as_numpy("probabilities"), softmax_of(reference, digits[:2]), atol=1e-6)
