"""handlers/fast_worker.py reads and writes exactly TorchServe's worker frames (its own code is the reference).

Same bytes in → the same message dicts as ``ts.protocol.otf_message_handler.retrieve_msg`` (also several
messages in a row through one buffered reader); the same handler answers → the same response frame bytes
as ``create_predict_response``. The real worker loop with these pieces runs in every end-to-end test.
"""
from __future__ import annotations

import json
import socket
import struct
import threading

import pytest
from ts.protocol.otf_message_handler import create_predict_response, retrieve_msg
from ts.service import Service

from handlers import fast_worker
from test_handlers import _frame_request, digits, keep_torch_threads, png, serve  # noqa: F401 (fixtures)

BATCH = [
    ("a", {"Content-Type": "application/json"}, [("body", "application/json", json.dumps({"data": [[0.5] * 28] * 28}).encode())]),
    ("b", {}, [("body", "application/json", b"{not json")]),
    ("c", {"X-Note": "t"}, [("body", "text/plain", b'{"data": [1]}')]),
    ("d", {}, [("body", "application/json", b"\xef\xbb\xbf[1, 2]")]),  # BOM: TorchServe forwards the bytes
    ("e", {}, [("body", "application/json", b"[NaN, 1e999, 12345678901234567890123]")]),  # stdlib-only JSON
    ("f", {}, [("body", "application/json", b"\xff\xfe")]),  # not UTF-8
    ("g", {}, [("data", "image/png", b"\x89PNG..."), ("note", "text/plain", b"hi")]),
]


def _wire(batch) -> bytes:
    return b"I" + b"".join(_frame_request(rid, h, p) for rid, h, p in batch) + struct.pack("!i", -1)


def _read_all(reader, wire: bytes, messages: int) -> list:
    sender, receiver = socket.socketpair()
    writer = threading.Thread(target=sender.sendall, args=(wire,))
    writer.start()
    try:
        return [reader(receiver) for _ in range(messages)]
    finally:
        writer.join()
        sender.close(), receiver.close()


def _comparable(message):
    """NaN != NaN: compare JSON values by their repr."""
    return repr(message)


def test_reads_the_messages_torchserve_reads():
    wire = _wire(BATCH)
    assert _comparable(_read_all(fast_worker.retrieve_msg, wire, 1)) == _comparable(_read_all(retrieve_msg, wire, 1))


def test_one_buffer_across_messages_and_a_load_message():
    load = (b"L" + struct.pack("!i", 5) + b"mnist" + struct.pack("!i", 3) + b"/m/" + struct.pack("!i", 8)
            + struct.pack("!i", 7) + b"h.py:fn" + struct.pack("!i", 0) + struct.pack("!i", 0) + b"\x01")
    wire = load + _wire(BATCH) + _wire(BATCH[:2])
    assert _comparable(_read_all(fast_worker.retrieve_msg, wire, 3)) == _comparable(_read_all(retrieve_msg, wire, 3))


def test_frontend_gone_exits_like_torchserve():
    sender, receiver = socket.socketpair()
    sender.sendall(b"I" + struct.pack("!i", 3))
    sender.close()
    with pytest.raises(SystemExit):
        fast_worker.retrieve_msg(receiver)
    receiver.close()


def test_response_frame_is_torchserve_frame(tmp_path, digits):
    """Statuses, phrases, content types, extra headers and bodies of a mixed batch, byte for byte."""
    handler, context, _ = serve("mnistnet", tmp_path)
    batch = BATCH[:6] + [("g", {}, [("data", "image/png", png(digits[0]))])]
    (_, message), = _read_all(fast_worker.retrieve_msg, _wire(batch), 1)
    headers, inputs, request_ids = Service.retrieve_data_for_inference(message)
    context.request_processor, context.request_ids = headers, request_ids
    results = handler.handle(inputs, context)
    assert [context.get_response_status(i)[0] or 200 for i in range(len(batch))] == [200, 400, 400, 400, 400, 400, 200]
    expected = create_predict_response(results, request_ids, "Prediction success", 200, context=context)
    assert fast_worker._response_frame(results, request_ids, context) == bytes(expected)


def test_non_bytes_answers_go_through_torchserve(tmp_path):
    _, context, _ = serve("mnistnet", tmp_path)
    (_, message), = _read_all(fast_worker.retrieve_msg, _wire(BATCH[:1]), 1)
    headers, _, request_ids = Service.retrieve_data_for_inference(message)
    context.request_processor, context.request_ids = headers, request_ids
    assert fast_worker._response_frame([{"a": 1}], request_ids, context) is None
