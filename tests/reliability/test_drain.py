"""A stop under keep-alive load answers every request already sent: no reset, no dropped answer.

``server.stop()`` is SIGTERM, i.e. TorchServe's ``ModelServer.stop`` with the agent's drain before it
(serve/torchserve/java/Drain.java). Eight threads send requests one after another, each on its own
persistent HTTP/1.1 connection, while the server is stopped; this is repeated over several stops (the
server is started again in between). Every request a thread sent before the stop began must be answered
200 with the in-process model's answer (a reset or a closed connection there fails the test); so
must every request sent on a connection that was open when the stop began (the JVM begins its stop a
little after the signal). Requests on connections made after it may be refused or cut (the server is going
away), but never answered wrongly. The drain's
answers close their connection with ``Connection: close``.
"""
from __future__ import annotations

import http.client
import json
import threading
import time

import numpy as np
import pytest

from servers import READY_TIMEOUT_S

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROWS = np.array([[1.0, -0.5], [-1.0, 0.5], [0.25, 0.75]], dtype=np.float32)
THREADS = 8
STOPS = 5


def load(port: int, key: str, stop_at: list, results: list, go: threading.Event) -> None:
    """Send requests on one persistent connection (a new one when the server closes it) until a connection
    cannot be made; record each ``(sent_at, outcome, answer_or_error, connection_header, opened_at)``."""
    body = json.dumps({"data": ROWS.tolist()})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    go.wait()
    opened_at = 0.0
    while True:
        if conn.sock is None:
            try:
                conn.connect()
            except OSError:  # refused: the server stopped listening
                return
            opened_at = time.time()
            if stop_at and time.time() > stop_at[0] + 30:
                return
        sent_at = time.time()
        try:
            conn.request("POST", "/predictions/mlp", body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
            results.append((sent_at, answer.status, data, answer.getheader("Connection"), opened_at))
            if answer.will_close:
                conn.close()
        except (OSError, http.client.HTTPException) as err:
            results.append((sent_at, "error", repr(err), None, opened_at))
            conn.close()
            if stop_at:
                return


def test_stop_under_keep_alive_load_answers_every_request_sent(start_server, reference):
    server = start_server("drain", models=["mlp"])
    expected = reference.outputs("mlp", ROWS)
    for round_ in range(STOPS):
        key = server.keys()["inference"]
        stop_at: list[float] = []
        results: list = []
        go = threading.Event()
        threads = [threading.Thread(target=load, args=(server.ports.inference, key, stop_at, results, go), daemon=True)
                   for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        go.set()
        time.sleep(1.5)  # steady keep-alive load
        stop_at.append(time.time())
        server.stop()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)

        before = [r for r in results if r[0] < stop_at[0]]
        after = [r for r in results if r[0] >= stop_at[0]]
        failed = [r for r in before if r[1] != 200]
        assert not failed, f"stop {round_}: requests sent before the stop not answered: {failed[:5]}"
        # The JVM begins its stop a little after the signal: a request sent meanwhile on a connection that was
        # open at the stop must be answered too (the drain's answers close it with Connection: close).
        failed = [r for r in after if r[4] < stop_at[0] and r[1] != 200]
        assert not failed, f"stop {round_}: requests on connections open at the stop not answered: {failed[:5]}"
        for sent_at, status, data, *_ in before + [r for r in after if r[1] == 200]:
            assert np.allclose(json.loads(data)["probabilities"], expected, atol=1e-5)
        assert not [r for r in after if r[1] not in (200, "error")], f"stop {round_}: wrong answers after the stop"
        closing = [r for r in results if r[1] == 200 and (r[3] or "").lower() == "close"]
        print(f"\nstop {round_}: {len(before)} requests sent before it, all answered 200; "
              f"{len(closing)} answered with Connection: close; after it {len(after)} "
              f"({sum(r[1] == 'error' for r in after)} cut)")
        assert len(before) > THREADS  # there was load on every connection
        assert closing, f"stop {round_}: no answer of the drain said Connection: close: {results[-10:]}"
        if round_ < STOPS - 1:
            server.start()
            server.wait_ready(timeout=READY_TIMEOUT_S, progress=False)
