"""The KServe cluster path, replayed locally: storage from make_storage.py, the predictor container of
deploy/kserve/servingruntime.yaml (merged with each InferenceService) started exactly as its spec says,
then the requests KServe forwards to the predictor port unchanged: KServe v1 ``:predict`` and OIP v2
REST for every model, binary tensors (tritonclient.http), OIP gRPC (tritonclient.grpc), bad inputs,
readiness/metadata, the probes, the auth setting, metrics, and SIGTERM. See tests/kserve/kserve_replay.py
for what is mapped (image paths, ports) and what is not (everything else).

ONE pod serves every test: the three InferenceServices give the same container except for the port
KServe routes to (checked first), so each protocol's requests go to its InferenceService's port.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

import kserve_replay as kr
from models.registry import REGISTRY, get_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODELS = list(REGISTRY)
ROWS = 3  # instances/rows per request: batches, not single samples
TOLERANCE = 1e-5
# The pod's management port (TS_MANAGEMENT_ADDRESS, loopback): the tests' view of the workers.
MANAGEMENT_PORT = 8081
NOT_503 = "503 means the server could not serve at all; a bad request must be a 4xx"


# ------------------------------------------------------------------------------- manifests only


def test_the_three_inference_services_run_the_same_container():
    containers = {p: kr.predictor_container(kr.inference_service(p)) for p in ("v1", "v2", "grpc-v2")}
    without_ports = [{k: v for k, v in c.items() if k != "ports"} for c in containers.values()]
    assert without_ports[0] == without_ports[1] == without_ports[2], "one replayed pod must stand for all three"
    ports = {p: [port["containerPort"] for port in kr.serving_ports(c)] for p, c in containers.items()}
    assert ports["v1"] == ports["v2"] == [kr.KSERVE_DEFAULT_PORT]
    (grpc_port,) = kr.serving_ports(containers["grpc-v2"])
    assert grpc_port["name"] == "h2c", "Knative routes gRPC (HTTP/2 cleartext) only to a port named h2c"
    runtime = kr.runtime()
    assert set(runtime["spec"]["protocolVersions"]) == {"v1", "v2", "grpc-v2"}


# ------------------------------------------------------------------------------------ the pod


def _archives(weights_dir: Path, out: Path) -> Path:
    from serve.package import package_models

    package_models(MODELS, weights_dir, out)
    return out


def _read_only(path: Path, writable: bool = False) -> None:
    for item in [path, *path.rglob("*")]:
        mode = item.stat().st_mode
        item.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def storage(tmp_path_factory, weights_dir):
    """/mnt/models: make_storage.py's layout of freshly built archives, read-only like the volume
    KServe's storage-initializer fills. Yields (storage dir, archive dir, agent jar)."""
    from serve.torchserve import agent as oip_agent

    make_storage = kr.load_make_storage()
    root = tmp_path_factory.mktemp("kserve")
    store = _archives(weights_dir, root / "archives")
    mount = root / "mnt-models"
    make_storage.build_storage(mount, store)
    _read_only(mount)
    try:
        jar = oip_agent.agent_jar()
    except oip_agent.AgentBuildError as err:
        pytest.fail(f"the image's OIP agent jar cannot be built here: {err}")
    yield mount, store, jar
    _read_only(mount, writable=True)


def launch(storage, protocol: str = "v1") -> kr.Pod:
    """Start the predictor container of ``protocol``'s InferenceService on ``storage`` and wait until its
    readiness probe passes; records the workers' states at that moment in ``pod.states_at_ready``."""
    import tempfile

    mount, store, jar = storage
    outputs = {
        ("deps", "/opt/venv"): Path(sys.prefix),
        ("oip", "/out/jre"): Path(os.path.realpath(shutil.which("java"))).parents[1],  # the JDK's java home
        ("builder", "/src/model_store/*.mar"): store / "*.mar",
        ("oip", "/out/oip-agent.jar"): jar,
    }
    # Short root: TorchServe's worker sockets live in $TMPDIR and unix socket paths have 107 bytes.
    short = Path(tempfile.mkdtemp(prefix="ksr-", dir="/tmp"))
    replay = kr.prepare_pod(kr.predictor_container(kr.inference_service(protocol)), kr.build_layout(short, mount, outputs))
    replay.start()
    try:
        replay.wait_ready(timeout=420)
        replay.states_at_ready = replay.workers_ready(MANAGEMENT_PORT)
    except BaseException:
        shutdown(replay, mount.parent)
        raise
    return replay


def shutdown(replay: kr.Pod, keep_log_in: Path) -> None:
    """Stop (SIGTERM, then SIGKILL of the group), keep the container log, remove the short root."""
    replay.terminate(grace=90)
    replay.kill()
    log = keep_log_in / f"container-{replay.layout.root.name}.log"
    if replay.log.exists():
        shutil.copy2(replay.log, log)
    shutil.rmtree(replay.layout.root, ignore_errors=True)
    print(f"container log: {log}")


