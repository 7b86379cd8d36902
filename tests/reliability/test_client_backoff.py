"""The client's busy-retry policy against a local stand-in server (no TorchServe): 503/429 answers are
retried a bounded number of times after jittered, capped back-off; ``Retry-After`` is honoured; other
errors are not retried. tests/reliability/test_faults.py checks the same client against a real overload."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from client.api import TorchServeClient, TorchServeError


@pytest.fixture()
def stand_in():
    """A server answering POST /predictions/* from ``script`` (a list of (status, headers)); 200 after it."""
    state = {"script": [], "calls": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state["calls"] += 1
            status, headers = state["script"].pop(0) if state["script"] else (200, {})
            body = json.dumps({"ok": True} if status == 200 else
                              {"code": status, "type": "ServiceUnavailableException", "message": "busy"}).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_busy_answers_are_retried_then_succeed(stand_in, monkeypatch):
    url, state = stand_in
    waits = []
    monkeypatch.setattr("client.api.time.sleep", waits.append)
    state["script"] = [(503, {}), (429, {}), (503, {})]
    client = TorchServeClient(url, token="k", retries=3, backoff=0.2, max_backoff=1.0)
    assert client.predict("m", {"data": [1]}) == {"ok": True}
    assert state["calls"] == 4 and client.busy_retries == 3
    assert 0.1 <= waits[0] <= 0.2 and 0.2 <= waits[1] <= 0.4 and 0.4 <= waits[2] <= 0.8, waits


def test_retries_are_bounded_and_the_last_busy_answer_is_raised(stand_in, monkeypatch):
    url, state = stand_in
    monkeypatch.setattr("client.api.time.sleep", lambda s: None)
    state["script"] = [(503, {})] * 10
    client = TorchServeClient(url, token="k", retries=2)
    with pytest.raises(TorchServeError) as err:
        client.predict("m", {"data": [1]})
    assert err.value.status == 503 and err.value.message == "busy" and state["calls"] == 3
    state["script"], state["calls"] = [(503, {})], 0
    with pytest.raises(TorchServeError):
        TorchServeClient(url, token="k", retries=0).predict("m", {"data": [1]})
    assert state["calls"] == 1, "retries=0: no retry"


def test_other_errors_are_not_retried(stand_in, monkeypatch):
    url, state = stand_in
    monkeypatch.setattr("client.api.time.sleep", lambda s: pytest.fail("slept"))
    state["script"] = [(500, {})]
    with pytest.raises(TorchServeError) as err:
        TorchServeClient(url, token="k").predict("m", {"data": [1]})
    assert err.value.status == 500 and state["calls"] == 1


def test_retry_after_is_honoured_within_the_cap(stand_in, monkeypatch):
    url, state = stand_in
    waits = []
    monkeypatch.setattr("client.api.time.sleep", waits.append)
    state["script"] = [(503, {"Retry-After": "2"}), (503, {"Retry-After": "30"})]
    TorchServeClient(url, token="k", retries=3, backoff=0.1, max_backoff=5.0).predict("m", {"data": [1]})
    assert waits == [2.0, 5.0]


def test_busy_delay_is_jittered_and_bounded():
    client = TorchServeClient("http://127.0.0.1:1", token="k", retries=3, backoff=0.2, max_backoff=1.0)
    delays = [client._busy_delay(n, requests.Response()) for n in range(6) for _ in range(50)]
    assert min(delays) >= 0.1 and max(delays) <= 1.0
    assert len({round(d, 9) for d in delays}) > 100, "jittered"
