"""The TorchServe handlers, driven through TorchServe's own objects (no server, no Java).

Each handler is initialised from a Context holding a manifest and a model_dir with a state_dict saved
from ``spec.build()`` under a fixed seed, exactly what an extracted .mar gives a worker. Batches are
built with one RequestProcessor per request (so per-request statuses and response headers are real);
``test_worker_wire_protocol`` even sends the batch through TorchServe's binary worker protocol.
"""
from __future__ import annotations

import importlib.util
import io
import json
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import ts
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.protocol.otf_message_handler import create_predict_response, retrieve_msg
from ts.service import Service
from ts.utils.util import list_classes_from_module

from handlers.base import ServingHandler, resolve_model_name, select_device, thread_count
from handlers.decoding import MAX_SAMPLES
from handlers.image_classifier import ImageClassifier
from handlers.tabular import TabularHandler
from models.registry import REGISTRY, get_spec
from train.data import mnist_arrays, normalize_images

from paths import REPO_ROOT as REPO
SEED = 1234


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch):
    """initialize() sets torch's thread count for the whole process: keep this process's value."""
    monkeypatch.setenv("HANDLER_NUM_THREADS", str(torch.get_num_threads()))


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    images, _ = mnist_arrays("test")
    return np.array(images[:6])


def make_archive_dir(tmp_path: Path, name: str) -> tuple[Path, dict]:
    """A model_dir holding a seeded state_dict, and the manifest torch-model-archiver would write."""
    torch.manual_seed(SEED)
    torch.save(get_spec(name).build().state_dict(), tmp_path / f"{name}.pt")
    manifest = {
        "createdOn": "01/01/2025 00:00:00",
        "runtime": "python",
        "model": {
            "modelName": name,
            "serializedFile": f"{name}.pt",
            "handler": Path(get_spec(name).handler).name,
            "modelVersion": "1.0",
        },
        "archiverVersion": "0.12.0",
    }
    return tmp_path, manifest


def make_context(model_dir: Path, manifest: dict, gpu=None, yaml_config=None) -> Context:
    return Context(manifest["model"]["modelName"], str(model_dir), manifest, 8, gpu, ts.__version__,
                   model_yaml_config=yaml_config or {})


def serve(name: str, tmp_path: Path, handler_class=None):
    """(handler, context, reference model) for registry model ``name``; ``handler_class`` defaults to its handler."""
    model_dir, manifest = make_archive_dir(tmp_path, name)
    context = make_context(model_dir, manifest)
    handler_class = handler_class or (ImageClassifier if get_spec(name).is_image_model else TabularHandler)
    handler = handler_class()
    handler.initialize(context)
    reference = get_spec(name).build()
    reference.load_state_dict(torch.load(model_dir / f"{name}.pt", weights_only=True))
    return handler, context, reference.eval()


def run_batch(handler, context, requests: list[dict], headers: list[dict] | None = None,
              ids: dict[int, str] | None = None) -> list:
    """Call handle() the way ts.service.Service does: request ids (``ts-req-<i>`` unless ``ids`` names
    them) and one RequestProcessor per request."""
    headers = headers or [{} for _ in requests]
    context.request_processor = [RequestProcessor(h) for h in headers]
    context.request_ids = {i: (ids or {}).get(i, f"ts-req-{i}") for i in range(len(requests))}
    return [json.loads(body) for body in handler.handle(requests, context)]


def statuses(context, n: int) -> list[int]:
    return [context.get_response_status(i)[0] for i in range(n)]


def softmax_of(reference, images_uint8: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(reference(normalize_images(images_uint8).reshape(-1, 784)), dim=1).numpy()


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def v2_body(shape, data, datatype="FP32", **extra) -> dict:
    return {"inputs": [{"name": "input-0", "shape": shape, "datatype": datatype, "data": data}], **extra}


# -------------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize(
    "gpu_id, cuda_available, expected",
    [(0, True, "cuda:0"), (1, True, "cuda:1"), (None, True, "cpu"), (0, False, "cpu"), (None, False, "cpu")],
)
def test_select_device(gpu_id, cuda_available, expected):
    assert select_device(gpu_id, cuda_available) == torch.device(expected)