@pytest.fixture(scope="module")
def pod(storage):
    """The replayed predictor container, READY, for every test of this module; stopped at the end."""
    replay = launch(storage)
    try:
        # Wait until every worker really is READY, so that an early readiness probe (its own test)
        # does not fail every other test.
        deadline = time.monotonic() + 300
        while any(state != "READY" for state in replay.workers_ready(MANAGEMENT_PORT).values()):
            assert time.monotonic() < deadline, f"workers never READY:\n{replay.log_tail()}"
            time.sleep(1)
        yield replay
    finally:
        shutdown(replay, storage[0].parent)


def _port(protocol: str) -> int:
    """The container port KServe routes ``protocol``'s InferenceService to."""
    return kr.serving_ports(kr.predictor_container(kr.inference_service(protocol)))[0]["containerPort"]


def _post(pod, protocol: str, path: str, **kwargs) -> requests.Response:
    return requests.post(pod.url(_port(protocol), path), timeout=60, **kwargs)


# ----------------------------------------------------------------------------- inputs/reference


@pytest.fixture(scope="module")
def samples():
    """model → (JSON-able inputs of ROWS samples as the client sends them, float32 model input)."""
    from train.data import mnist_arrays, normalize_images

    images, _ = mnist_arrays("test")
    rng = np.random.default_rng(0)
    result = {}
    for name in MODELS:
        spec = get_spec(name)
        if spec.is_image_model:
            pixels = images[:ROWS]
            sent = (pixels.astype(np.float32) / 255.0).reshape(ROWS, -1)
            result[name] = (sent, normalize_images(pixels).numpy().reshape(ROWS, *spec.input_shape))
        else:
            rows = rng.uniform(-1.5, 1.5, size=(ROWS, spec.input_width)).astype(np.float32)
            result[name] = (rows, rows.reshape(ROWS, *spec.input_shape))
    return result


@pytest.fixture(scope="module")
def reference(weights_dir):
    """model, float32 input → dict of the expected named outputs (the OIP names)."""
    nets = {}

    def run(name: str, x: np.ndarray) -> dict[str, np.ndarray]:
        spec = get_spec(name)
        if name not in nets:
            net = spec.build()
            net.load_state_dict(torch.load(weights_dir / f"{name}.pt", weights_only=True))
            nets[name] = net.eval()
        with torch.no_grad():
            out = nets[name](torch.as_tensor(x))
        if spec.task == "classification":
            probs = torch.softmax(out, dim=1).numpy()
            return {"probabilities": probs, "predicted_class": probs.argmax(axis=1)}
        values = out.reshape(len(out)).numpy()
        if spec.task == "binary":
            return {"probabilities": values, "predicted_class": (values >= 0.5).astype(np.int64)}
        return {"predictions": values}

    return run


def _check_outputs(name: str, got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected), f"{name}: outputs {sorted(got)} != {sorted(expected)}"
    for key, want in expected.items():
        have = np.asarray(got[key]).reshape(want.shape)
        if want.dtype.kind == "f":
            np.testing.assert_allclose(have, want, atol=TOLERANCE, err_msg=f"{name}.{key}")
        else:
            np.testing.assert_array_equal(have, want, err_msg=f"{name}.{key}")


# ------------------------------------------------------------------------------ probes, auth, metrics


def test_readiness_probe_means_every_model_ready(pod):
    """The probe passed only once every model had its READY workers (the management API's view)."""
    assert set(pod.states_at_ready) == set(MODELS), pod.states_at_ready
    assert all(state == "READY" for state in pod.states_at_ready.values()), (
        f"the readiness probe passed while workers were still starting: {pod.states_at_ready}")
    passed, detail = pod.probe("readinessProbe")
    assert passed, detail
    for name in MODELS:
        response = requests.get(pod.url(_port("v2"), f"/v2/models/{name}/ready"), timeout=10)
        assert response.status_code == 200, f"{name}: {response.status_code} {response.text}"


def test_liveness_probe_passes(pod):
    passed, detail = pod.probe("livenessProbe")
    assert passed, detail
    assert "OIP gRPC listens" in detail, detail


def test_served_config_has_token_auth_off_and_mesh_auth_documented(pod):
    """The cluster's auth setting: TorchServe's token auth off (no key file, no key needed); the requests
    of every other test here carry no Authorization header. Mesh auth: deploy/kserve/auth-istio.yaml."""
    assert not (pod.layout.workdir / "key_file.json").exists(), "token auth is on: replicas would disagree on keys"
    response = requests.get(pod.url(_port("v2"), "/v2/health/ready"), timeout=10)
    assert response.status_code == 200, response.text
    assert pod.env["TS_DISABLE_TOKEN_AUTHORIZATION"] == "true"


