"""A worker that dies while its next batch is still filling: the requests held for that batch are answered.

TorchServe's worker thread takes the first queued request, then waits up to ``maxBatchDelay`` for more
before it sends the batch to its worker process. A worker process killed during that wait used to leave
the held requests unanswered for ever (the client waited out its own timeout): serve/torchserve/java/HeldJobs.java
now puts them back at the head of the model's queue, and the restarted worker serves them.

Deterministic: mnistnet is packaged here with ``maxBatchDelay`` 3000 ms and the server runs TorchServe's own
batch wait (``-Doip.batchWait=always``: by default the agent sends a lone request at once, DataPath.java), so one
lone request sits in the batch wait for 3 s; the worker is SIGKILLed 1 s into it. Asserted, in both worker launch modes (fork server
on and off): the request gets the right prediction (the in-process model's), within the model's response
timeout, from the new worker process. And a scale-down to 0 and back to 1 during the wait (TorchServe's
own path for a worker it stops on purpose): the held requests are answered, once, in one batch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from models.registry import get_spec
from serve.package import build_archive, model_config
from servers import manage, start_ready_server, worker_pids

from .support import BATCH_RECEIVED, PNG, count_log_lines, png_of, wait_for_log_count

HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BATCH_DELAY_MS = 3000  # the held request waits this long for its batch to fill
RESPONSE_TIMEOUT_S = 30  # the model's responseTimeout: the bound on the answer
KILL_INTO_WAIT_S = 1.0  # the kill lands this far into the batch wait
CLIENT_TIMEOUT_S = 2 * RESPONSE_TIMEOUT_S  # a hang shows up as no answer by then


@pytest.fixture(scope="module")
def always_wait(tmp_path_factory) -> Path:
    """The repository's config with TorchServe's batch wait kept (-Doip.batchWait=always), so requests are held."""
    from serve.server import DEFAULT_CONFIG

    lines = [line + " -Doip.batchWait=always" if line.startswith("vmargs=") else line
             for line in DEFAULT_CONFIG.read_text().splitlines()]
    assert any("-Doip.batchWait=always" in line for line in lines)
    path = tmp_path_factory.mktemp("always-wait") / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def slow_batch_store(tmp_path_factory, weights_dir):
    """mnistnet, one worker, batches of 8 that wait up to BATCH_DELAY_MS to fill."""
    store = tmp_path_factory.mktemp("slow-batch-store").resolve()
    spec = dataclasses.replace(get_spec("mnistnet"), workers=1, batch_size=8, max_batch_delay_ms=BATCH_DELAY_MS)
    config = {**model_config(spec), "responseTimeout": RESPONSE_TIMEOUT_S}
    build_archive(spec, weights_dir / "mnistnet.pt", store, config=config)
    return store


@pytest.mark.parametrize("fork_workers", [True, False], ids=["forkserver", "no-forkserver"])
def test_request_held_for_a_batch_survives_its_worker(fork_workers, slow_batch_store, always_wait, tmp_path, digits,
                                                      reference):
    server = start_ready_server(tmp_path, slow_batch_store, ["mnistnet"], fork_workers=fork_workers, config=always_wait)
    try:
        images, _ = digits
        expected = reference.probabilities("mnistnet", images[:1])[0]
        old_pid = worker_pids(server)["mnistnet"][0][1]
        answer: dict = {}

        def send():
            started = time.monotonic()
            try:
                response = requests.post(
                    f"{server.inference_url}/predictions/mnistnet", data=png_of(images[0]), timeout=CLIENT_TIMEOUT_S,
                    headers={**PNG, "Authorization": f"Bearer {server.keys()['inference']}"})
                answer.update(status=response.status_code, body=response.text)
            except requests.RequestException as err:
                answer.update(status=None, body=f"{type(err).__name__}: {err}")
            answer["seconds"] = time.monotonic() - started

        client = threading.Thread(target=send)
        client.start()
        time.sleep(KILL_INTO_WAIT_S)  # the request is now held by the worker thread, waiting for its batch
        assert client.is_alive() and not answer, f"answered before the batch delay ran out: {answer}"
        os.kill(old_pid, signal.SIGKILL)
        client.join(CLIENT_TIMEOUT_S + 5)

        assert answer.get("status") is not None, f"no answer: {answer}\n{server.output_tail()}"
        assert answer["seconds"] <= RESPONSE_TIMEOUT_S, answer
        assert answer["status"] == 200, answer
        assert np.allclose(json.loads(answer["body"])["probabilities"], expected, atol=1e-5)
        assert worker_pids(server)["mnistnet"][0][1] != old_pid, "the answer must come from the new worker"
        print(f"\nheld request answered {answer['status']} {answer['seconds']:.1f} s after it was sent "
              f"(kill at {KILL_INTO_WAIT_S:.0f} s, batch delay {BATCH_DELAY_MS} ms)")
    finally:
        server.stop()


def test_requests_held_for_a_batch_survive_a_scale_down(slow_batch_store, always_wait, tmp_path, digits, reference):
    """TorchServe's own path when it stops a worker on purpose: it returns the held requests to the queue
    itself (the agent's patch stays out of it: each request must be queued and answered exactly once)."""
    server = start_ready_server(tmp_path, slow_batch_store, ["mnistnet"], log_config=HERE / "log4j2.xml",
                                config=always_wait)
    try:
        images, _ = digits
        expected = reference.probabilities("mnistnet", images[:2])
        answers: list = [None, None]

        def send(i):
            response = requests.post(
                f"{server.inference_url}/predictions/mnistnet", data=png_of(images[i]), timeout=CLIENT_TIMEOUT_S,
                headers={**PNG, "Authorization": f"Bearer {server.keys()['inference']}"})
            answers[i] = (response.status_code, response.json())

        clients = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for client in clients:
            client.start()
        time.sleep(KILL_INTO_WAIT_S)  # both requests are held, waiting for their batch to fill
        scale = lambda n: manage(server, "PUT", f"/models/mnistnet?min_worker={n}&max_worker={n}&synchronous=true")
        down = scale(0)
        assert down.status_code == 200, down.text
        assert all(client.is_alive() for client in clients), answers
        up = scale(1)
        assert up.status_code == 200, up.text
        for client in clients:
            client.join(CLIENT_TIMEOUT_S + 5)
        for i, answer in enumerate(answers):
            assert answer is not None and answer[0] == 200, answers
            assert np.allclose(answer[1]["probabilities"], expected[i], atol=1e-5)
        # Served once, together: one batch reached the new worker (none before the scale-down).
        assert wait_for_log_count(server, BATCH_RECEIVED, "mnistnet", 1) == 1
        time.sleep(1)
        assert count_log_lines(server, BATCH_RECEIVED, "mnistnet") == 1
    finally:
        server.stop()