def test_thread_count_default_config_and_env():
    assert thread_count({}, environ={}) == 1
    assert thread_count({"num_threads": 3}, environ={}) == 3
    assert thread_count({"num_threads": 3}, environ={"HANDLER_NUM_THREADS": "2"}) == 2
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match="HANDLER_NUM_THREADS/num_threads must be a positive integer"):
            thread_count({}, environ={"HANDLER_NUM_THREADS": bad})


def test_model_name_comes_from_yaml_then_manifest():
    manifest = {"model": {"modelName": "mnistnet"}}
    assert resolve_model_name(manifest) == "mnistnet"
    assert resolve_model_name(manifest, {"model_name": "feedforwardnet"}) == "feedforwardnet"
    with pytest.raises(RuntimeError, match="cannot tell which model to serve"):
        resolve_model_name({"model": {}})


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_initialize_on_cpu_loads_the_archived_weights(name, tmp_path):
    handler, context, reference = serve(name, tmp_path)
    assert handler.initialized and handler.spec.name == name
    assert handler.device == torch.device("cpu")
    assert not handler.model.training  # eval(): dropout is off
    for key, value in reference.state_dict().items():
        assert torch.equal(handler.model.state_dict()[key], value)


def test_initialize_refuses_the_wrong_handler_and_missing_weights(tmp_path):
    model_dir, manifest = make_archive_dir(tmp_path, "mlp")
    with pytest.raises(RuntimeError, match="ImageClassifier serves classification models; 'mlp' is a binary"):
        ImageClassifier().initialize(make_context(model_dir, manifest))
    del manifest["model"]["serializedFile"]
    with pytest.raises(RuntimeError, match="no serialized weights"):
        TabularHandler().initialize(make_context(model_dir, manifest))


def load_as_archive_root_module(path: Path):
    """Import a handler file under its bare name, as TorchServe does from an extracted archive's root."""
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("filename", ["image_classifier.py", "tabular.py", "base.py", "decoding.py"])
def test_each_handler_module_defines_exactly_one_class(filename):
    classes = list_classes_from_module(load_as_archive_root_module(REPO / "handlers" / filename))
    assert len(classes) == 1, classes
    if filename in ("image_classifier.py", "tabular.py"):
        assert issubclass(classes[0], ServingHandler)


# ------------------------------------------------------------------------------ image models


def test_mixed_batch_answers_each_request_at_its_position(tmp_path, digits):
    handler, context, reference = serve("mnistnet", tmp_path)
    pixels = (digits / 255.0).tolist()
    requests = [
        {"body": {"data": pixels[0]}},  # one image → one object
        {"body": {"data": digits[0].astype(float).tolist()}},  # 0-255 values → 400
        {"body": pixels[1:4]},  # list of three images → list of three objects
        {"body": bytearray(b'{"data": [0.1, ')},  # malformed JSON → 400
        {"data": png(digits[4]), "name": "ignored"},  # multipart upload of a PNG → one object
        {"body": {"data": [[0.0] * 784] * (MAX_SAMPLES + 1)}},  # too many samples → 413
        {"body": b""},  # empty body → 400
        {"body": [pixels[5]]},  # list of one image → list of one object
    ]
    responses = run_batch(handler, context, requests)
    assert len(responses) == len(requests)
    assert statuses(context, len(requests)) == [200, 400, 200, 400, 200, 413, 400, 200]

    expected = softmax_of(reference, digits)
    assert isinstance(responses[0], dict)
    np.testing.assert_allclose(responses[0]["probabilities"], expected[0], atol=1e-6)
    assert responses[0]["predicted_class"] == int(expected[0].argmax())
    assert isinstance(responses[2], list) and len(responses[2]) == 3
    for answer, probs in zip(responses[2], expected[1:4]):
        np.testing.assert_allclose(answer["probabilities"], probs, atol=1e-6)
        assert answer["predicted_class"] == int(probs.argmax())
    np.testing.assert_allclose(responses[4]["probabilities"], expected[4], atol=1e-6)
    assert isinstance(responses[7], list) and len(responses[7]) == 1
    np.testing.assert_allclose(responses[7][0]["probabilities"], expected[5], atol=1e-6)

    for idx, fragment in [(1, "divide by 255"), (3, "malformed JSON"), (5, "too many samples"), (6, "empty")]:
        status, phrase = context.get_response_status(idx)
        assert responses[idx] == {"error": responses[idx]["error"], "code": status,
                                  "request_id": context.get_request_id(idx)}
        assert fragment in responses[idx]["error"] and fragment in phrase
    for idx in range(len(requests)):
        assert context.get_response_content_type(idx) == "application/json"


