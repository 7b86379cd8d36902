"""`podman stop` (SIGTERM) of the serving container under keep-alive load answers every request already sent.

The container's entrypoint hands the SIGTERM to `serve start --foreground`, which stops TorchServe; the
agent's drain (serve/torchserve/java/Drain.java) runs before TorchServe closes anything. Per run: a fresh
container of the session's image (tests/container/conftest.py), 16 threads sending 64-image requests to
deepnet one after another, each on its own persistent HTTP/1.1 connection, plus idle keep-alive
connections that were used once; then ``stop``. Repeated ``RUNS`` times. Asserted per run:

* every request sent before the stop, and every request sent on a connection that was open at the stop
  (the signal reaches the JVM a little after ``stop`` is called), is answered 200 with the in-process
  model's answer: no reset, no connection closed under a request;
* requests on connections made after the stop may be refused or cut (the server is going away; through the
  engine's port forwarder the connection is accepted, then cut, so such a client sees a reset or a close,
  never "connection refused"), never answered wrongly;
* each idle keep-alive connection is closed by the server with a FIN, not a reset;
* the container exits 0 within the stop timeout, and its log shows the drain.

Hold ``flock /work/wt/notes/container.lock`` around the run on a shared machine.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch

from models.registry import get_spec
from paths import REPO_ROOT
from test_image import STOP_TIMEOUT_S, mnist_test_digits, run_container

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUNS = 3
THREADS = 16
IDLE = 4  # keep-alive connections used once, then idle at the stop
IMAGES = 64  # per request
LOAD_S = 3.0  # steady load before the stop


def deepnet_reference(rows: np.ndarray) -> np.ndarray:
    """The in-process deepnet's probabilities for intensity ``rows`` (pixels / 255), from the weights the image
    was built from, normalised as the handler does."""
    from train.data import normalize_images

    spec = get_spec("deepnet")
    model = spec.build()
    model.load_state_dict(torch.load(REPO_ROOT / "weights" / "deepnet.pt", weights_only=True))
    pixels = np.rint(rows * 255).astype(np.uint8)
    with torch.no_grad():
        return torch.softmax(model.eval()(normalize_images(pixels).reshape(len(rows), -1)), dim=1).numpy()


def load(port: int, key: str, body: str, stop_at: list, results: list, go: threading.Event) -> None:
    """Requests on one persistent connection (a new one when the server closes it) until a connection cannot be
    made or fails after the stop; each ``(sent_at, status or 'error', body or error, opened_at)``."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
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
            conn.request("POST", "/predictions/deepnet", body=body, headers=headers)
            answer = conn.getresponse()
            results.append((sent_at, answer.status, answer.read(), opened_at))
            if answer.will_close:
                conn.close()
        except (OSError, http.client.HTTPException) as err:
            results.append((sent_at, "error", repr(err), opened_at))
            conn.close()
            if stop_at:
                return


def idle_connection(port: int, key: str) -> socket.socket:
    """A keep-alive connection that has had one answer (a small request) and is now idle."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=90)
    body = json.dumps({"data": [[0.0] * 784]}).encode()
    sock.sendall(b"POST /predictions/mnistnet HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    answer = http.client.HTTPResponse(sock)
    answer.begin()
    answer.read()
    assert answer.status == 200 and not answer.will_close
    return sock


def closed_how(sock: socket.socket) -> str:
    """How the server ended an idle connection: 'FIN', 'reset', or what else it sent."""
    try:
        data = sock.recv(65536)
        return "FIN" if data == b"" else f"data {data[:80]!r}"
    except ConnectionResetError:
        return "reset"
    except OSError as err:
        return repr(err)
    finally:
        sock.close()


def test_stop_under_keep_alive_load_answers_every_request_sent(engine, image):
    rows, _ = mnist_test_digits(IMAGES)
    expected = deepnet_reference(rows)
    body = json.dumps({"data": rows.tolist()})
    for run in range(RUNS):
        box = run_container(engine, image)
        try:
            idle = [idle_connection(box.http_port, box.key) for _ in range(IDLE)]
            stop_at: list[float] = []
            results: list = []
            go = threading.Event()
            threads = [threading.Thread(target=load, args=(box.http_port, box.key, body, stop_at, results, go),
                                        daemon=True) for _ in range(THREADS)]
            for thread in threads:
                thread.start()
            go.set()
            time.sleep(LOAD_S)
            stop_at.append(time.time())
            box.engine("stop", "-t", str(STOP_TIMEOUT_S), box.cid, timeout=STOP_TIMEOUT_S + 30)
            took = time.time() - stop_at[0]
            for thread in threads:
                thread.join(timeout=120)
            assert not any(thread.is_alive() for thread in threads)
            idle_ends = [closed_how(sock) for sock in idle]
            code = box.engine("inspect", "--format", "{{.State.ExitCode}}", box.cid).stdout.strip()
            logs = box.engine("logs", box.cid, check=False)
            logs = logs.stdout + logs.stderr
        finally:
            box.engine("rm", "-f", "-t", "0", box.cid, check=False)

        before = [r for r in results if r[0] < stop_at[0]]
        open_at_stop = [r for r in results if r[0] >= stop_at[0] and r[3] < stop_at[0]]
        later = [r for r in results if r[3] >= stop_at[0]]
        cut = [r for r in later if r[1] == "error"]
        print(f"\n[container] stop {run + 1}: {len(before)} requests sent before it and {len(open_at_stop)} after it "
              f"on connections open at it, all answered 200 ({sum(r[1] == 200 for r in later)} more on connections "
              f"made after it; {len(cut)} of those cut: {sum('Reset' in r[2] for r in cut)} reset, "
              f"{len(cut) - sum('Reset' in r[2] for r in cut)} closed); idle connections: {idle_ends}; "
              f"stopped in {took:.1f} s, exit {code}")
        failed = [r[:2] + (str(r[2])[:200],) for r in before + open_at_stop if r[1] != 200]
        assert not failed, f"stop {run + 1}: requests sent before the stop or on an open connection not answered 200: " \
                           f"{failed[:5]}"
        for _, status, data, _ in before + open_at_stop + [r for r in later if r[1] == 200]:
            answers = json.loads(data)
            assert len(answers) == IMAGES
            np.testing.assert_allclose([a["probabilities"] for a in answers], expected, atol=1e-5)
        assert not [r for r in later if r[1] not in (200, "error")], f"stop {run + 1}: wrong answers after the stop"
        assert len(before) > THREADS, "there was load on every connection"
        assert idle_ends == ["FIN"] * IDLE, f"stop {run + 1}: idle keep-alive connections not closed cleanly"
        assert code == "0", f"stop {run + 1}: exit code {code}:\n{logs[-3000:]}"
        assert took < STOP_TIMEOUT_S, f"stop {run + 1} took {took:.0f} s: killed, not stopped"
        assert "oip-agent: drain:" in logs and "servers stopped (status 0)" in logs, logs[-3000:]
