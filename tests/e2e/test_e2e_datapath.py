"""The data path (issue 24) against a real TorchServe: big binary requests, a lone request, batches under load.

Its own server, mnistnet alone with ONE worker, batch 8 and a ``maxBatchDelay`` of 3 s: TorchServe's own batch
loop waits that long for company after a batch's first request, so a lone request that comes back well within
it shows the agent's no-wait batching (serve/torchserve/java/DataPath.java) is in force; with one worker, concurrent
requests queue while it is busy, and batches of several requests must still form from them.
"""
from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
import requests

from client.api import binary_v2_request, parse_binary_v2_response
from e2e_support import TOLERANCE, normalise_pixels
from models.registry import get_spec
from serve.package import build_archive, model_config
from servers import post, start_ready_server

pytestmark = pytest.mark.e2e
MODEL = "mnistnet"
BATCH_DELAY_MS = 3000


@pytest.fixture(scope="module")
def slow_window_server(tmp_path_factory, weights_dir):
    spec = get_spec(MODEL)
    root = tmp_path_factory.mktemp("datapath")
    store = root / "store"
    config = {**model_config(spec), "minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": BATCH_DELAY_MS}
    build_archive(spec, weights_dir / f"{MODEL}.pt", store, config=config)
    server = start_ready_server(root, store, [MODEL])
    try:
        yield server
    finally:
        server.stop()


def infer_binary(server, x: np.ndarray) -> tuple[dict, requests.Response]:
    body, header_length = binary_v2_request(x)
    headers = {"Inference-Header-Content-Length": str(header_length), "Content-Type": "application/octet-stream"}
    response = post(server, f"/v2/models/{MODEL}/infer", data=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text[:500]
    answer = parse_binary_v2_response(response.content, response.headers.get("Inference-Header-Content-Length"))
    return {o["name"]: o["data"] for o in answer["outputs"]}, response


def digits(mnist_test, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real test digits as float32 intensities (n, 784), and the normalised input the model takes."""
    images, _ = mnist_test
    pixels = images[start:start + n]
    return (pixels.astype(np.float32) / 255).reshape(n, 784), normalise_pixels(pixels)


def test_1024_digits_in_one_binary_request_match_the_in_process_model(slow_window_server, reference, mnist_test):
    x, model_input = digits(mnist_test, 1024)
    outputs, _ = infer_binary(slow_window_server, x)
    want = reference(MODEL, model_input)
    np.testing.assert_allclose(outputs["probabilities"], want, atol=TOLERANCE)
    assert outputs["predicted_class"].reshape(-1).tolist() == want.argmax(axis=1).tolist()


def test_a_lone_request_is_answered_without_waiting_for_the_batch_window(slow_window_server, reference, mnist_test):
    """One request at a time: each answer correct and back long before TorchServe's 3 s window would close
    (its own loop would hold every one of them for the whole window: nothing else is queued)."""
    for start in (0, 1, 2):
        time.sleep(0.05)  # lone: no other request in progress or just answered (serve/torchserve/java/DataPath.java)
        x, model_input = digits(mnist_test, 1, start)
        began = time.perf_counter()
        outputs, response = infer_binary(slow_window_server, x)
        took = time.perf_counter() - began
        np.testing.assert_allclose(outputs["probabilities"], reference(MODEL, model_input), atol=TOLERANCE)
        assert took < BATCH_DELAY_MS / 1000 / 2, f"a lone request took {took:.2f} s: it waited for a batch"
        # The worker's own account agrees: the request reached the handler within a fraction of the window.
        queued = re.search(r"queue;dur=([0-9.]+)", response.headers["Server-Timing"])
        assert queued and float(queued.group(1)) < BATCH_DELAY_MS / 2, response.headers["Server-Timing"]


def scrape(server) -> dict[str, float]:
    totals: dict[str, float] = {}
    for line in requests.get(server.metrics_url, timeout=10).text.splitlines():
        match = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if match and f'model_name="{MODEL}"' in match.group(2):
            stage = re.search(r'stage="(\w+)"', match.group(2))
            key = match.group(1) + (f":{stage.group(1)}" if stage else "")
            totals[key] = totals.get(key, 0.0) + float(match.group(3))
    return totals


def test_concurrent_requests_still_share_batches(slow_window_server, reference, mnist_test):
    """64 single-image requests from 16 threads at once: each gets its own digit's answer, and the worker ran
    fewer forward passes than requests (the handler observes its forward stage once per batch)."""
    n = 64
    x, model_input = digits(mnist_test, n, start=100)
    want = reference(MODEL, model_input)
    before = scrape(slow_window_server)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    todo = list(range(n))
    lock = threading.Lock()

    def sender():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            try:
                outputs, _ = infer_binary(slow_window_server, x[i:i + 1])
                results[i] = outputs["probabilities"][0]
            except BaseException as err:  # reported below
                errors.append(err)

    threads = [threading.Thread(target=sender) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[:3]
    assert sorted(results) == list(range(n))
    np.testing.assert_allclose(np.array([results[i] for i in range(n)]), want, atol=TOLERANCE)
    deadline = time.monotonic() + 10
    while True:  # the frontend reads the worker's metric lines asynchronously
        after = scrape(slow_window_server)
        answered = after.get("model_predicted_class_total", 0) - before.get("model_predicted_class_total", 0)
        if answered >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answered == n
    batches = after["model_stage_duration_seconds_count:forward"] - before.get(
        "model_stage_duration_seconds_count:forward", 0)
    assert 1 <= batches < n, f"{batches} forward passes for {n} requests: no batch held two requests"
