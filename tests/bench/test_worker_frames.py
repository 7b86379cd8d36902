"""bench/worker.py's frames, checked against TorchServe's own codec (ts.protocol.otf_message_handler):
what ``inference_frame`` writes, TorchServe's worker reads back; what TorchServe's worker answers,
``parse_response_frame`` reads as the frontend would."""
from __future__ import annotations

import json
import socket
import time
import uuid

import pytest
from ts.context import Context, RequestProcessor
from ts.protocol.otf_message_handler import create_predict_response, retrieve_msg

from bench.worker import batch_frame, inference_frame, parse_response_frame


def test_torchserve_reads_the_inference_frame():
    requests = [(b"\x00\x01binary", {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "2"}),
                (b'{"data": [1]}', {"Content-Type": "application/json", "X-Explain-Steps": "8"})]
    front, worker = socket.socketpair()
    with front, worker:
        before_ms = time.time_ns() // 1_000_000
        front.sendall(inference_frame(requests))
        command, message = retrieve_msg(worker)
    assert command == b"I" and len(message) == 2
    for i, ((body, headers), got) in enumerate(zip(requests, message)):
        made = uuid.UUID(got["requestId"].decode())  # as the frontend names requests: version 7, made now
        assert made.version == 7 and str(made).endswith(f"-{i:012d}")
        assert before_ms <= made.int >> 80 <= time.time_ns() // 1_000_000
        assert {h["name"].decode(): h["value"].decode() for h in got["headers"]} == headers
        (parameter,) = got["parameters"]
        assert parameter["name"] == "body" and parameter["contentType"] == headers["Content-Type"]
        # TorchServe decodes a JSON body itself, and hands any other body over as bytes.
        assert parameter["value"] == (json.loads(body) if headers["Content-Type"] == "application/json" else body)


def test_batch_frame_repeats_one_request():
    front, worker = socket.socketpair()
    with front, worker:
        front.sendall(batch_frame(b"png bytes", "image/png", 3))
        _, message = retrieve_msg(worker)
    assert [m["parameters"][0]["value"] for m in message] == [b"png bytes"] * 3
    headers = {h["name"].decode(): h["value"].decode() for h in message[0]["headers"]}
    assert headers["Content-Type"] == "image/png" and headers["content-length"] == "9"


@pytest.mark.parametrize("with_context", [True, False])
def test_the_response_frame_is_read_as_torchserve_wrote_it(with_context):
    req_ids = {0: "id-0", 1: "id-1"}
    context = None
    if with_context:
        context = Context("m", "/tmp", {}, 2, None, "0.12.0")
        context.request_processor = [RequestProcessor({}), RequestProcessor({})]
        context.set_response_status(400, "bad input", idx=1)
        context.set_response_header(0, "content-type", "application/octet-stream")
        context.set_response_header(0, "Inference-Header-Content-Length", "17")
    frame = create_predict_response([b"\x00raw", "text answer"], req_ids, "Prediction success", 200, context)
    code, message, answers = parse_response_frame(bytes(frame))
    assert (code, message) == (200, "Prediction success")
    assert [a["request_id"] for a in answers] == ["id-0", "id-1"]
    assert [a["body"] for a in answers] == [b"\x00raw", b"text answer"]
    if with_context:
        assert [(a["status"], a["phrase"]) for a in answers] == [(200, ""), (400, "bad input")]
        assert answers[0]["headers"] == {"content-type": "application/octet-stream",
                                         "Inference-Header-Content-Length": "17"}
        assert answers[0]["content_type"] == "application/octet-stream" and answers[1]["headers"] == {}
    else:
        assert [(a["status"], a["phrase"], a["headers"]) for a in answers] == [(200, "", {}), (200, "", {})]


def test_an_error_frame_gives_every_request_the_error():
    frame = create_predict_response(None, {0: "a"}, "Out of resources", 507)
    code, message, (answer,) = parse_response_frame(bytes(frame))
    assert (code, message, answer["status"], answer["body"]) == (507, "Out of resources", 507, b"error")
