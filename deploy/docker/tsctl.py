"""In-container helper for the TorchServe image; standard library only, so it starts in milliseconds.

    python3 /app/docker/tsctl.py health
        Exit 0 when TorchServe answers and every expected model has at least ``minWorkers`` (and at
        least one) worker READY; else print why and exit 1. Used by the image's HEALTHCHECK and by
        the Kubernetes readiness probe (an exec probe: the management API listens on 127.0.0.1 only
        and, with token auth on, needs a key that only the container can read).
        Expected models: every ``*.mar`` in the model store (``/app/model_store``), or the
        comma-separated names in env ``HEALTHCHECK_MODELS``.

    python3 /app/docker/tsctl.py live
        Exit 0 when both servers of the container answer: TorchServe's inference port answers
        ``GET /v2/health/live`` (any answer but a 5xx: with token auth on and no valid key the frontend
        still answers), and the OIP gRPC port (in TorchServe's JVM; env ``OIP_GRPC_LISTEN``, default ``0.0.0.0:7070``;
        empty or ``off``: not checked) accepts a TCP connection. Cheap: no management call, no worker
        check. The KServe runtime's liveness probe (deploy/kserve/servingruntime.yaml): an exec probe
        works whichever single port Knative routes to (HTTP 8080 or gRPC 7070).

    python3 /app/docker/tsctl.py key [inference|management|api]     (default: inference)
        Print a key from ``key_file.json``. An expired inference/management key (they live
        ``token_expiration_min`` minutes) is renewed first through the management API's
        ``/token?type=...`` call with the API key, which also rewrites ``key_file.json``.

Addresses come from the same environment variables TorchServe reads (``TS_INFERENCE_ADDRESS``,
default ``http://0.0.0.0:8080``; ``TS_MANAGEMENT_ADDRESS``, default ``http://127.0.0.1:8081``); a
wildcard host is reached through 127.0.0.1. The key file is ``$TS_WORKDIR/key_file.json``
(default ``/home/model-server/key_file.json``). No key file means token auth is off.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

TIMEOUT_S = 3.0
DEFAULT_INFERENCE = "http://0.0.0.0:8080"
DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"
DEFAULT_WORKDIR = "/home/model-server"
DEFAULT_MODEL_STORE = "/app/model_store"
DEFAULT_OIP_GRPC = "0.0.0.0:7070"
KEY_SECTIONS = {"inference": "inference", "management": "management", "api": "API"}


class ServerError(RuntimeError):
    """TorchServe did not answer as expected; the message says what happened."""


def local_url(address: str) -> str:
    """``address`` with a wildcard host (0.0.0.0, [::]) replaced by 127.0.0.1, no trailing slash."""
    parts = urllib.parse.urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) address: {address!r} (expected e.g. http://127.0.0.1:8081)")
    host = "127.0.0.1" if parts.hostname in ("0.0.0.0", "::") else parts.hostname
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def key_file() -> Path:
    return Path(os.environ.get("TS_WORKDIR", DEFAULT_WORKDIR)) / "key_file.json"


def read_key(kind: str) -> str | None:
    """The ``kind`` key (inference, management or api) from key_file.json; None when there is no file."""
    path = key_file()
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    try:
        return data[KEY_SECTIONS[kind]]["key"]
    except KeyError:
        raise ServerError(f"{path} has no {KEY_SECTIONS[kind]!r} key; its sections: {sorted(data)}") from None


def request(url: str, key: str | None) -> tuple[int, bytes]:
    """GET ``url`` (with a bearer ``key`` if given); returns (status, body). Connection errors raise."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError) as err:
        raise ServerError(f"no answer from {url}: {getattr(err, 'reason', err)}") from None


def renew_key(kind: str) -> str:
    """Ask TorchServe for a new ``kind`` key (inference or management); returns it from key_file.json."""
    api_key = read_key("api")
    management = local_url(os.environ.get("TS_MANAGEMENT_ADDRESS", DEFAULT_MANAGEMENT))
    status, body = request(f"{management}/token?type={kind}", api_key)
    if status != 200:
        raise ServerError(f"renewing the {kind} key failed: HTTP {status} {body[:200]!r}")
    return read_key(kind)


def valid_key(kind: str) -> str | None:
    """A working ``kind`` key, renewed first if TorchServe rejects the current one (400)."""
    key = read_key(kind)
    if key is None or kind == "api":
        return key
    if kind == "inference":
        url = local_url(os.environ.get("TS_INFERENCE_ADDRESS", DEFAULT_INFERENCE)) + "/ping"
    else:
        url = local_url(os.environ.get("TS_MANAGEMENT_ADDRESS", DEFAULT_MANAGEMENT)) + "/models?limit=1"
    status, _ = request(url, key)
    return renew_key(kind) if status == 400 else key


