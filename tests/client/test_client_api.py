"""client/api.py without a server: request encoding, v2 bodies, key discovery and error messages.
(The client against a real TorchServe is exercised by tests/e2e.)"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import requests

from client.api import TorchServeClient, TorchServeError, encode_input, error_message, read_key, v2_request

from paths import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"


def test_encode_input_picks_body_and_content_type():
    png = (EXAMPLES / "digit_7.png").read_bytes()
    assert encode_input(png) == (png, "image/png")
    assert encode_input(b"\xff\xd8\xff\xe0rest")[1] == "image/jpeg"
    assert encode_input(b"\x00\x01")[1] == "application/octet-stream"
    body, content_type = encode_input(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert content_type == "application/json"
    assert json.loads(body) == {"data": [[0, 1, 2], [3, 4, 5]]}
    assert json.loads(encode_input({"inputs": []})[0]) == {"inputs": []}
    assert json.loads(encode_input(2.5)[0]) == 2.5


def test_v2_request_body():
    body = v2_request(np.zeros((2, 28, 28), dtype=np.float32), request_id="r1")
    (tensor,) = body["inputs"]
    assert body["id"] == "r1"
    assert (tensor["shape"], tensor["datatype"], len(tensor["data"])) == ([2, 28, 28], "FP32", 1568)
    assert v2_request(np.array([[1, 2]]))["inputs"][0]["datatype"] == "INT64"
    assert v2_request(np.array([[1, 2]]), datatype="UINT8")["inputs"][0]["datatype"] == "UINT8"


def write_key_file(path: Path, inference: str, management: str = "m") -> Path:
    path.write_text(json.dumps({"inference": {"key": inference}, "management": {"key": management}, "API": {"key": "a"}}))
    return path


def test_key_precedence_argument_then_env_then_key_file(tmp_path, monkeypatch):
    key_file = write_key_file(tmp_path / "key_file.json", "from-file")
    monkeypatch.delenv("TS_INFERENCE_KEY", raising=False)
    monkeypatch.setenv("TS_KEY_FILE", str(key_file))
    assert read_key("inference") == "from-file" and read_key("API") == "a"
    assert TorchServeClient()._keys["inference"] == ("from-file", True)
    monkeypatch.setenv("TS_INFERENCE_KEY", "from-env")
    assert TorchServeClient()._keys["inference"] == ("from-env", False)
    assert TorchServeClient(token="explicit")._keys["inference"] == ("explicit", False)
    assert TorchServeClient(key_file=write_key_file(tmp_path / "other.json", "x", "mm"))._keys["management"] == ("mm", True)


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = TorchServeClient(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}", token="k", timeout=2)
    with pytest.raises(TorchServeError, match="cannot reach the server") as error:
        client.health()
    assert error.value.status is None


def response(status: int, body: bytes, reason: str = "") -> requests.Response:
    r = requests.Response()
    r.status_code, r._content, r.reason = status, body, reason
    return r


def test_error_message_reads_torchserve_and_handler_bodies():
    torchserve = b'{"code": 404, "type": "ModelNotFoundException", "message": "Model not found: x"}'
    assert error_message(response(404, torchserve))[0] == "Model not found: x"
    handler = b'{"error": "expected key \'data\'", "code": 400}'
    assert error_message(response(400, handler)) == ("expected key 'data'", {"error": "expected key 'data'", "code": 400})
    assert error_message(response(413, b"", "Request Entity Too Large"))[0] == "Request Entity Too Large"
