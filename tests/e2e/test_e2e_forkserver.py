"""The fork server (serve/torchserve/forkserver.py) under a real TorchServe: its workers answer, a worker the frontend
kills (destroyForcibly hits the client it started) dies and is replaced by another forked one, and stop
leaves no process behind."""
from __future__ import annotations

import time

import numpy as np
import psutil
import pytest
from PIL import Image

from client.api import TorchServeClient
from e2e_support import TOLERANCE, normalise_pixels
from paths import REPO_ROOT
from serve.package import package_models
from serve.server import Ports, Server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DIGITS = sorted((REPO_ROOT / "examples").glob("digit_[0-9].png"))  # real MNIST test digits, one per class


def worker_pids(server: Server) -> list[int]:
    return sorted(w["pid"] for w in server.describe("mnistnet")["workers"])


def assert_digits_answered_like_the_model(client: TorchServeClient, reference) -> None:
    """Each example digit as PNG, one request each (so both workers answer), and all ten as one JSON batch:
    class and probabilities equal the in-process model's (the weights the server serves)."""
    assert [int(path.stem[-1]) for path in DIGITS] == list(range(10))
    pixels = np.stack([np.asarray(Image.open(path).convert("L")) for path in DIGITS])
    expected = reference("mnistnet", normalise_pixels(pixels).reshape(len(pixels), -1))
    assert expected.argmax(axis=1).tolist() == list(range(10)), "the in-process model reads every example digit"
    answers = [client.predict("mnistnet", path.read_bytes()) for path in DIGITS]
    answers += client.predict("mnistnet", {"data": (pixels / 255.0).tolist()})
    for i, answer in enumerate(answers):
        digit = i % 10
        assert answer["predicted_class"] == digit, (DIGITS[digit].name, answer)
        np.testing.assert_allclose(answer["probabilities"], expected[digit], atol=TOLERANCE, err_msg=DIGITS[digit].name)


def test_forked_workers_answer_are_replaced_and_stop_cleanly(tmp_path, weights_dir, reference):
    store = tmp_path / "store"
    package_models(["mnistnet"], weights_dir, store)
    server = Server(ports=Ports.free(), tmpdir=tmp_path / "t", workdir=tmp_path / "w", model_store=store,
                    models=["mnistnet"], log_dir=tmp_path / "logs", fork_workers=True)
    server.start()
    try:
        server.wait_ready(timeout=240, progress=False)
        forkserver = psutil.Process(server.forkserver_pid())
        pids = worker_pids(server)
        assert len(pids) == 2 and all(psutil.Process(pid).ppid() == forkserver.pid for pid in pids), pids
        # TorchServe 0.12.0 here: each worker ran with the worker patches (serve/torchserve/worker.py), as it said
        log = (tmp_path / "logs" / "model_log.log").read_text()
        for pid in pids:
            assert f"serve.torchserve: worker patches on (TorchServe 0.12.0: retrieve_msg, Service.predict), pid {pid}" in log
        client = TorchServeClient(server.inference_url, key_file=server.key_file)
        assert_digits_answered_like_the_model(client, reference)

        clients = [p for p in psutil.Process(server.pid()).children() if "model_service_worker" in " ".join(p.cmdline())]
        assert len(clients) == 2 and not {c.pid for c in clients} & set(pids)
        clients[0].kill()  # what the frontend's destroyForcibly does to a worker it gives up on
        deadline = time.monotonic() + 120
        while True:
            try:
                now = worker_pids(server)
                if len(set(now) - set(pids)) == 1 and Server.workers_ready(server.describe("mnistnet")):
                    break
            except Exception:  # noqa: BLE001 - the management API may briefly list the dead worker
                pass
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.2)
        gone = [pid for pid in pids if pid not in now]
        assert len(gone) == 1 and not psutil.pid_exists(gone[0])
        (new,) = set(now) - set(pids)
        assert psutil.Process(new).ppid() == forkserver.pid, "the replacement was forked too"
        assert_digits_answered_like_the_model(client, reference)  # the replacement answers too
        workers = [psutil.Process(pid) for pid in now]
    finally:
        server.stop()
    assert server.forkserver_pid() is None and not forkserver.is_running()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers left after stop: {alive}"