def test_metrics_port_of_the_prometheus_annotation_answers(pod):
    port = int(kr.runtime()["spec"]["annotations"]["prometheus.kserve.io/port"])
    path = kr.runtime()["spec"]["annotations"]["prometheus.kserve.io/path"]
    response = requests.get(pod.url(port, path), timeout=10)
    assert response.status_code == 200 and "ts_inference_requests_total" in response.text


# -------------------------------------------------------------------------------------- KServe v1


@pytest.mark.parametrize("name", MODELS)
def test_v1_predict_every_model(pod, samples, reference, name):
    sent, model_input = samples[name]
    response = _post(pod, "v1", f"/v1/models/{name}:predict", json={"instances": sent.tolist()})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == ROWS, predictions
    expected = reference(name, model_input)
    if len(expected) == 1:  # one output: the prediction is that value
        (key,) = expected
        got = {key: np.array(predictions, dtype=np.float32)}
    else:
        got = {key: np.array([p[key] for p in predictions]) for key in expected}
    _check_outputs(name, got, expected)


def test_v1_instance_as_a_28x28_image(pod, samples, reference):
    sent, model_input = samples["mnistnet"]
    response = _post(pod, "v1", "/v1/models/mnistnet:predict", json={"instances": sent.reshape(ROWS, 28, 28).tolist()})
    assert response.status_code == 200, response.text
    classes = [p["predicted_class"] for p in response.json()["predictions"]]
    assert classes == reference("mnistnet", model_input)["predicted_class"].tolist()


def test_v1_concurrent_requests_each_get_their_own_predictions(pod, reference):
    """Dynamic batching (batchSize 8, the registry's) joins concurrent requests into one worker batch;
    each request must still get exactly its own predictions (the stock envelopes answered only the first)."""
    from concurrent.futures import ThreadPoolExecutor

    from train.data import mnist_arrays, normalize_images

    images, _ = mnist_arrays("test")
    chunks = [images[20 + 2 * i: 22 + 2 * i] for i in range(16)]

    def send(pixels):
        body = {"instances": (pixels.astype(np.float32) / 255.0).reshape(len(pixels), -1).tolist()}
        return _post(pod, "v1", "/v1/models/feedforwardnet:predict", json=body)

    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(send, chunks))
    for pixels, response in zip(chunks, responses):
        assert response.status_code == 200, response.text
        classes = [p["predicted_class"] for p in response.json()["predictions"]]
        expected = reference("feedforwardnet", normalize_images(pixels).numpy().reshape(len(pixels), -1))
        assert classes == expected["predicted_class"].tolist()


# ---------------------------------------------------------------------------------- OIP v2 REST


def _v2_body(sent: np.ndarray) -> dict:
    return {"id": "replay-1", "inputs": [{"name": "input", "shape": list(sent.shape), "datatype": "FP32",
                                          "data": sent.ravel().tolist()}]}


@pytest.mark.parametrize("name", MODELS)
def test_v2_infer_every_model(pod, samples, reference, name):
    sent, model_input = samples[name]
    spec = get_spec(name)
    for path in (f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/{spec.version}/infer"):
        response = _post(pod, "v2", path, json=_v2_body(sent))
        assert response.status_code == 200, f"{path}: {response.text}"
        body = response.json()
        assert body["model_name"] == name and body["id"] == "replay-1"
        got = {}
        for output in body["outputs"]:
            assert output["shape"][0] == ROWS, output
            got[output["name"]] = np.array(output["data"])
        _check_outputs(name, got, reference(name, model_input))


@pytest.mark.parametrize("name", MODELS)
def test_v2_model_metadata_every_model(pod, name):
    response = requests.get(pod.url(_port("v2"), f"/v2/models/{name}"), timeout=10)
    assert response.status_code == 200, response.text
    metadata = response.json()
    expected = get_spec(name).oip_metadata()
    assert metadata["name"] == name
    assert metadata["inputs"] == expected["inputs"] and metadata["outputs"] == expected["outputs"]


def test_v2_server_metadata_and_health(pod):
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert requests.get(pod.url(_port("v2"), path), timeout=10).status_code == 200, path
    server = requests.get(pod.url(_port("v2"), "/v2"), timeout=10).json()
    assert "binary_tensor_data" in server.get("extensions", []), server


def test_tritonclient_http_binary_tensors(pod, samples, reference):
    import tritonclient.http as httpclient

    sent, model_input = samples["deepnet"]
    client = httpclient.InferenceServerClient(pod.address(_port("v2")))
    try:
        assert client.is_server_ready() and client.is_model_ready("deepnet")
        tensor = httpclient.InferInput("input", list(sent.shape), "FP32")
        tensor.set_data_from_numpy(sent, binary_data=True)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("probabilities", "predicted_class")]
        result = client.infer("deepnet", [tensor], outputs=outputs)
        got = {n: result.as_numpy(n) for n in ("probabilities", "predicted_class")}
    finally:
        client.close()
    _check_outputs("deepnet", got, reference("deepnet", model_input))


