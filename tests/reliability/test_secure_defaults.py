"""Secure defaults, each checked twice where it can be: in the shipped configuration (config.properties,
Dockerfile) and on a running TorchServe started from it (serve/server.py). See docs/security.md.

* token auth is on: no key, a wrong key or the other API's key is refused; the right key works;
* the model-management API (register/unregister) is off, and workflow registration (which TorchServe
  keeps even then) cannot fetch anything from outside the local model store (allowed_urls);
* every port binds 127.0.0.1 only (parsed from the config AND read from the server's listening sockets);
* max_request_size admits the largest legitimate request (1024 images as JSON) and refuses more;
  decoded images are capped (4096 px a side, checked from the header before decoding);
* the container runs as a non-root user and publishes only the inference port.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from urllib.parse import urlparse

import numpy as np
import psutil
import pytest
import requests

from handlers.decoding import MAX_IMAGE_SIDE, MAX_SAMPLES
from paths import REPO_ROOT
from serve.server import load_properties

from servers import error_message, manage, send

from .support import JSON, PNG, crafted_png, worker_processes
from dockerfile_support import runtime_stage

pytestmark = [pytest.mark.e2e]

CONFIG = REPO_ROOT / "config.properties"
AUTH_REFUSED = (400, 401)  # TorchServe 0.12 answers 400 InvalidKeyException; proxies may say 401
ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")
GRPC_KEYS = ("grpc_inference_address", "grpc_management_address")
# Longest JSON rendering of one intensity in [0, 1] that Python's json.dumps can produce, plus ", ".
WORST_VALUE = len(json.dumps(1.2345678901234567e-100)) + 2


@pytest.fixture(scope="module")
def props() -> dict[str, str]:
    return load_properties(CONFIG)


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (Java binds ``::ffff:127.0.0.1``)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def live_props(server) -> dict[str, str]:
    """The configuration the running server was started with (serve/server.py writes it)."""
    return load_properties(server.workdir / "ts-config.properties")


def java_regex(value: str) -> re.Pattern:
    """A properties-file regex (``\\\\`` is one backslash) compiled with Python's re, which agrees with
    Java's regex engine on the simple patterns allowed_urls uses; fully matched like Java's matches()."""
    return re.compile(value.replace("\\\\", "\\"))


# ------------------------------------------------------------------------------------------ token auth


def test_token_auth_is_on_in_config(props):
    assert props.get("disable_token_authorization", "false").lower() == "false"


@pytest.mark.parametrize("key,headers", [
    (None, {}),
    (None, {"Authorization": "Bearer not-the-key"}),
    (None, {"Authorization": "not-even-bearer"}),
    ("management", {}),
], ids=["no key", "wrong key", "malformed header", "management key"])
def test_inference_refuses_a_missing_or_wrong_key(server, key, headers):
    response = send(server, "POST", "/predictions/mlp", key=key, json={"data": [[0.1, 0.2]]}, headers=headers)
    assert response.status_code in AUTH_REFUSED
    assert "Token Authorization failed" in error_message(response)


def test_inference_accepts_the_inference_key(server):
    response = send(server, "POST", "/predictions/mlp", json={"data": [[0.1, 0.2]]})
    assert response.status_code == 200 and "predictions" in response.json()


@pytest.mark.parametrize("key", [None, "inference", "api"])
def test_management_refuses_other_keys(server, key):
    response = manage(server, "GET", "/models", key=key)
    assert response.status_code in AUTH_REFUSED
    assert "Token Authorization failed" in error_message(response)
    assert manage(server, "GET", "/models").status_code == 200


def test_health_check_needs_the_key_too(server):
    """/ping is behind token auth as well, so probes must send the inference key (deploy/docker/tsctl.py)."""
    assert send(server, "GET", "/ping", key=None).status_code in AUTH_REFUSED
    assert send(server, "GET", "/ping").json() == {"status": "Healthy"}


def test_key_file_is_private_to_the_server_user(server):
    """key_file.json holds every key; TorchServe writes it readable by its owner only (0600)."""
    mode = stat.S_IMODE(os.stat(server.key_file).st_mode)
    assert mode & 0o077 == 0, f"{server.key_file} has mode {mode:o}"


def test_unauthenticated_surface_is_only_api_description_and_metrics(server):
    """Without a key TorchServe answers exactly two things: its OpenAPI description (OPTIONS / or
    GET /api-description, on both APIs) and Prometheus metrics (loopback only). Everything else is refused."""
    assert send(server, "GET", "/api-description", key=None).json()["openapi"]
    assert manage(server, "OPTIONS", "/", key=None).json()["openapi"]
    assert requests.get(server.metrics_url, timeout=10).status_code == 200
    for method, path in [("GET", "/ping"), ("POST", "/predictions/mnistnet"), ("POST", "/v2/models/mnistnet/infer"),
                         ("GET", "/v2/health/ready"), ("GET", "/v2/models/mnistnet")]:
        assert send(server, method, path, key=None).status_code in AUTH_REFUSED, (method, path)
    for method, path in [("GET", "/models"), ("GET", "/models/mnistnet"), ("PUT", "/models/mnistnet?min_worker=4"),
                         ("GET", "/workflows"), ("POST", "/token?type=inference")]:
        assert manage(server, method, path, key=None).status_code in AUTH_REFUSED, (method, path)


# ------------------------------------------------------------------------------- model management API


def test_model_api_is_off_in_config(props):
    assert props["enable_model_api"] == "false"


@pytest.mark.parametrize("method,path", [
    ("POST", "/models?url=mnistnet.mar"),
    ("POST", "/models?url=https://example.com/evil.mar"),
    ("DELETE", "/models/mnistnet"),
])
def test_model_registration_and_removal_are_refused(server, method, path):
    response = manage(server, method, path)
    assert response.status_code == 405, response.text
    assert "not allowed" in error_message(response)
    assert manage(server, "GET", "/models/mnistnet").status_code == 200  # still served


def test_allowed_urls_in_config_admit_only_local_archives(props):
    pattern = java_regex(props["allowed_urls"])
    assert pattern.fullmatch("file:///app/model_store/mnistnet.mar")
    assert pattern.fullmatch(f"file://{REPO_ROOT}/model_store/mlp.mar")
    for url in ("https://example.com/model_store/x.mar", "http://169.254.169.254/latest/meta-data/",
                "s3://bucket/model_store/x.mar", "file:///etc/passwd", "file:///app/model_store/x.war",
                "file:///app/model_store/../../etc/x.mar"):
        assert not pattern.fullmatch(url), url


def test_running_server_allows_exactly_its_own_store(server):
    pattern = java_regex(live_props(server)["allowed_urls"])
    assert pattern.fullmatch(f"file://{server.model_store}/mnistnet.mar")
    assert not pattern.fullmatch("file:///tmp/somewhere-else/model_store/mnistnet.mar")
    assert not pattern.fullmatch(f"file://{server.model_store}/sub/mnistnet.mar")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/evil.war",  # ShellTorch-style SSRF / remote archive
    "http://169.254.169.254/latest/meta-data/",
    "file:///etc/passwd",
    "file:///tmp/somewhere-else/model_store/x.mar",
])
def test_workflow_registration_cannot_fetch_from_outside_the_store(server, url):
    """TorchServe 0.12 keeps POST /workflows even with enable_model_api=false; allowed_urls still
    guards it: nothing outside this server's own model store may be fetched."""
    response = manage(server, "POST", "/workflows", params={"url": url})
    assert response.status_code == 404, response.text
    assert "does not match any allowed URL(s)" in error_message(response)
    assert manage(server, "GET", "/workflows").json() == {"workflows": []}


