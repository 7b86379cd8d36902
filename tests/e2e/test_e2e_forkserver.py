"""The fork server (serve/forkserver.py) under a real TorchServe: its workers answer, a worker the frontend
kills (destroyForcibly hits the client it started) dies and is replaced by another forked one, and stop
leaves no process behind."""
from __future__ import annotations

import time

import psutil
import pytest

from client.api import TorchServeClient
from serve.package import package_models
from serve.server import Ports, Server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def worker_pids(server: Server) -> list[int]:
    return sorted(w["pid"] for w in server.describe("mnistnet")["workers"])


def test_forked_workers_answer_are_replaced_and_stop_cleanly(tmp_path, weights_dir):
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
        client = TorchServeClient(server.inference_url, key_file=server.key_file)
        assert client.predict("mnistnet", {"data": [0.0] * 784})["predicted_class"] in range(10)

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
        assert client.predict("mnistnet", {"data": [0.0] * 784})["predicted_class"] in range(10)
        workers = [psutil.Process(pid) for pid in now]
    finally:
        server.stop()
    assert server.forkserver_pid() is None and not forkserver.is_running()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers left after stop: {alive}"