@pytest.mark.parametrize("name", ["deepnet", "feedforwardnet"])
def test_every_image_model_matches_its_in_process_softmax(name, tmp_path, digits):
    handler, context, reference = serve(name, tmp_path)
    (answers,) = run_batch(handler, context, [{"body": {"data": (digits / 255.0).tolist()}}])
    expected = softmax_of(reference, digits)
    np.testing.assert_allclose([a["probabilities"] for a in answers], expected, atol=1e-6)
    assert [a["predicted_class"] for a in answers] == expected.argmax(axis=1).tolist()


def test_v2_request_gets_a_v2_response(tmp_path, digits):
    handler, context, reference = serve("mnistnet", tmp_path)
    flat = digits[:2].reshape(-1).tolist()
    requests = [
        {"body": v2_body([2, 784], flat, "UINT8", id="my-request")},
        {"body": v2_body([2, 28, 28], (digits[:2] / 255.0).reshape(-1).tolist())},
        {"body": v2_body([2, 10], [0.0] * 20)},  # incompatible shape → 400
    ]
    responses = run_batch(handler, context, requests)
    assert statuses(context, 3) == [200, 200, 400]
    expected = softmax_of(reference, digits[:2])
    for response, request_id in zip(responses[:2], ["my-request", "ts-req-1"]):
        assert response["model_name"] == "mnistnet" and response["model_version"] == "1.0"
        assert response["id"] == request_id  # the client's id, else TorchServe's request id
        probabilities, predicted = response["outputs"]
        assert probabilities["name"] == "probabilities" and probabilities["datatype"] == "FP32"
        assert probabilities["shape"] == [2, 10] and len(probabilities["data"]) == 20
        np.testing.assert_allclose(np.reshape(probabilities["data"], (2, 10)), expected, atol=1e-6)
        assert predicted == {"name": "predicted_class", "shape": [2], "datatype": "INT64",
                             "data": expected.argmax(axis=1).tolist()}
    assert "[N, 784]" in responses[2]["error"]


class _CountingClassifier(ImageClassifier):
    """ImageClassifier that counts its postprocess calls."""

    calls = 0

    def postprocess(self, output):
        self.calls += 1
        return super().postprocess(output)


class _FailsOnSeveralRows(_CountingClassifier):
    """Test double of a buggy subclass: postprocess crashes when given more than one row."""

    def postprocess(self, output):
        if len(output) > 1:
            self.calls += 1
            raise ArithmeticError("bug")
        return super().postprocess(output)


def test_internal_error_answers_500_for_that_request_only(tmp_path, digits):
    """The batch's one postprocess call fails: each request is retried alone, and only the failing one gets 500."""
    handler, context, _ = serve("mnistnet", tmp_path, _FailsOnSeveralRows)
    pixels = (digits / 255.0).tolist()
    responses = run_batch(handler, context, [{"body": pixels[:2]}, {"body": pixels[2]}])
    assert statuses(context, 2) == [500, 200]
    assert responses[0] == {"error": "postprocessing failed: ArithmeticError", "code": 500,
                            "request_id": context.get_request_id(0)}
    assert set(responses[1]) == {"predicted_class", "probabilities"}
    assert handler.calls == 3  # the batch, then each request alone


def test_one_postprocess_call_per_batch(tmp_path, digits):
    handler, context, _ = serve("mnistnet", tmp_path, _CountingClassifier)
    pixels = (digits / 255.0).tolist()
    responses = run_batch(handler, context, [{"body": pixels[:2]}, {"body": pixels[2]}, {"body": pixels[3:6]}])
    assert statuses(context, 3) == [200, 200, 200] and handler.calls == 1
    assert [len(r) for r in (responses[0], responses[2])] == [2, 3] and set(responses[1]) == {"predicted_class", "probabilities"}