# ------------------------------------------------------------------------------------------- bindings


def test_config_binds_every_api_to_loopback(props):
    for key in ADDRESS_KEYS:
        assert urlparse(props[key]).hostname == "127.0.0.1", f"{key}={props[key]}"
    for key in GRPC_KEYS:
        assert props[key] == "127.0.0.1", f"{key}={props.get(key)}"


def test_running_server_listens_on_loopback_only(server):
    frontend = psutil.Process(server.pid())  # OIP gRPC included: it runs in the JVM
    listening = [c for c in frontend.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    ports = {c.laddr.port for c in listening}
    print("\nlistening:", sorted((c.laddr.ip, c.laddr.port) for c in listening))
    assert set(server.ports.listening().values()) <= ports, "every API port is bound"
    assert all(is_loopback(c.laddr.ip) for c in listening), [c.laddr for c in listening]
    # Workers talk to the frontend over unix sockets: no TCP listener at all.
    for worker in worker_processes(server):
        assert not [c for c in worker.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


# ----------------------------------------------------------------------------------------- size caps


def test_max_request_size_fits_1024_images_as_json(props):
    """Largest legitimate request: MAX_SAMPLES images of 784 values, each at its longest JSON form."""
    worst = MAX_SAMPLES * 784 * WORST_VALUE + 64 * MAX_SAMPLES  # values + brackets/keys slack
    assert worst <= int(props["max_request_size"]) <= 4 * worst, (worst, props["max_request_size"])


def test_largest_legitimate_batch_is_served(server):
    """1024 full-precision random intensities per image, as 28x28 lists: accepted, 1024 answers,
    response well under max_response_size."""
    images = np.random.default_rng(0).random((MAX_SAMPLES, 28, 28))
    body = json.dumps({"data": images.tolist()}).encode()
    limits = live_props(server)
    assert len(body) <= int(limits["max_request_size"])
    response = send(server, "POST", "/predictions/mnistnet", data=body, headers=JSON, timeout=120)
    assert response.status_code == 200
    assert len(response.json()) == MAX_SAMPLES
    assert len(response.content) < int(limits["max_response_size"])
    print(f"\n1024 images: request {len(body) / 1e6:.1f} MB, response {len(response.content) / 1e6:.2f} MB")


def test_one_byte_over_max_request_size_is_refused(server):
    limit = int(live_props(server)["max_request_size"])
    response = send(server, "POST", "/predictions/mlp", data=b" " * (limit + 1), headers=JSON, timeout=120)
    assert response.status_code == 413


@pytest.mark.parametrize("width,height", [(MAX_IMAGE_SIDE + 1, 1), (1, MAX_IMAGE_SIDE + 1), (65_535, 65_535)])
def test_decoded_image_size_is_capped(server, width, height):
    """Refused from the PNG header alone: a few rows of data are enough to ask for a huge image."""
    body = crafted_png(width, height, rows=min(height, 4))
    response = send(server, "POST", "/predictions/mnistnet", data=body, headers=PNG)
    assert response.status_code == 413
    message = error_message(response)
    assert f"{width}x{height}" in message or "decompression bomb" in message, message


def test_image_at_the_cap_is_decoded(server):
    """A 4096x4096 PNG (16 kB of black) is the largest accepted; it decodes to a 28x28 input."""
    response = send(server, "POST", "/predictions/mnistnet", data=crafted_png(MAX_IMAGE_SIDE, MAX_IMAGE_SIDE),
                    headers=PNG, timeout=120)
    assert response.status_code == 200 and len(response.json()["probabilities"]) == 10


def test_queue_and_timeouts_are_bounded(props):
    assert 0 < int(props["job_queue_size"]) <= 10_000
    assert 0 < int(props["default_response_timeout"]) <= 600
    assert "-Xmx" in props["vmargs"]


# ------------------------------------------------------------------------------------------ container


def test_container_runs_as_non_root():
    users = [args for ins, args in runtime_stage() if ins == "USER"]
    assert users, "the runtime stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000), users[-1]


def test_container_publishes_only_the_inference_ports():
    """REST (native, KServe v1, OIP) on 8080 and OIP gRPC on 7070; management and metrics stay inside."""
    exposed = [port for ins, args in runtime_stage() if ins == "EXPOSE" for port in args.split()]
    assert exposed == ["8080", "7070"]
    env = " ".join(args for ins, args in runtime_stage() if ins == "ENV")
    assert "TS_MANAGEMENT_ADDRESS=http://127.0.0.1:" in env and "TS_METRICS_ADDRESS=http://127.0.0.1:" in env


def test_container_keeps_auth_on_and_model_api_off():
    """The image's config is config.properties (plus enable_envvars_config); nothing re-enables the
    model API or disables token auth through the environment."""
    stage = runtime_stage()
    assert any(ins == "COPY" and args.startswith("config.properties ") for ins, args in stage)
    env = " ".join(args for ins, args in stage if ins == "ENV").upper()
    assert "TS_ENABLE_MODEL_API" not in env and "TS_DISABLE_TOKEN_AUTHORIZATION" not in env
    assert "TS_ALLOWED_URLS" not in env
