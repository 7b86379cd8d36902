"""Bad input mixed with good input, concurrently: each bad request gets its own 4xx JSON message, every
good request in the same batches still gets its 200 answer, and no worker dies or restarts."""
from __future__ import annotations

import io
import json
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from e2e_support import TOLERANCE, normalise_pixels
from servers import post, workers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JSON = {"Content-Type": "application/json"}


def png_of(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def bad_requests(digit: np.ndarray) -> list[tuple[str, str, dict, int]]:
    """(description, model, requests.post kwargs, expected status) for inputs the service must refuse."""
    png = png_of(digit)
    v2 = lambda **tensor: {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784, **tensor}]}
    return [
        ("malformed JSON", "mnistnet", dict(data=b'{"data": [0.1, 0.2', headers=JSON), 400),
        ("wrong length", "mnistnet", dict(json={"data": [0.1] * 100}), 400),
        ("0-255 pixels", "deepnet", dict(json={"data": (digit.astype(float)).tolist()}), 400),
        ("strings", "feedforwardnet", dict(json={"data": ["0.5"] * 784}), 400),
        ("NaN", "mnistnet", dict(data=b'{"data": [NaN' + b", 0.0" * 783 + b"]}", headers=JSON), 400),
        ("null data", "mnistnet", dict(json={"data": None}), 400),
        ("wrong key", "deepnet", dict(json={"pixels": [0.0] * 784}), 400),
        ("ragged", "mnistnet", dict(json={"data": [[0.0] * 28] * 27 + [[0.0] * 27]}), 400),
        ("empty body", "mnistnet", dict(data=b"", headers=JSON), 400),
        ("GIF image", "mnistnet", dict(data=b"GIF89a" + bytes(40), headers={"Content-Type": "image/gif"}), 400),
        ("truncated PNG", "feedforwardnet", dict(data=png[: len(png) // 2], headers={"Content-Type": "image/png"}), 400),
        ("form-urlencoded", "mnistnet", dict(data="x=1", headers={"Content-Type": "application/x-www-form-urlencoded"}), 400),
        ("nested too deep", "mnistnet", dict(data=b"[" * 5000 + b"]" * 5000, headers=JSON), 400),
        ("1025 samples", "mnistnet", dict(json={"data": [[0] * 784] * 1025}), 413),
        ("v2 bad datatype", "deepnet", dict(json=v2(datatype="BYTES")), 400),
        ("v2 shape/data mismatch", "mnistnet", dict(json=v2(shape=[2, 784])), 400),
        ("v2 no inputs", "feedforwardnet", dict(json={"inputs": []}), 400),
        ("tabular wrong width", "regressionnet", dict(json={"data": [[0.1] * 9]}), 400),
        ("tabular string", "mlp", dict(json=[["a", "b"]]), 400),
        ("tabular image", "smoothstepnet", dict(data=png, headers={"Content-Type": "image/png"}), 400),
        ("linear empty list", "linearregression", dict(json=[]), 400),
    ]


def test_bad_and_good_requests_concurrently(server, reference, mnist_test):
    images = mnist_test[0][:30]
    before = workers(server)

    # (kind, description, model, post kwargs, expected status, digit index for good requests)
    jobs = [("bad", description, model, kwargs, status, None)
            for description, model, kwargs, status in bad_requests(images[0])] * 2
    jobs += [("good", f"digit {i}", ("mnistnet", "deepnet", "feedforwardnet")[i % 3],
              dict(json={"data": (images[i] / 255.0).tolist()}), 200, i) for i in range(len(images))]
    random.Random(0).shuffle(jobs)

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda job: post(server, f"/predictions/{job[2]}", **job[3]), jobs))

    for (kind, description, model, _, status, index), response in zip(jobs, responses):
        assert response.status_code == status, f"{description} → {response.status_code}: {response.text[:300]}"
        body = response.json()
        if kind == "bad":
            # Our handlers' error body: a message saying what was wrong, and the status again.
            assert body["code"] == status
            assert isinstance(body["error"], str) and len(body["error"]) > 10, description
        else:
            expected = reference(model, normalise_pixels(images[index : index + 1]))[0]
            np.testing.assert_allclose(body["probabilities"], expected, atol=TOLERANCE, err_msg=description)

    # Nothing crashed: the same worker processes, all READY, and they still answer.
    assert workers(server) == before
    for model in ("mnistnet", "deepnet", "feedforwardnet"):
        response = post(server, f"/predictions/{model}", data=png_of(images[5]), headers={"Content-Type": "image/png"})
        assert response.status_code == 200
        assert response.json()["predicted_class"] == int(np.argmax(reference(model, normalise_pixels(images[5:6]))))


def test_error_messages_name_the_problem(server, mnist_test):
    digit = mnist_test[0][0]
    cases = {
        "0-255 pixels": ("deepnet", dict(json={"data": digit.astype(float).tolist()}), "divide by 255"),
        "wrong length": ("mnistnet", dict(json={"data": [0.1] * 100}), "100"),
        "wrong key": ("mnistnet", dict(json={"pixels": [0.0] * 784}), "'data'"),
        "1025 samples": ("mnistnet", dict(json={"data": [[0] * 784] * 1025}), "1024"),
    }
    for description, (model, kwargs, needle) in cases.items():
        response = post(server, f"/predictions/{model}", **kwargs)
        message = response.json()["error"]
        assert needle in message, f"{description}: {message}"


def test_request_over_max_request_size_is_refused_and_server_survives(server, client):
    """A body larger than config.properties' max_request_size (32 MiB) is cut off by the frontend."""
    body = b"[" + b"0.123456789012345678," * 1_700_000 + b"0]"  # ~35 MB
    response = post(server, "/predictions/mnistnet", data=body, headers=JSON)
    assert response.status_code == 413
    assert client.predict("linearregression", [1.0])["predictions"]


def test_largest_legitimate_request_is_accepted(client):
    """1024 images as full-precision JSON floats (~16 MB) fit within max_request_size."""
    images = np.random.default_rng(0).random((1024, 784))
    assert len(json.dumps({"data": images.tolist()})) > 15_000_000
    answers = client.predict("mnistnet", {"data": images.tolist()})
    assert len(answers) == 1024
    assert all(len(answer["probabilities"]) == 10 for answer in answers)