def management_json(path: str, key: str | None):
    """GET a management API path and decode its JSON body; non-200 raises ServerError."""
    url = local_url(os.environ.get("TS_MANAGEMENT_ADDRESS", DEFAULT_MANAGEMENT)) + path
    status, body = request(url, key)
    if status != 200:
        raise ServerError(f"GET {path}: HTTP {status} {body[:200]!r}")
    return json.loads(body)


def expected_models() -> list[str]:
    """Names from env HEALTHCHECK_MODELS, else the models of the archives in the model store (a versioned
    archive, ``<name>-v<V>.mar``, is another version of ``<name>``: its manifest says so)."""
    names = os.environ.get("HEALTHCHECK_MODELS", "").strip()
    if names:
        return [n.strip() for n in names.split(",") if n.strip()]
    store = Path(os.environ.get("TS_MODEL_STORE_DIR", DEFAULT_MODEL_STORE))
    archives = sorted({archive_model(p) for p in store.glob("*.mar")})
    if not archives:
        raise ServerError(f"no *.mar archives in {store} and HEALTHCHECK_MODELS is not set")
    return archives


def archive_model(path: Path) -> str:
    """The model name in an archive's ``MAR-INF/MANIFEST.json`` (the file's stem when it cannot be read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["modelName"]
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile):
        return path.stem


def health() -> str:
    """One-line summary when every expected model is ready; raises ServerError naming what is not."""
    key = valid_key("management")
    registered = {m["modelName"] for m in management_json("/models?limit=1000", key).get("models", [])}
    expected = expected_models()
    missing = [name for name in expected if name not in registered]
    if missing:
        raise ServerError(f"not registered (yet): {', '.join(missing)}")
    not_ready, ready_workers = [], 0
    for name in expected:
        versions = management_json(f"/models/{urllib.parse.quote(name)}", key)
        for version in versions:
            ready = sum(1 for w in version.get("workers", []) if w.get("status") == "READY")
            needed = max(1, int(version.get("minWorkers", 1)))
            ready_workers += ready
            if ready < needed:
                not_ready.append(f"{name} {version.get('modelVersion', '?')} ({ready}/{needed} READY)")
    if not_ready:
        raise ServerError("workers not ready: " + ", ".join(not_ready))
    return f"healthy: {len(expected)} models, {ready_workers} workers READY"


def live() -> str:
    """One-line summary when both servers answer; raises ServerError naming the one that does not."""
    inference = local_url(os.environ.get("TS_INFERENCE_ADDRESS", DEFAULT_INFERENCE))
    try:
        key = read_key("inference")
    except (ServerError, ValueError):
        key = None
    status, body = request(f"{inference}/v2/health/live", key)
    if status >= 500:
        raise ServerError(f"GET /v2/health/live: HTTP {status} {body[:200]!r}")
    listen = os.environ.get("OIP_GRPC_LISTEN", DEFAULT_OIP_GRPC).strip()
    if not listen or listen == "off":
        return f"live: TorchServe answers ({status})"
    host, _, port = listen.rpartition(":")
    host = "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::") else host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S):
            pass
    except (OSError, ValueError) as err:
        raise ServerError(f"the OIP gRPC port does not accept connections on {host}:{port}: {err}") from None
    return f"live: TorchServe answers ({status}), OIP gRPC listens on {host}:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("health", help="exit 0 when every expected model has READY workers")
    sub.add_parser("live", help="exit 0 when TorchServe and its OIP gRPC port answer")
    key_cmd = sub.add_parser("key", help="print a (renewed if expired) key from key_file.json")
    key_cmd.add_argument("kind", nargs="?", default="inference", choices=sorted(KEY_SECTIONS))
    args = parser.parse_args(argv)
    try:
        if args.command == "health":
            print(health())
        elif args.command == "live":
            print(live())
        else:
            key = valid_key(args.kind)
            if key is None:
                print(f"no key file at {key_file()}: token auth is off (or TorchServe has not started)",
                      file=sys.stderr)
                return 1
            print(key)
    except (ServerError, ValueError) as err:
        probe = args.command in ("health", "live")
        print(f"unhealthy: {err}" if probe else f"error: {err}", file=sys.stdout if probe else sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
