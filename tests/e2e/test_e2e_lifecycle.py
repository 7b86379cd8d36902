"""The operator's path through the real CLIs: ``python -m serve start/status/stop`` and ``python -m client``
against a second, one-model TorchServe with its own config, ports, working directory and logs."""
from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from paths import REPO_ROOT
from serve.package import package_models
from serve.server import DEFAULT_CONFIG, Ports, effective_config, load_properties, read_keys, write_properties
from servers import clean_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def run(*args: str, env: dict | None = None, timeout: float = 360) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` from the repository root and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
        env=clean_env(**(env or {})),
    )


@pytest.fixture
def one_model_setup(tmp_path, weights_dir):
    """A config with free ports whose model store holds only linearregression.mar."""
    store = tmp_path / "store"
    package_models(["linearregression"], weights_dir, store)
    ports = Ports.free()
    config = tmp_path / "config.properties"
    write_properties(effective_config(load_properties(DEFAULT_CONFIG), ports, store), config, "e2e lifecycle test")
    common = ["--config", str(config), "--workdir", str(tmp_path / "work"), "--log-dir", str(tmp_path / "logs")]
    yield tmp_path, ports, common
    run("serve", *common, "stop")  # in case the test failed half-way


def test_serve_cli_start_status_client_stop(one_model_setup):
    tmp_path, ports, common = one_model_setup
    workdir = tmp_path / "work"

    started = run("serve", *common, "start", "--models", "linearregression", "--timeout", "240")
    assert started.returncode == 0, started.stdout + started.stderr
    keys = read_keys(workdir)
    assert set(keys) == {"inference", "management", "api"}
    assert f"http://127.0.0.1:{ports.inference}/predictions/" in started.stdout
    assert keys["inference"] in started.stdout and str(workdir / "key_file.json") in started.stdout
    pid = int((workdir / "tmp" / ".model_server.pid").read_text())
    assert psutil.pid_exists(pid)

    status = run("serve", *common, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "linearregression" in status.stdout and "READY" in status.stdout

    key_env = {"TS_KEY_FILE": str(workdir / "key_file.json")}
    urls = ["--url", f"http://127.0.0.1:{ports.inference}", "--management-url", f"http://127.0.0.1:{ports.management}"]
    predicted = run("client", *urls, "predict", "linearregression", "--data", "[1.0, 2.0]", env=key_env)
    assert predicted.returncode == 0, predicted.stderr
    assert len(json.loads(predicted.stdout)["predictions"]) == 2
    refused = run("client", *urls, "predict", "linearregression", "--data", '"text"', env=key_env)
    assert refused.returncode == 1 and refused.stderr.startswith("error 400:")
    listed = run("client", *urls, "models", env=key_env)
    assert listed.returncode == 0 and listed.stdout.split() == ["linearregression", "linearregression.mar"]

    again = run("serve", *common, "start", "--models", "linearregression")
    assert again.returncode == 1 and "already running" in again.stderr

    stopped = run("serve", *common, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (workdir / "key_file.json").exists()
    assert run("serve", *common, "status").returncode == 3
    assert "not running" in run("serve", *common, "stop").stdout


def test_serve_cli_refuses_to_start_without_archives(one_model_setup):
    _, _, common = one_model_setup
    result = run("serve", *common, "start", "--models", "mnistnet,linearregression")
    assert result.returncode == 1
    assert "no archive for mnistnet" in result.stderr and "python -m serve.package" in result.stderr
