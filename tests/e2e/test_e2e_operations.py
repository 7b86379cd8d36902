"""Operations surface of the running service: management API, Prometheus metrics, token auth, the
model-management API being off, and key rotation as seen by the client."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from client.api import TorchServeClient, TorchServeError
from servers import clean_env, post
from models.registry import REGISTRY, get_spec
from serve.package import RESPONSE_TIMEOUT_S

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_health(client):
    assert client.health() == {"status": "Healthy"}


def test_list_models_shows_every_registered_model(client):
    listed = {model["modelName"]: model["modelUrl"] for model in client.list_models()}
    assert listed == {name: f"{name}.mar" for name in REGISTRY}


@pytest.mark.parametrize("model", list(REGISTRY))
def test_describe_reports_archive_settings_and_ready_workers(client, model):
    spec = get_spec(model)
    (description,) = client.describe(model)
    assert description["modelName"] == model
    assert description["modelVersion"] == spec.version
    # These come from the model-config.yaml that serve/package.py wrote into the archive.
    assert description["batchSize"] == spec.batch_size
    assert description["maxBatchDelay"] == spec.max_batch_delay_ms
    assert description["responseTimeout"] == RESPONSE_TIMEOUT_S
    assert description["minWorkers"] == description["maxWorkers"] == spec.workers
    assert [worker["status"] for worker in description["workers"]] == ["READY"] * spec.workers
    # The versioned describe URL answers the same version.
    assert client.describe(model, spec.version)[0]["modelVersion"] == spec.version


def test_prometheus_metrics_count_inference_requests(server, client):
    client.predict("linearregression", [1.0])
    client.predict("mnistnet", [0.0] * 784)
    response = requests.get(server.metrics_url, timeout=10)
    assert response.status_code == 200
    lines = response.text.splitlines()
    assert any(line.startswith("# TYPE ts_inference_requests_total counter") for line in lines)
    counted = {
        model: float(line.rsplit(" ", 1)[1])
        for line in lines
        for model in ("linearregression", "mnistnet")
        if line.startswith("ts_inference_requests_total{") and f'model_name="{model}"' in line
        and 'model_version="default"' in line
    }
    assert counted["linearregression"] >= 1 and counted["mnistnet"] >= 1


def test_inference_needs_the_inference_key(server):
    payload = {"data": [[0.5, 0.5]]}
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Bearer {server.keys()['management']}"}):
        response = requests.post(f"{server.inference_url}/predictions/mlp", json=payload, headers=headers, timeout=10)
        assert response.status_code in (400, 401), headers
        assert "Token Authorization failed" in response.json()["message"]
    assert post(server, "/predictions/mlp", json=payload).status_code == 200


def test_management_needs_the_management_key(server):
    url = f"{server.management_url}/models"
    assert requests.get(url, timeout=10).status_code in (400, 401)
    inference_key = {"Authorization": f"Bearer {server.keys()['inference']}"}
    assert requests.get(url, headers=inference_key, timeout=10).status_code in (400, 401)
    management_key = {"Authorization": f"Bearer {server.keys()['management']}"}
    assert requests.get(url, headers=management_key, timeout=10).status_code == 200


def test_model_registration_api_is_off(server):
    """enable_model_api=false: registering or unregistering models is refused with 405."""
    headers = {"Authorization": f"Bearer {server.keys()['management']}"}
    register = requests.post(f"{server.management_url}/models", params={"url": "mnistnet.mar"}, headers=headers, timeout=10)
    assert register.status_code == 405
    unregister = requests.delete(f"{server.management_url}/models/mnistnet", headers=headers, timeout=10)
    assert unregister.status_code == 405
    assert server.describe("mnistnet")["workers"][0]["status"] == "READY"


def test_client_follows_a_rotated_inference_key(server):
    """After the inference key is rotated (API key → POST /token), a client that read the old key from
    key_file.json re-reads it and carries on; a client given an explicit old key is refused."""
    client = TorchServeClient(server.inference_url, server.management_url, key_file=server.key_file)
    assert client.predict("linearregression", [0.0])["predictions"]
    old_key = server.keys()["inference"]
    rotated = requests.post(
        f"{server.management_url}/token", params={"type": "inference"},
        headers={"Authorization": f"Bearer {server.keys()['api']}"}, timeout=10,
    )
    assert rotated.status_code == 200
    assert server.keys()["inference"] != old_key
    assert client.predict("linearregression", [0.0])["predictions"]
    stale = TorchServeClient(server.inference_url, server.management_url, token=old_key)
    with pytest.raises(TorchServeError) as refused:
        stale.predict("linearregression", [0.0])
    assert refused.value.status in (400, 401)
    assert "Token Authorization failed" in refused.value.message


def _jvm_threads_started(pid: int) -> int:
    """The frontend JVM's count of threads started since it began (HotSpot counter ``java.threads.started``).

    Read with ``jstat -snap`` from the JVM's performance-data file (/tmp/hsperfdata_<user>/<pid>), which needs
    no attach to the JVM (``jcmd`` does, and its attach can time out on a loaded machine). The JDK that
    TorchServe and the OIP agent need ships jstat, so a missing counter is a failure, not a skip.
    """
    jstat = Path(shutil.which("java") or "java").resolve().parent / "jstat"
    assert jstat.exists(), f"no jstat beside {jstat.parent}/java: the JDK (openjdk-17-jdk-headless) is required"
    done = subprocess.run([str(jstat), "-J-Djstat.showUnsupported=true", "-snap", str(pid)], capture_output=True,
                          text=True, timeout=60, env=clean_env())
    counts = [line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("java.threads.started=")]
    assert counts, f"jstat could not read the JVM's counters: {(done.stdout + done.stderr).strip()[:300]}"
    return int(counts[0])


def test_frontend_starts_no_thread_per_batch(server, client):
    """TorchServe sends each batch to its worker with CompletableFuture.runAsync, which on a JVM with <= 2 cores
    starts a thread per call unless the common pool is sized (config.properties vmargs)."""
    client.predict("mnistnet", [0.0] * 784)
    before = _jvm_threads_started(server.pid())
    for _ in range(100):  # one at a time: 100 batches
        client.predict("mnistnet", [0.0] * 784)
    assert _jvm_threads_started(server.pid()) - before < 10
