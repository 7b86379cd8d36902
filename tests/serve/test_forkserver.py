"""serve/torchserve/forkserver.py with TorchServe's real worker script: a real fork server (torch preloaded) and the
client as TorchServe runs it (serve/torchserve/worker_python ts/model_service_worker.py ...), without the frontend.
Exit codes, stdout/stderr, signals, a killed client, and the plain-interpreter fallbacks."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import ts

from paths import REPO_ROOT
from serve.torchserve.forkserver import import_time_environment
from serve.torchserve.launch import FORKSERVER, WORKER_PYTHON
from servers import clean_env

WORKER = str(Path(ts.__file__).resolve().parent / "model_service_worker.py")
METRICS = str(REPO_ROOT / "serve" / "metrics.yaml")


def listening_worker(sock_dir: Path) -> list[str]:
    """A worker command line as the frontend writes it (the socket name ends in its port)."""
    return [WORKER, "--sock-type", "unix", "--sock-name", str(sock_dir / ".ts.sock.9000"), "--metrics-config", METRICS]


@pytest.fixture(scope="module")
def forkserver(tmp_path_factory):
    """A running fork server (same environment as the clients below) and the clients' environment."""
    root = tmp_path_factory.mktemp("fork")
    sock = root / "f.sock"
    env = clean_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = open(root / "forkserver.out", "wb")
    server = subprocess.Popen([sys.executable, "-P", str(FORKSERVER), "--serve", str(sock)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "ready at" not in (root / "forkserver.out").read_text():
        assert server.poll() is None and time.monotonic() < deadline, (root / "forkserver.out").read_text()
        time.sleep(0.1)
    client_env = {**env, "SERVE_FORKSERVER": str(sock), "SERVE_WORKER_PYTHON": sys.executable}
    yield server, client_env, root
    server.terminate()
    server.wait(timeout=20)
    log.close()
    assert not sock.exists(), "the fork server removes its socket when it stops"


def client(args: list[str], env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(WORKER_PYTHON), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_forked_worker_gets_argv_streams_and_exit_code(forkserver):
    server, env, _ = forkserver
    shown = client([WORKER, "--help"], env)
    out, err = shown.communicate(timeout=60)
    assert shown.returncode == 0 and "--sock-type" in out, (out, err)
    assert "plain worker" not in err, err  # it was forked, not exec'd
    refused = client([WORKER, "--sock-type", "bogus"], env)
    out, err = refused.communicate(timeout=60)
    assert refused.returncode == 2 and "invalid choice: 'bogus'" in err, (out, err)


def test_worker_is_a_child_of_the_fork_server_in_the_clients_directory(forkserver, tmp_path):
    server, env, _ = forkserver
    sock = tmp_path / ".ts.sock.9000"
    worker = client(listening_worker(tmp_path), env, cwd=tmp_path)
    try:
        line, before = worker.stdout.readline(), []
        while "[PID]" not in line:
            assert line, worker.stderr.read()
            before.append(line)
            line = worker.stdout.readline()
        pid = int(line.strip().split("[PID]")[1])
        # the child installed the worker patches (serve/torchserve/worker.py) before the worker script ran
        assert any(b.startswith("serve.torchserve: worker patches on") and f"pid {pid}" in b for b in before), before
        child = psutil.Process(pid)
        assert child.ppid() == server.pid and pid != worker.pid
        assert child.cwd() == str(tmp_path)
        assert sock.exists()  # it listens where the frontend told it to
        worker.send_signal(signal.SIGTERM)  # forwarded: the worker dies of it, and so does the client
        assert worker.wait(timeout=20) == -signal.SIGTERM
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        worker.kill()


def test_killed_client_takes_its_worker_along(forkserver, tmp_path):
    """TorchServe stops a worker with destroyForcibly (SIGKILL to the process it started: the client)."""
    _, env, _ = forkserver
    worker = client(listening_worker(tmp_path), env)
    line = ""
    while "[PID]" not in line:
        line = worker.stdout.readline()
        assert line or worker.poll() is None
    pid = int(line.strip().split("[PID]")[1])
    worker.kill()
    worker.wait(timeout=10)
    gone, alive = psutil.wait_procs([psutil.Process(pid)], timeout=10)
    assert not alive, "the worker outlived its client"


def test_other_command_lines_and_other_environments_run_the_plain_interpreter(forkserver):
    _, env, _ = forkserver
    plain = client(["-c", "import sys; print(sys.flags.isolated, 'torch' in sys.modules)"], env)
    out, _ = plain.communicate(timeout=60)
    assert plain.returncode == 0 and out.split() == ["0", "False"]  # a fresh, non-isolated interpreter
    other = {**env, "OMP_NUM_THREADS": "2"}
    shown = client([WORKER, "--help"], other)
    out, err = shown.communicate(timeout=120)
    assert shown.returncode == 0 and "--sock-type" in out
    assert "starting a plain worker (environment differs from the fork server's in OMP_NUM_THREADS)" in err
    gone = {**env, "SERVE_FORKSERVER": "/nonexistent/f.sock"}
    shown = client([WORKER, "--help"], gone)
    out, err = shown.communicate(timeout=120)
    assert shown.returncode == 0 and "--sock-type" in out and "starting a plain worker" in err
    assert out.startswith("serve.torchserve: worker patches on"), out  # plain workers are patched too
    off = {**gone, "SERVE_FAST_WORKER": "0"}
    shown = client([WORKER, "--help"], off)
    out, err = shown.communicate(timeout=120)
    assert shown.returncode == 0 and out.startswith("usage:"), (out, err)  # TorchServe's own worker loop


def test_import_time_environment_ignores_pythonpath_and_per_worker_variables():
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": "/model", "PYTHONHASHSEED": "0", "TS_IPEX_ENABLE": "false",
           "HOME": "/root", "LD_LIBRARY_PATH": "/model"}
    assert import_time_environment(env) == {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
