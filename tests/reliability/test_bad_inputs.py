"""Bad-input matrix against a real TorchServe: every kind of bad request gets a 4xx whose JSON body names
the problem, never a 5xx; good requests batched together with bad ones still get their 200; and after the
whole matrix no worker has restarted and the server still answers correctly.

Two refusals come from TorchServe's Java frontend, not from our handlers, and are documented here
precisely: a body over ``max_request_size`` gets 413 from Netty's request aggregator before any TorchServe
code runs (the agent's serve/torchserve/java/RequestIds.java gives it a JSON body naming the limit and the
request ID; Netty's own is empty), and any HTTP method on ``/predictions/...``
reaches the handler (TorchServe routes GET/PUT/DELETE there too), so a bodiless GET is our 400
"empty request body", not a 405.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from threading import Barrier
from typing import Callable

import numpy as np
import pytest

from serve.server import load_properties

from servers import error_message, send, worker_pids

from .support import BATCH_RECEIVED, JSON, PNG, WORKER_STARTED, count_log_lines, crafted_png, png_of, wait_for_log_count

pytestmark = [pytest.mark.e2e]

ZEROS = [0.0] * 784
FORM = "application/x-www-form-urlencoded"


def digit_list(d: np.ndarray) -> list:
    """A uint8 digit as 28x28 intensities in [0, 1]."""
    return (d / 255.0).tolist()


def v2(shape, datatype="FP32", data=None, **extra) -> dict:
    """An Open Inference Protocol body with one input tensor (default: zeros of ``shape``)."""
    if data is None:
        data = [0.0] * int(np.prod(shape))
    return {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data, **extra}]}


def raw_json(text: str | bytes) -> dict:
    """requests kwargs sending ``text`` verbatim as application/json (for literals json.dumps refuses)."""
    return dict(data=text.encode() if isinstance(text, str) else text, headers=JSON)


@dataclass(frozen=True)
class Case:
    """One bad request: ``build(digit)`` → requests kwargs; the expected status and message substring."""

    kind: str
    path: str
    build: Callable[[np.ndarray], dict]
    status: int
    message: str
    method: str = "POST"
    # Who refuses it: "handler" (handlers/decoding.py) or "frontend" (TorchServe's Java side).
    source: str = "handler"


MNIST = "/predictions/mnistnet"
MLP = "/predictions/mlp"
V2 = "/v2/models/mnistnet/infer"

CASES = [
    # --- JSON syntax and structure
    Case("malformed JSON", MNIST, lambda d: raw_json('{"data": [0.1, 0.2'), 400, "malformed JSON"),
    Case("JSON nested 100000 deep", MNIST, lambda d: raw_json("[" * 100_000 + "]" * 100_000), 400,
         "nested too deeply"),
    Case("integer literal of 5000 digits", MNIST, lambda d: raw_json('{"data": [' + "9" * 5000 + "]}"), 400,
         "malformed JSON"),
    Case("wrong key", MNIST, lambda d: dict(json={"pixels": digit_list(d)}), 400, "expected key 'data'"),
    Case("data is an object", MNIST, lambda d: dict(json={"data": {"x": 1}}), 400, "'data' must be an array"),
    Case("empty list", MNIST, lambda d: dict(json={"data": []}), 400, "data is an empty list"),
    Case("empty body", MNIST, lambda d: raw_json(b""), 400, "empty request body"),
    Case("whitespace-only body", MNIST, lambda d: raw_json(b" \n\t "), 400, "empty request body"),
    # --- shapes
    Case("image of 700 values", MNIST, lambda d: dict(json={"data": ZEROS[:700]}), 400, "one row of 700 values"),
    Case("image 28x27", MNIST, lambda d: dict(json={"data": [row[:27] for row in digit_list(d)]}), 400,
         "28 rows of 27 values"),
    Case("images 3-D wrong inner shape", MNIST, lambda d: dict(json={"data": [[[0.0] * 56] * 14] * 2}), 400,
         "an array of shape [2, 14, 56]"),
    Case("ragged image list", MNIST, lambda d: dict(json={"data": [ZEROS, ZEROS[:700]]}), 400,
         "data is ragged: data[1] has shape [700]"),
    Case("tabular row of 3 for width 2", MLP, lambda d: dict(json={"data": [[0.1, 0.2, 0.3]]}), 400,
         "expected rows of 2 value(s)"),
    Case("tabular ragged rows", MLP, lambda d: dict(json={"data": [[0.1, 0.2], [0.3]]}), 400, "ragged"),
    # --- element types and values
    Case("string in data", MNIST, lambda d: dict(json={"data": ["0.5"] + ZEROS[1:]}), 400,
         'data[0] must be a number; got string "0.5"'),
    Case("boolean in data", MLP, lambda d: dict(json={"data": [[True, 0.5]]}), 400,
         "data[0][0] must be a number; got boolean true"),
    Case("null in data", MLP, lambda d: dict(json={"data": [[0.5, None]]}), 400,
         "data[0][1] must be a number; got null"),
    Case("null data", MNIST, lambda d: dict(json={"data": None}), 400, "'data' must be an array of numbers; got null"),
    Case("JSON NaN literal", MNIST, lambda d: raw_json('{"data": [NaN' + ", 0.0" * 783 + "]}"), 400,
         "data[0] is nan; NaN and infinite values are not allowed"),
    Case("JSON Infinity literal", MLP, lambda d: raw_json('{"data": [[0.5, Infinity]]}'), 400,
         "data[0][1] is inf"),
    Case("JSON -Infinity literal", MLP, lambda d: raw_json('{"data": [[-Infinity, 0.5]]}'), 400,
         "data[0][0] is -inf"),
    Case("pixels 0-255 instead of [0, 1]", MNIST, lambda d: dict(json={"data": d.astype(float).tolist()}), 400,
         "divide by 255"),
    Case("pixels far outside [0, 1]", MNIST, lambda d: dict(json={"data": [1e30] * 784}), 400,
         "pixel values must be intensities in [0, 1]; got values in [1e+30, 1e+30]"),
    Case("negative pixels", MNIST, lambda d: dict(json={"data": [-5.0] * 784}), 400, "got values in [-5, -5]"),
    Case("tabular value beyond float32", MLP, lambda d: dict(json={"data": [[1e39, 0.0]]}), 400,
         "outside the float32 range"),
    Case("tabular value beyond float64", MLP, lambda d: raw_json('{"data": [[1e999, 0]]}'), 400, "is inf"),
    # --- size
    Case("1025 images (too many samples)", MNIST, lambda d: dict(json={"data": [[0] * 784] * 1025}), 413,
         "too many samples: 1025 > 1024 per request"),
    Case("5000 tabular rows", MLP, lambda d: dict(json={"data": [[0.1, 0.2]] * 5000}), 413,
         "too many samples: 5000 > 1024"),
    # --- images and binary bodies
    Case("truncated PNG", MNIST, lambda d: dict(data=png_of(d)[:60], headers=PNG), 400, "truncated or corrupt"),
    Case("PNG with a corrupt header", MNIST, lambda d: dict(data=png_of(d)[:16] + b"\xff" * 40, headers=PNG), 400,
         "not a readable image"),
    Case("PNG bomb: 100000x100000 declared, 100 rows sent", MNIST,
         lambda d: dict(data=crafted_png(100_000, 100_000, rows=100), headers=PNG), 413, "decompression bomb"),
    Case("PNG 4097 px wide (over the side cap)", MNIST, lambda d: dict(data=crafted_png(4097, 4), headers=PNG),
         413, "image is 4097x4 pixels; at most 4096x4096 is accepted"),
    Case("GIF image", MNIST, lambda d: dict(data=b"GIF89a" + bytes(64), headers={"Content-Type": "image/gif"}),
         400, "only PNG and JPEG images are accepted; the body looks like a GIF image"),
    Case("non-image binary", MNIST,
         lambda d: dict(data=bytes(range(256)) * 16, headers={"Content-Type": "application/octet-stream"}),
         400, "neither UTF-8 JSON nor a PNG/JPEG image"),
    Case("PNG to a tabular model", MLP, lambda d: dict(data=png_of(d), headers=PNG), 400,
         "model 'mlp' takes rows of numbers as JSON, not an image"),
    # --- content types and forms
    Case("text/plain that is not JSON", MNIST,
         lambda d: dict(data=b"seven", headers={"Content-Type": "text/plain"}), 400, "malformed JSON"),
    # curl -d's default content type: TorchServe parses the JSON body as a form, no 'data' field remains.
    Case("JSON sent as form-urlencoded", MNIST,
         lambda d: dict(data=json.dumps({"data": ZEROS}), headers={"Content-Type": FORM}), 400,
         "application/x-www-form-urlencoded"),
    Case("form field data=0.5", MNIST, lambda d: dict(data=b"data=0.5", headers={"Content-Type": FORM}), 400,
         "expected one 28x28 image, a flat 784-vector, or a list of N of either; got a single number"),
    Case("multipart without a 'data' field", MNIST, lambda d: dict(files={"image": ("d.png", png_of(d))}), 400,
         "no form field 'data'"),
    # --- routing: unknown model/version/path, methods
    Case("unknown model", "/predictions/nosuchmodel", lambda d: dict(json={"data": ZEROS}), 404,
         "Model not found: nosuchmodel", source="frontend"),
    Case("unknown version", "/predictions/mnistnet/9.9", lambda d: dict(json={"data": ZEROS}), 404,
         "Model version: 9.9 does not exist for model: mnistnet", source="frontend"),
    Case("unknown model (v2)", "/v2/models/nosuchmodel/infer", lambda d: dict(json=v2([1, 784])), 404,
         "Model not found: nosuchmodel", source="frontend"),
    # Versioned OIP routes are served by our Java agent (serve/torchserve/java): an unknown version is its 404.
    Case("v2 unknown version", "/v2/models/mnistnet/versions/9.9/infer", lambda d: dict(json=v2([1, 784])), 404,
         'model "mnistnet" has no version "9.9"', source="frontend"),
    Case("unknown path", "/predict/mnistnet", lambda d: dict(json={"data": ZEROS}), 404,
         "Requested resource is not found", source="frontend"),
    # TorchServe hands GET/PUT/DELETE on /predictions to the handler like POST: no body → our 400.
    Case("GET on predictions", MNIST, lambda d: {}, 400, "empty request body", method="GET"),
    Case("DELETE on predictions", MNIST, lambda d: {}, 400, "empty request body", method="DELETE"),
    # --- Open Inference Protocol (v2)
    Case("v2 shape [1, 700]", V2, lambda d: dict(json=v2([1, 700])), 400,
         "inputs[0].shape must be [N, 784], [N, 28, 28] or [N, 1, 28, 28] for model 'mnistnet'; got [1, 700]"),
    Case("v2 shape/data size mismatch", V2, lambda d: dict(json=v2([2, 784], data=ZEROS)), 400,
         "inputs[0].shape [2, 784] holds 1568 values but data has 784"),
    Case("v2 datatype BYTES", V2, lambda d: dict(json=v2([1, 784], "BYTES")), 400,
         'inputs[0].datatype must be one of FP16, FP32'),
    Case("v2 UINT8 with fractions", V2, lambda d: dict(json=v2([1, 784], "UINT8", [0.5] * 784)), 400,
         "datatype UINT8 needs integer values"),
    Case("v2 UINT8 out of range", V2, lambda d: dict(json=v2([1, 784], "UINT8", [300] * 784)), 400,
         "datatype UINT8 allows values in [0, 255]"),
    Case("v2 missing datatype", V2, lambda d: dict(json={"inputs": [{"name": "x", "shape": [1, 784],
                                                                      "data": ZEROS}]}), 400,
         "inputs[0] is missing 'datatype'"),
    Case("v2 two input tensors", V2, lambda d: dict(json={"inputs": v2([1, 784])["inputs"] * 2}), 400,
         "got 2 inputs"),
    Case("v2 inputs is an object", V2, lambda d: dict(json={"inputs": {"x": 1}}), 400,
         "'inputs' must be a list holding exactly one input tensor; got object"),
    Case("v2 N = 0", V2, lambda d: dict(json=v2([0, 784], data=[])), 400, "N = 0 samples"),
    Case("v2 N = 1025", V2, lambda d: dict(json=v2([1025, 784], "UINT8", [0] * (1025 * 784))), 413,
         "holds more than 1024 samples"),
    Case("v2 string in data", V2, lambda d: dict(json=v2([1, 784], data=["x"] * 784)), 400,
         'inputs[0].data[0] must be a number; got string "x"'),
    Case("v2 tabular shape [1, 3]", "/v2/models/mlp/infer", lambda d: dict(json=v2([1, 3])), 400,
         "inputs[0].shape must be [N, 2] for model 'mlp'; got [1, 3]"),
]


@pytest.fixture(scope="module")
def baseline(server):
    """Worker ids/pids and the worker start count before the matrix runs (checked by the last test)."""
    return worker_pids(server), count_log_lines(server, WORKER_STARTED)


@pytest.mark.parametrize("case", CASES, ids=[case.kind for case in CASES])
def test_bad_input_is_a_4xx_naming_the_problem(server, baseline, digits, case):
    response = send(server, case.method, case.path, **case.build(digits[0][0]))
    print(f"{case.kind} -> {response.status_code} {response.text[:160]!r}")
    assert response.status_code < 500, f"{case.kind}: server error {response.status_code}: {response.text[:300]}"
    assert response.status_code == case.status, f"{case.kind}: {response.status_code}: {response.text[:300]}"
    assert response.headers.get("Content-Type", "").startswith("application/json")
    message = error_message(response)
    assert case.message in message, f"{case.kind}: message {message!r} lacks {case.message!r}"
    if case.source == "handler":
        # Our handlers' error body repeats the status, so clients need not parse the reason phrase.
        assert response.json()["code"] == case.status


def test_matrix_covers_enough_kinds():
    assert len(CASES) >= 20 and len({case.kind for case in CASES}) == len(CASES)


def test_body_over_max_request_size_is_refused_by_the_frontend(server, baseline):
    """One byte over max_request_size: 413 from Netty's aggregator, before any TorchServe or handler code
    runs; the agent gives it a JSON body naming the limit and the request ID (Netty's own is empty). The
    same happens to a chunked upload that grows too large.
    A body of exactly max_request_size still passes the frontend (and gets our handler's 400 here).
    """
    limit = int(load_properties(server.workdir / "ts-config.properties")["max_request_size"])
    valid_json = b'{"data": [0.5]}'
    exactly = valid_json + b" " * (limit - len(valid_json))
    response = send(server, "POST", MLP, data=exactly, headers=JSON, timeout=120)
    assert response.status_code == 400 and "expected rows of 2 value(s)" in error_message(response)

    response = send(server, "POST", MLP, data=exactly + b" ", headers=JSON, timeout=120)
    assert response.status_code == 413
    assert f"exceeds max_request_size ({limit} bytes)" in error_message(response)
    assert response.json()["request_id"] == response.headers["X-Request-ID"] != ""

    chunks = (b" " * (1 << 20) for _ in range(limit // (1 << 20) + 2))  # no Content-Length: chunked
    response = send(server, "POST", MLP, data=chunks, headers={**JSON, "X-Request-ID": "chunked-1"}, timeout=120)
    assert response.status_code == 413 and response.json()["request_id"] == "chunked-1"


def test_good_neighbours_in_a_batch_with_bad_requests_get_200(server, baseline, digits, reference):
    """8 requests (4 good digits, 4 bad bodies) sent at once while the worker is busy land in ONE batch
    (proved by counting the worker's per-batch log line); the bad ones get their 4xx, the good ones
    their correct answer."""
    images, _ = digits
    bad = [case for case in CASES if case.path == MNIST and case.source == "handler" and case.method == "POST"]
    # The busy request: a 64-image, 256-step explanation keeps the one mnistnet worker computing for
    # ~0.5-1 s (a 1024-image prediction became too quick to hold the 8 requests below back reliably).
    busy_body = json.dumps({"data": (images[:64] / 255.0).reshape(64, 784).tolist(), "steps": 256}).encode()
    for attempt in range(3):
        jobs = []
        for i in range(4):
            jobs.append(("good", i, dict(json={"data": digit_list(images[10 + i])}), 200, None))
            case = bad[(attempt * 4 + i) % len(bad)]
            jobs.append(("bad", case.kind, case.build(images[0]), case.status, case.message))
        barrier = Barrier(len(jobs) + 1)

        def fire(job):
            barrier.wait()
            return send(server, "POST", MNIST, **job[2])

        with ThreadPoolExecutor(max_workers=len(jobs) + 1) as pool:
            start = count_log_lines(server, BATCH_RECEIVED, "mnistnet")
            busy = pool.submit(send, server, "POST", "/explanations/mnistnet", data=busy_body, headers=JSON)
            # Once the worker has received the explanation it is busy for a while: the 8 requests below
            # queue up meanwhile and the next batch takes them all (batch size 8).
            before = wait_for_log_count(server, BATCH_RECEIVED, "mnistnet", start + 1)
            futures = [pool.submit(fire, job) for job in jobs]
            barrier.wait()
            responses = [future.result() for future in futures]
            assert busy.result().status_code == 200
        wait_for_log_count(server, BATCH_RECEIVED, "mnistnet", before + 1)
        time.sleep(0.5)  # log lines arrive asynchronously: let a possible second batch's line arrive too
        batches = count_log_lines(server, BATCH_RECEIVED, "mnistnet") - before

        for (kind, what, _, status, needle), response in zip(jobs, responses):
            assert response.status_code == status, f"{kind} {what}: {response.status_code} {response.text[:200]}"
            if kind == "bad":
                assert needle in error_message(response)
            else:
                answer = response.json()
                expected = reference.probabilities("mnistnet", images[10 + what : 11 + what])[0]
                np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-5)
        print(f"attempt {attempt + 1}: 8 mixed requests answered in {batches} batch(es)")
        if batches == 1:
            return
    pytest.fail(f"the 8 concurrent requests never landed in one batch (last attempt: {batches} batches)")


def test_no_worker_restarted_and_server_still_answers(server, baseline, digits, reference):
    """Runs last in this module: the same worker processes as before the matrix, and correct answers."""
    pids_before, starts_before = baseline
    assert worker_pids(server) == pids_before
    assert count_log_lines(server, WORKER_STARTED) == starts_before
    assert "Backend worker process died" not in server.output_tail(lines=10_000)

    images, labels = digits
    for i in range(100, 104):
        response = send(server, "POST", MNIST, data=png_of(images[i]), headers=PNG)
        assert response.status_code == 200
        expected = reference.probabilities("mnistnet", images[i : i + 1])[0]
        np.testing.assert_allclose(response.json()["probabilities"], expected, atol=1e-5)
    rows = np.array([[0.5, -0.3], [1.5, 0.2]])
    response = send(server, "POST", MLP, json={"data": rows.tolist()})
    assert response.status_code == 200
    np.testing.assert_allclose(response.json()["probabilities"], reference.outputs("mlp", rows), atol=1e-5)