# ----------------------------------------------------------------------------- tabular models


@pytest.mark.parametrize("name", ["linearregression", "regressionnet", "smoothstepnet"])
def test_regression_predictions_match_the_model(name, tmp_path):
    handler, context, reference = serve(name, tmp_path)
    width = get_spec(name).input_width
    rows = np.random.default_rng(0).normal(size=(5, width)).round(4)
    requests = [{"body": {"data": rows.tolist()}}, {"body": {"data": rows[0].tolist()}},
                {"body": {"data": [[1.0] * (width + 1)]}}]
    responses = run_batch(handler, context, requests)
    assert statuses(context, 3) == [200, 200, 400]
    with torch.inference_mode():
        expected = reference(torch.tensor(rows, dtype=torch.float32)).reshape(-1).numpy()
    assert set(responses[0]) == {"predictions"}
    np.testing.assert_allclose(responses[0]["predictions"], expected, atol=1e-6)
    np.testing.assert_allclose(responses[1]["predictions"], expected[:1], atol=1e-6)  # one row: still a list
    assert f"expected rows of {width} value(s)" in responses[2]["error"]


def test_linear_regression_accepts_bare_numbers(tmp_path):
    handler, context, reference = serve("linearregression", tmp_path)
    responses = run_batch(handler, context, [{"body": 2.0}, {"body": [1.0, 2.0, 3.0]}])
    with torch.inference_mode():
        expected = reference(torch.tensor([[1.0], [2.0], [3.0]])).reshape(-1).numpy()
    np.testing.assert_allclose(responses[0]["predictions"], expected[1:2], atol=1e-6)
    np.testing.assert_allclose(responses[1]["predictions"], expected, atol=1e-6)


def test_binary_response_and_v2(tmp_path):
    handler, context, reference = serve("mlp", tmp_path)
    rows = np.random.default_rng(1).normal(scale=3.0, size=(16, 2)).round(3)
    responses = run_batch(handler, context, [{"body": {"data": rows.tolist()}},
                                             {"body": v2_body([16, 2], rows.reshape(-1).tolist(), "FP64")}])
    with torch.inference_mode():
        p = reference(torch.tensor(rows, dtype=torch.float32)).reshape(-1).numpy()
    native, v2 = responses
    assert set(native) == {"predictions", "probabilities", "classes"}
    np.testing.assert_allclose(native["probabilities"], p, atol=1e-6)
    assert native["predictions"] == (p >= 0.5).astype(int).tolist() == native["classes"]
    probabilities, predicted = v2["outputs"]
    assert probabilities["name"] == "probabilities" and probabilities["shape"] == [16]
    np.testing.assert_allclose(probabilities["data"], p, atol=1e-6)
    assert predicted == {"name": "predicted_class", "shape": [16], "datatype": "INT64",
                         "data": native["predictions"]}


def test_regression_v2_output(tmp_path):
    handler, context, reference = serve("regressionnet", tmp_path)
    (response,) = run_batch(handler, context, [{"body": v2_body([1, 10], list(range(10)), "INT32")}])
    with torch.inference_mode():
        expected = reference(torch.arange(10, dtype=torch.float32).reshape(1, 10)).reshape(-1).numpy()
    (output,) = response["outputs"]
    assert output["name"] == "predictions" and output["shape"] == [1] and output["datatype"] == "FP32"
    np.testing.assert_allclose(output["data"], expected, atol=1e-6)


# ------------------------------------------------------------------ TorchServe's worker protocol


def _frame_request(request_id: str, headers: dict, parameters: list[tuple[str, str, bytes]]) -> bytes:
    """One request as the Java frontend writes it to the worker socket (see otf_message_handler)."""
    def item(data: bytes) -> bytes:
        return struct.pack("!i", len(data)) + data

    frame = item(request_id.encode())
    for key, value in headers.items():
        frame += item(key.encode()) + item(value.encode())
    frame += struct.pack("!i", -1)
    for name, content_type, value in parameters:
        frame += item(name.encode()) + item(content_type.encode()) + item(value)
    return frame + struct.pack("!i", -1)


