"""A small requests-based client for the TorchServe service.

    from client.api import TorchServeClient
    client = TorchServeClient()                       # http://127.0.0.1:8080 and :8081, key found itself
    client.predict("mnistnet", Path("examples/digit_7.png").read_bytes())
    client.predict("mnistnet", np.zeros((3, 28, 28)))  # → list of 3 {"predicted_class", "probabilities"}
    client.predict("regressionnet", [[0.1] * 10])      # → {"predictions": [...]}
    client.predict_v2("mnistnet", np.zeros((2, 784), np.float32))              # OIP, JSON tensors
    client.predict_v2("mnistnet", np.zeros((256, 784), np.float32), binary=True)  # OIP, binary tensors
    client.model_metadata("mnistnet"); client.ready("mnistnet")

Keys (TorchServe token auth): the inference key is the first found of the ``token`` argument, the
``TS_INFERENCE_KEY`` environment variable, and ``key_file.json`` in ``$TS_KEY_FILE``, the serve working
directory ``.serve/`` or the current directory; the management key likewise (``management_token``,
``TS_MANAGEMENT_KEY``, key file). A key read from the key file is re-read once when the server refuses
it (the server was restarted or the key rotated). Every error is a :class:`TorchServeError` with the HTTP
status and the server's message.

Busy server: a 503 (TorchServe's job queue for the model is full, ``job_queue_size``) or 429 answer is
retried up to ``retries`` times (default 4) after a jittered exponential back-off (``backoff`` seconds
doubled per try, capped at ``max_backoff``; a ``Retry-After`` header wins when it is longer). Every call of
this client is idempotent (predictions and reads), so a retry cannot do anything twice. ``retries=0``
turns it off; the last busy answer is raised as a :class:`TorchServeError` with its status.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

from client.oip import binary_v2_request, parse_binary_v2_response  # noqa: F401  (re-exported)
from paths import SERVE_WORKDIR
DEFAULT_INFERENCE_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
KEY_FILE_CANDIDATES = (SERVE_WORKDIR / "key_file.json", Path("key_file.json"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# TorchServe answers a missing/wrong/expired key with 400 InvalidKeyException (and some proxies 401).
AUTH_FAILURE_STATUSES = (400, 401)
# The server is overloaded (TorchServe: 503 when a model's job queue is full) or rate-limits (429): retry later.
BUSY_STATUSES = (429, 503)


class TorchServeError(Exception):
    """A request the server refused or could not answer.

    Attributes: ``status`` (HTTP status code, or None when the server was unreachable), ``message``
    (the server's error message), ``body`` (the parsed JSON error body, or the raw text), ``url``.
    """

    def __init__(self, status: int | None, message: str, body: Any = None, url: str = ""):
        super().__init__(f"{status or 'no response'}: {message}" + (f" ({url})" if url else ""))
        self.status = status
        self.message = message
        self.body = body
        self.url = url


def find_key_file(candidates: tuple[Path, ...] = KEY_FILE_CANDIDATES) -> Path | None:
    """The key file to use: ``$TS_KEY_FILE`` if set, else the first existing of ``candidates``."""
    explicit = os.environ.get("TS_KEY_FILE")
    if explicit:
        return Path(explicit)
    return next((path for path in candidates if path.is_file()), None)


def read_keys(key_file: Path) -> dict[str, str]:
    """The keys in a TorchServe ``key_file.json``: ``inference``, ``management`` and ``api`` (the API key only
    rotates the other two, ``POST /token?type=...``); empty when the file is missing or unreadable.

    The one reader of key files (``serve``, the client, loadtest and bench use it); the container's stdlib-only
    health script deploy/docker/tsctl.py keeps its own because the image has no copy of this package.
    """
    try:
        raw = json.loads(Path(key_file).read_text())
        keys = {kind.lower(): entry.get("key") for kind, entry in raw.items() if isinstance(entry, dict)}
    except (OSError, ValueError, AttributeError):
        return {}
    return {kind: key for kind, key in keys.items() if kind in ("inference", "management", "api") and key}


def read_key(kind: str, key_file: Path | None = None) -> str | None:
    """The ``kind`` key (``inference``, ``management`` or ``api``) from ``key_file`` or the one :func:`find_key_file` finds."""
    path = key_file or find_key_file()
    return read_keys(path).get(kind.lower()) if path else None


def error_message(response: requests.Response) -> tuple[str, Any]:
    """The server's message for a failed response and the parsed body (TorchServe's ``message``, our
    handlers' ``error``, else the raw text or the reason phrase)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text or response.reason or "no message", text
    if isinstance(body, dict):
        message = body.get("message") or body.get("error") or json.dumps(body)
    else:
        message = json.dumps(body)
    return str(message), body


def encode_input(data: Any) -> tuple[bytes, str]:
    """Request body and Content-Type for ``data``.

    ``bytes`` are sent raw (``image/png`` or ``image/jpeg`` by their magic number, else
    ``application/octet-stream``); a numpy array becomes ``{"data": nested list}``; any other value is
    sent as JSON as it is (a dict such as ``{"data": ...}`` or ``{"inputs": ...}``, a list, a number).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if raw.startswith(PNG_MAGIC):
            return raw, "image/png"
        if raw.startswith(JPEG_MAGIC):
            return raw, "image/jpeg"
        return raw, "application/octet-stream"
    if isinstance(data, np.ndarray):
        data = {"data": data.tolist()}
    return json.dumps(data).encode(), "application/json"


def v2_request(array: np.ndarray, name: str = "input-0", datatype: str | None = None, request_id: str | None = None) -> dict:
    """An Open Inference Protocol request body for one tensor (datatype FP32 for floats, INT64 for ints)."""
    array = np.asarray(array)
    if datatype is None:
        datatype = "INT64" if np.issubdtype(array.dtype, np.integer) else "FP32"
    body = {"inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.ravel().tolist()}]}
    if request_id is not None:
        body["id"] = request_id
    return body


class TorchServeClient:
    """Client for one TorchServe: inference at ``base_url``, management at ``management_url``.

    Args:
        base_url: inference API (default ``$TS_INFERENCE_URL`` or http://127.0.0.1:8080).
        management_url: management API (default ``$TS_MANAGEMENT_URL`` or http://127.0.0.1:8081).
        token: inference key (default: ``$TS_INFERENCE_KEY``, else key_file.json, see module doc).
        management_token: management key (default: ``$TS_MANAGEMENT_KEY``, else key_file.json).
        key_file: key_file.json to read keys from; beats the environment variables (default: found as the
            module doc says).
        timeout: seconds per request (default 30).
        retries: how often a busy answer (503/429) is retried (default 4; 0: never).
        backoff: seconds before the first retry, doubled each time, with jitter (default 0.25).
        max_backoff: longest wait between two tries in seconds (default 5).
    """

    def __init__(
        self,
        base_url: str | None = None,
        management_url: str | None = None,
        token: str | None = None,
        management_token: str | None = None,
        key_file: Path | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.25,
        max_backoff: float = 5.0,
    ):
        self.base_url = (base_url or os.environ.get("TS_INFERENCE_URL") or DEFAULT_INFERENCE_URL).rstrip("/")
        self.management_url = (
            management_url or os.environ.get("TS_MANAGEMENT_URL") or DEFAULT_MANAGEMENT_URL
        ).rstrip("/")
        self.key_file = Path(key_file) if key_file else None
        self.timeout = timeout
        self.retries, self.backoff, self.max_backoff = max(0, int(retries)), backoff, max_backoff
        self.busy_retries = 0  # busy answers retried so far (for callers and tests)
        self.session = requests.Session()
        # kind → (key, came from the key file so may be re-read)
        self._keys = {
            "inference": self._initial_key("inference", token, "TS_INFERENCE_KEY"),
            "management": self._initial_key("management", management_token, "TS_MANAGEMENT_KEY"),
        }

    def _initial_key(self, kind: str, explicit: str | None, env_var: str) -> tuple[str | None, bool]:
        """The first of: the argument, an explicit ``key_file``, the environment, a key file found by default."""
        if explicit:
            return explicit, False
        if os.environ.get(env_var) and self.key_file is None:
            return os.environ[env_var], False
        return read_key(kind, self.key_file), True

    # ----------------------------------------------------------------------------------- plumbing

    def _request(self, method: str, url: str, key_kind: str | None, **kwargs) -> requests.Response:
        """Send with ``Authorization: Bearer <key>``; on an auth failure re-read a key-file key once; on a
        busy answer (503/429) wait and retry, at most ``retries`` times."""
        kwargs.setdefault("timeout", self.timeout)
        refreshed, busy = False, 0
        while True:
            headers = dict(kwargs.pop("headers", None) or {})
            key = self._keys[key_kind][0] if key_kind else None
            if key:
                headers["Authorization"] = f"Bearer {key}"
            try:
                response = self.session.request(method, url, headers=headers, **kwargs)
            except requests.RequestException as exc:
                raise TorchServeError(None, f"cannot reach the server: {exc}", url=url) from exc
            kwargs["headers"] = headers
            if response.ok:
                return response
            message, body = error_message(response)
            if not refreshed and key_kind and response.status_code in AUTH_FAILURE_STATUSES and self._refresh_key(
                key_kind, body
            ):
                refreshed = True
                continue
            if response.status_code in BUSY_STATUSES and busy < self.retries:
                time.sleep(self._busy_delay(busy, response))
                busy += 1
                self.busy_retries += 1
                continue
            raise TorchServeError(response.status_code, message, body, url)

    def _busy_delay(self, retry: int, response: requests.Response) -> float:
        """Seconds to wait before busy retry number ``retry`` (0-based): half of ``backoff * 2**retry``
        (capped at ``max_backoff``) plus a random part up to the other half, so that clients refused
        together do not come back together; a longer ``Retry-After`` (seconds) wins, within the cap."""
        ceiling = min(self.max_backoff, self.backoff * 2**retry)
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        try:
            delay = max(delay, min(self.max_backoff, float(response.headers.get("Retry-After", 0))))
        except ValueError:
            pass
        return delay

    def _refresh_key(self, kind: str, body: Any) -> bool:
        """Re-read a key-file key after a token failure; True if a different key was found."""
        key, from_file = self._keys[kind]
        if not from_file or "InvalidKeyException" not in json.dumps(body):
            return False
        fresh = read_key(kind, self.key_file)
        if fresh and fresh != key:
            self._keys[kind] = (fresh, True)
            return True
        return False

    @staticmethod
    def _model_path(model: str, version: str | None) -> str:
        return f"{model}/{version}" if version else model

    # ------------------------------------------------------------------------------------- inference

    def predict(self, model: str, data: Any, version: str | None = None) -> Any:
        """POST ``data`` to ``/predictions/<model>[/<version>]``; returns the decoded JSON response.

        ``data``: PNG/JPEG ``bytes`` (sent raw), a numpy array (sent as ``{"data": ...}``) or any JSON
        value (sent as is). See handlers/decoding.py for what each model accepts.
        """
        body, content_type = encode_input(data)
        url = f"{self.base_url}/predictions/{self._model_path(model, version)}"
        response = self._request("POST", url, "inference", data=body, headers={"Content-Type": content_type})
        return response.json()

    def predict_multipart(self, model: str, image: bytes, version: str | None = None) -> Any:
        """Upload an image as the multipart form field ``data`` (like ``curl -F data=@digit.png``)."""
        _, content_type = encode_input(image)
        url = f"{self.base_url}/predictions/{self._model_path(model, version)}"
        files = {"data": ("image", bytes(image), content_type)}
        return self._request("POST", url, "inference", files=files).json()

    def predict_v2(
        self, model: str, inputs: np.ndarray | dict, version: str | None = None, datatype: str | None = None,
        request_id: str | None = None, binary: bool = False,
    ) -> dict:
        """Open Inference Protocol request to ``/v2/models/<model>[/versions/<version>]/infer``.

        ``inputs`` is one tensor (a numpy array, sent as FP32/INT64 by its dtype unless ``datatype`` says
        otherwise) or a complete v2 request body ``{"inputs": [...]}`` (always sent as JSON). With
        ``binary=True`` the tensor travels as raw little-endian bytes and the outputs come back the same
        way (the binary tensor data extension): far less work than JSON for many images. Returns the v2
        response dict; binary outputs are decoded into ``data`` as numpy arrays of their shape.
        """
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        url = f"{self.base_url}{path}"
        if isinstance(inputs, dict) or not binary:
            body = inputs if isinstance(inputs, dict) else v2_request(inputs, datatype=datatype, request_id=request_id)
            return self._request("POST", url, "inference", json=body).json()
        payload, header_length = binary_v2_request(inputs, datatype=datatype, request_id=request_id)
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}
        response = self._request("POST", url, "inference", data=payload, headers=headers)
        return parse_binary_v2_response(response.content, response.headers.get("Inference-Header-Content-Length"))

    def explain(
        self, model: str, data: Any, version: str | None = None, target: int | None = None, steps: int | None = None,
    ) -> Any:
        """POST ``data`` (as :meth:`predict` sends it) to ``/explanations/<model>[/<version>]``: Captum
        Integrated Gradients (handlers/explain.py). ``target``: the class to explain (default: the
        predicted one); ``steps``: integration steps (default 50). Returns the decoded JSON: per sample
        ``predicted_class``, ``probabilities``, ``target``, ``attributions`` (28x28 for a digit),
        ``convergence_delta``, ``method``, ``baseline``, ``steps``; a list for a list of samples."""
        body, content_type = encode_input(data)
        headers = {"Content-Type": content_type}
        if target is not None:
            headers["X-Explain-Target"] = str(int(target))
        if steps is not None:
            headers["X-Explain-Steps"] = str(int(steps))
        url = f"{self.base_url}/explanations/{self._model_path(model, version)}"
        return self._request("POST", url, "inference", data=body, headers=headers).json()

    def model_metadata(self, model: str, version: str | None = None) -> dict:
        """``GET /v2/models/<model>[/versions/<version>]``: name, versions, platform, inputs and outputs."""
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        return self._request("GET", f"{self.base_url}{path}", "inference").json()

    def ready(self, model: str | None = None, version: str | None = None) -> bool:
        """``GET /v2/health/ready`` (every model has READY workers), or one model's ``/ready``."""
        if model is None:
            path = "/v2/health/ready"
        else:
            path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
        try:
            self._request("GET", f"{self.base_url}{path}", "inference")
        except TorchServeError as err:
            if err.status in (400, 503):
                return False
            raise
        return True

    def health(self) -> dict:
        """``GET /ping``: ``{"status": "Healthy"}`` once the frontend is up (workers may still load)."""
        return self._request("GET", f"{self.base_url}/ping", "inference").json()

    # ------------------------------------------------------------------------------------ management

    def list_models(self) -> list[dict]:
        """Every registered model as ``{"modelName", "modelUrl"}`` (follows pagination)."""
        models, token = [], None
        while True:
            params = {"limit": 100, **({"next_page_token": token} if token else {})}
            page = self._request("GET", f"{self.management_url}/models", "management", params=params).json()
            models += page.get("models", [])
            token = page.get("nextPageToken")
            if not token:
                return models

    def describe(self, model: str, version: str | None = None) -> list[dict]:
        """``GET /models/<model>[/<version>]``: versions, workers (status, pid), batching settings."""
        url = f"{self.management_url}/models/{self._model_path(model, version)}"
        return self._request("GET", url, "management").json()

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "TorchServeClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