# ------------------------------------------------------------------------------------ bad inputs


BAD_REQUESTS = [
    # (protocol, path, body, expected status, words the message must contain)
    ("v1", "/v1/models/mnistnet:predict", {"instances": "not a list"}, 400, "instances"),
    ("v1", "/v1/models/mnistnet:predict", {"instances": []}, 400, "instances"),
    ("v1", "/v1/models/mnistnet:predict", {"instances": [[0.5] * 783]}, 400, "instances[0]"),
    ("v1", "/v1/models/mlp:predict", {"instances": [[1.0, 2.0], [1.0]]}, 400, "instances[1]"),
    ("v1", "/v1/models/regressionnet:predict", {"instances": [["a"] * 10]}, 400, "instances[0]"),
    ("v1", "/v1/models/nosuchmodel:predict", {"instances": [[1.0]]}, 404, "nosuchmodel"),
    ("v2", "/v2/models/mnistnet/infer", {"inputs": [{"name": "input", "shape": [2, 783], "datatype": "FP32",
                                                        "data": [0.0] * 1566}]}, 400, "shape"),
    ("v2", "/v2/models/mlp/infer", {"inputs": [{"name": "input", "shape": [2, 2], "datatype": "FP32",
                                                   "data": [1.0, 2.0, 3.0]}]}, 400, "data"),
    ("v2", "/v2/models/mlp/infer", {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "BYTES",
                                                   "data": ["a", "b"]}]}, 400, "BYTES"),
    ("v2", "/v2/models/mlp/infer", {"data": [[1.0, 2.0]]}, 400, "inputs"),
    ("v2", "/v2/models/nosuchmodel/infer", {"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32",
                                                           "data": [1.0]}]}, 404, "nosuchmodel"),
]


@pytest.mark.parametrize("protocol,path,body,status,words", BAD_REQUESTS,
                         ids=[f"{p}:{path.split('/')[3]}:{i}" for i, (p, path, *_) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_a_clear_4xx(pod, protocol, path, body, status, words):
    response = _post(pod, protocol, path, json=body)
    assert response.status_code != 503, f"{NOT_503}: {response.text}"
    assert response.status_code == status, response.text
    error = response.json()
    assert words.lower() in error["error"].lower(), error


def test_a_body_that_is_not_json_gets_a_4xx(pod):
    for protocol, path in (("v1", "/v1/models/mnistnet:predict"), ("v2", "/v2/models/mnistnet/infer")):
        response = _post(pod, protocol, path, data=b"{not json", headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, f"{path}: {response.status_code} {response.text}"
        assert "error" in response.json()


# ------------------------------------------------------------------------------------------ gRPC


@pytest.fixture(scope="module")
def grpc_client(pod):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(pod.address(_port("grpc-v2")))
    yield client
    client.close()


@pytest.mark.parametrize("name", MODELS)
def test_grpc_infer_every_model(grpc_client, samples, reference, name):
    import tritonclient.grpc as grpcclient

    sent, model_input = samples[name]
    assert grpc_client.is_model_ready(name)
    metadata = grpc_client.get_model_metadata(name, as_json=True)
    assert metadata["name"] == name
    tensor = grpcclient.InferInput("input", list(sent.shape), "FP32")
    tensor.set_data_from_numpy(sent)
    result = grpc_client.infer(name, [tensor])
    expected = reference(name, model_input)
    _check_outputs(name, {n: result.as_numpy(n) for n in expected}, expected)


def test_grpc_server_ready_and_bad_input(grpc_client):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    tensor = grpcclient.InferInput("input", [2, 783], "FP32")
    tensor.set_data_from_numpy(np.zeros((2, 783), dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer("mnistnet", [tensor])
    assert "INVALID_ARGUMENT" in str(info.value.status()) and "shape" in info.value.message().lower(), info.value


# -------------------------------------------------------------------------------------- shutdown


def test_sigterm_stops_both_servers_cleanly(pod):
    """Last: the kubelet's SIGTERM on pod deletion. Exit 0 within the grace period, nothing left over."""
    grpc_port = pod.ports[_port("grpc-v2")]
    code = pod.terminate(grace=90)
    assert code == 0, f"exit code {code}:\n{pod.log_tail()}"
    assert pod.leftover_java() == []
    assert kr.port_is_closed(grpc_port) and kr.port_is_closed(pod.ports[_port("v2")])
    assert "servers stopped (status 0)" in pod.log_tail(), pod.log_tail()
