"""Talking to the test servers: the one helper module the end-to-end, reliability and server tests share.

* :func:`start_ready_server`: a READY TorchServe (serve/server.py) on free ports with a private TMPDIR, working and
  log directory under ``root``; the caller stops it.
* :func:`api_request` and its short forms :func:`post`, :func:`send`, :func:`manage`: raw HTTP with the
  server's current key. Raw ``requests`` on purpose (not client/api.py): the tests control every header,
  including a missing key.
* :func:`error_message`: the message of a JSON error body, failing the test when there is none.
* :func:`workers`, :func:`worker_pids`, :func:`all_ready`: worker state from the management API.
* :func:`free_port`: one loopback port the OS reports free (for servers that are not :class:`Server`).
* :func:`clean_env`: the environment for every subprocess a test starts: the inherited one minus what
  changes behaviour (:func:`inherited_variable`), plus the test's own settings.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import requests

from client.api import TorchServeError
from serve.server import Ports, Server

READY_TIMEOUT_S = 300  # seven workers on a busy 2-core CI machine can take a minute or two

# What a caller's shell may set that changes what the interpreters, TorchServe, its JVM, the container
# entrypoint or our own CLIs do, so that a test would pass or fail with the caller's settings, not the code's.
INHERITED_PREFIXES = ("PYTHON", "TS_", "SERVE_", "OIP_", "LOADTEST_")
INHERITED_NAMES = {"JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS", "FORK_WORKERS", "APP_DIR",
                   "LOG_LOCATION", "METRICS_LOCATION", "PYTEST_ADDOPTS", "LOCAL_RANK"}
# ... except these PYTHON* switches, which change output buffering or encoding only.
HARMLESS = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONHASHSEED",
            "PYTHONFAULTHANDLER"}


def inherited_variable(name: str) -> bool:
    """True for an environment variable no test may inherit (PYTHONPATH, PYTHONHOME, TS_*, SERVE_*, ...)."""
    return name not in HARMLESS and (name in INHERITED_NAMES or name.startswith(INHERITED_PREFIXES))


def clean_env(**settings: str) -> dict[str, str]:
    """The environment for a subprocess a test starts: ``os.environ`` without the variables
    :func:`inherited_variable` names, with ``settings`` on top (those are the test's own, kept as given)."""
    env = {name: value for name, value in os.environ.items() if not inherited_variable(name)}
    env.update(settings)
    return env


def clear_inherited_environment() -> dict[str, str]:
    """Remove those variables from ``os.environ`` itself (tests/conftest.py, at start-up), so that what
    the code under test starts from ``os.environ`` (serve/server.py's TorchServe) inherits none either;
    returns what was removed."""
    removed = {name: value for name, value in os.environ.items() if inherited_variable(name)}
    for name in removed:
        del os.environ[name]
    return removed


def free_port() -> int:
    """A loopback TCP port the OS reports free right now (``Ports.free`` gives a whole TorchServe set)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ready_server(root: Path, store: Path, models: list[str] | None = None, **kwargs) -> Server:
    """A READY :class:`Server` of ``models`` (default: every registered one) from ``store``, on free ports,
    with ``root/tmp``, ``root/work`` and ``root/logs``; extra ``kwargs`` go to :class:`Server`. Stopped again
    if it does not become ready."""
    kwargs.setdefault("ports", Ports.free())
    server = Server(tmpdir=root / "tmp", workdir=root / "work", model_store=store, log_dir=root / "logs",
                    models=None if models is None else list(models), **kwargs)
    server.start()
    try:
        server.wait_ready(timeout=READY_TIMEOUT_S, progress=False)
    except BaseException:
        server.stop()
        raise
    return server


def api_request(server: Server, method: str, path: str, key: str | None = "inference", api: str = "inference",
                timeout: float = 60, **kwargs) -> requests.Response:
    """``method`` request to ``path`` on the ``api`` ("inference" or "management") of ``server``, with
    ``Authorization: Bearer`` and the server's current key of kind ``key`` (None: no Authorization header).
    Extra ``kwargs`` go to ``requests.request``; a ``headers`` dict passed in is copied, never changed."""
    headers = dict(kwargs.pop("headers", None) or {})
    if key:
        headers["Authorization"] = f"Bearer {server.keys()[key]}"
    base = {"inference": server.inference_url, "management": server.management_url}[api]
    return requests.request(method, f"{base}{path}", headers=headers, timeout=timeout, **kwargs)


def post(server: Server, path: str, key: str | None = "inference", **kwargs) -> requests.Response:
    """POST to the inference API with the current key of kind ``key`` (None: no Authorization)."""
    return api_request(server, "POST", path, key, **kwargs)


def send(server: Server, method: str, path: str, key: str | None = "inference", timeout: float = 60,
         **kwargs) -> requests.Response:
    """``method`` request to the inference API with the server's current ``key`` (None: no Authorization)."""
    return api_request(server, method, path, key, timeout=timeout, **kwargs)


def manage(server: Server, method: str, path: str, key: str | None = "management", **kwargs) -> requests.Response:
    """``method`` request to the management API with the server's current ``key`` (None: no Authorization)."""
    return api_request(server, method, path, key, api="management", timeout=30, **kwargs)


def error_message(response: requests.Response) -> str:
    """The message of a JSON error body: ``error`` (our handlers) or ``message`` (TorchServe's frontend).

    Fails the test if the body is not a JSON object with one of them.
    """
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(
            f"HTTP {response.status_code} body is not JSON: {response.content[:200]!r}"
        ) from None
    assert isinstance(body, dict), f"error body is not a JSON object: {body!r:.200}"
    message = body.get("error") or body.get("message")
    assert isinstance(message, str) and message, f"error body names no message: {body!r:.200}"
    return message


def workers(server: Server, models=None) -> dict[str, list[tuple[str, int, str]]]:
    """model → sorted (worker id, pid, status) of its workers, from the management API (default: every
    model the server was started with)."""
    return {name: sorted((w["id"], w["pid"], w["status"]) for w in server.describe(name)["workers"])
            for name in (server.models if models is None else models)}


def worker_pids(server: Server, models=None) -> dict[str, list[tuple[str, int]]]:
    """model → sorted (worker id, pid) of its workers (status left out)."""
    return {name: [(wid, pid) for wid, pid, _ in found] for name, found in workers(server, models).items()}


def all_ready(server: Server, models=None) -> bool:
    """True when every model's workers are READY (default: every model the server was started with)."""
    try:
        return all(Server.workers_ready(server.describe(name)) for name in (server.models if models is None else models))
    except (TorchServeError, ValueError, IndexError):
        return False