def _through_worker_socket(frames: list[bytes]) -> tuple[bytes, dict]:
    """An inference batch of framed requests sent over a real socket pair and read back by TorchServe's
    own ``retrieve_msg``, as a worker reads it from the frontend; returns ``(command, message)``."""
    wire = b"I" + b"".join(frames) + struct.pack("!i", -1)
    sender, receiver = socket.socketpair()
    writer = threading.Thread(target=sender.sendall, args=(wire,))
    writer.start()
    try:
        return retrieve_msg(receiver)
    finally:
        writer.join()
        sender.close(), receiver.close()


def _parse_predict_response(message: bytes) -> list[dict]:
    """Per-request (id, status, phrase, content type, body) from a worker's predict response frame."""
    offset = 0

    def integer():
        nonlocal offset
        (value,) = struct.unpack_from("!i", message, offset)
        offset += 4
        return value

    def blob():
        nonlocal offset
        length = integer()
        offset += length
        return message[offset - length : offset]

    integer(), blob()  # batch code and message
    answers = []
    while integer() != -1:
        offset -= 4  # not the end marker: step back, it was the request id's length
        answer = {"id": blob().decode(), "content_type": blob().decode(), "status": integer(),
                  "phrase": blob().decode()}
        answer["headers"] = {blob().decode(): blob().decode() for _ in range(integer())}
        answer["body"] = json.loads(blob())
        answers.append(answer)
    return answers


def test_worker_wire_protocol(tmp_path, digits):
    """Requests encoded as the frontend sends them, decoded by TorchServe's own protocol code
    (application/json is parsed, text/* becomes str, anything else stays bytes), then answered."""
    handler, context, reference = serve("mnistnet", tmp_path)
    pixels_json = json.dumps({"data": (digits[0] / 255.0).tolist()}).encode()
    batch = [
        ("a", [("body", "application/json", pixels_json)]),
        ("b", [("body", "application/json", b"{not json")]),
        ("c", [("body", "text/plain", pixels_json)]),
        ("d", [("body", "application/octet-stream", png(digits[1]))]),
        ("e", [("data", "image/png", png(digits[2])), ("note", "text/plain", b"hi")]),
        ("f", [("body", "application/json", b"null")]),
    ]
    frames = [_frame_request(rid, {"Content-Type": "x"}, params) for rid, params in batch]
    command, message = _through_worker_socket(frames)
    assert command == b"I"

    headers, inputs, request_ids = Service.retrieve_data_for_inference(message)
    context.request_processor, context.request_ids = headers, request_ids
    assert context.get_request_header(0, "Content-Type") == "x"
    results = handler.handle(inputs, context)
    answers = _parse_predict_response(create_predict_response(results, request_ids, "ok", 200, context))

    assert [a["id"] for a in answers] == [rid for rid, _ in batch]
    assert [a["status"] for a in answers] == [200, 400, 200, 200, 200, 400]
    assert all(a["content_type"] == "application/json" for a in answers)
    expected = softmax_of(reference, digits[:3])
    for index, digit in [(0, 0), (2, 0), (3, 1), (4, 2)]:
        np.testing.assert_allclose(answers[index]["body"]["probabilities"], expected[digit], atol=1e-6)
    assert "malformed JSON" in answers[1]["phrase"] and answers[1]["body"]["code"] == 400
    assert answers[5]["body"]["error"] == "'data' must be an array of numbers; got null"


def test_responses_are_compact_json_bytes(tmp_path, digits):
    """handle() returns encoded JSON itself: TorchServe would pretty-print a dict (indent=2)."""
    handler, context, _ = serve("mnistnet", tmp_path)
    context.request_processor = [RequestProcessor({}), RequestProcessor({})]
    context.request_ids = {0: "a", 1: "b"}
    bodies = handler.handle([{"body": {"data": (digits[0] / 255.0).tolist()}}, {"body": b"{oops"}], context)
    assert all(isinstance(body, bytes) for body in bodies)
    assert b"\n" not in bodies[0] and b", " not in bodies[0]
    assert json.loads(bodies[0])["predicted_class"] in range(10)
    assert json.loads(bodies[1])["code"] == 400
