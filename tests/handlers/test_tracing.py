"""Request IDs, trace context and Server-Timing of the handler (handlers/tracing.py), through real batches."""
from __future__ import annotations

import logging
import random
import time
import uuid

import numpy as np

from handlers import tracing
from tests.handlers.test_handlers import digits, keep_torch_threads, run_batch, serve  # noqa: F401 (fixtures)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def uuid7_at(micros: int) -> str:
    """A UUID version 7 made ``micros`` µs after the epoch, its 12 bits after the version the sub-millisecond
    fraction (RFC 9562, section 6.2, method 3), as the frontend names requests."""
    millis, rest = divmod(micros, 1000)
    value = (millis << 80) | (0x7 << 76) | ((rest * 4096 // 1000) << 64) | (0b10 << 62) | random.getrandbits(62)
    return str(uuid.UUID(int=value))


def test_the_receipt_time_is_read_from_a_version_7_id_only():
    now = time.time_ns() // 1000
    for micros in (now, now - 5000, 1_700_000_000_123_999):
        assert abs(tracing.received_us(uuid7_at(micros)) - micros) <= 1  # 1/4096 ms, rounded down
    assert abs(tracing.queue_ms(uuid7_at(now - 5000), now) - 5.0) <= 0.002
    for other in (str(uuid.uuid4()), "ts-req-1", None, 42, uuid7_at(now)[:-1], "x" * 14 + "7" + "g" * 21):
        assert tracing.received_us(other) is None and tracing.queue_ms(other, now) is None


def test_traceparent_is_read_only_when_valid():
    assert tracing.trace_id({"traceparent": TRACEPARENT}) == TRACE
    assert tracing.trace_id({"traceparent": TRACEPARENT.upper()}) == TRACE
    for bad in ("", "00-xyz", f"ff-{TRACE}-00f067aa0ba902b7-01", f"00-{'0' * 32}-00f067aa0ba902b7-01",
                f"00-{TRACE}-{'0' * 16}-01", TRACEPARENT + "-extra"):
        assert tracing.trace_id({"traceparent": bad}) is None, bad


def test_request_id_prefers_the_callers_then_torchserves():
    assert tracing.request_id({"x-request-id": "abc-1"}, "ts") == "abc-1"
    assert tracing.request_id({}, "ts") == "ts"
    assert tracing.request_id({"x-request-id": "has space"}, "ts") == "ts"
    assert tracing.request_id({"x-request-id": "x" * 129}, "ts") == "ts"


def test_a_batch_answers_each_request_with_its_id_timing_and_logged_trace(tmp_path, digits, caplog):
    handler, context, _ = serve("mnistnet", tmp_path)
    pixels = (digits / 255.0).tolist()
    oip = {"id": "oip-id-9", "inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32",
                                         "data": np.ravel(pixels[0]).tolist()}]}
    requests = [{"body": pixels[:2]}, {"body": {"data": [[0.5] * 3]}}, {"body": oip}, {"body": [[0.5] * 3]}]
    received = uuid7_at(time.time_ns() // 1000 - 5000)  # the frontend received request 2 five ms ago
    headers = [{"X-Request-ID": "caller-1"}, {"traceparent": TRACEPARENT}, {}, {"X-Request-ID": "bad-2"}]
    with caplog.at_level(logging.INFO):
        logging.getLogger().addHandler(caplog.handler)
        try:
            answers = run_batch(handler, context, requests, headers, ids={2: received})
        finally:
            logging.getLogger().removeHandler(caplog.handler)
    assert answers[1]["request_id"] == context.get_request_id(1) and answers[3]["request_id"] == "bad-2"
    assert answers[2]["id"] == "oip-id-9"
    for idx, stages in [(0, ["decode", "infer", "encode"]), (1, ["decode"]), (2, ["queue", "decode", "infer", "encode"])]:
        timing = context.get_response_headers(idx)["Server-Timing"]
        assert [part.split(";")[0] for part in timing.split(", ")] == stages
        assert all(float(part.split("dur=")[1]) >= 0 for part in timing.split(", "))
    assert float(context.get_response_headers(2)["Server-Timing"].split(";dur=")[1].split(",")[0]) >= 5
    logged = [r.getMessage() for r in caplog.records if "answered 400" in r.getMessage()]
    assert len(logged) == 2 and all(f"trace_id={TRACE}" in line for line in logged)
    assert "request ts-req-1 answered" in logged[0] and "request bad-2 answered" in logged[1]
    # The OIP body's id names request 2 once it is decoded: in the lines after, and in its answer's header.
    assert f"[request_id=caller-1,ts-req-1,{received},bad-2" in logged[0]
    assert "[request_id=caller-1,ts-req-1,oip-id-9,bad-2" in logged[1]
    assert context.get_response_headers(2)["X-Request-ID"] == "oip-id-9"
    assert "X-Request-ID" not in context.get_response_headers(0)  # the caller's header: the frontend writes it


def test_an_oip_id_names_its_request_unless_the_caller_sent_x_request_id(tmp_path, digits):
    handler, context, _ = serve("mnistnet", tmp_path)
    pixels = np.ravel(digits[0] / 255.0).tolist()

    def oip(id_, shape=(1, 784)):
        return {"body": {"id": id_, "inputs": [{"name": "x", "shape": list(shape), "datatype": "FP32",
                                                "data": pixels[:int(np.prod(shape))]}]}}

    requests = [oip("body-1"), oip("body-2"), oip("body-3", (1, 10)), oip("has space"), oip(7)]
    headers = [{}, {"X-Request-ID": "hdr-2"}, {}, {}, {}]
    answers = run_batch(handler, context, requests, headers)
    assert [context.get_response_status(i)[0] for i in range(5)] == [200, 200, 400, 400, 400]
    assert answers[0]["id"] == "body-1" and context.get_response_headers(0)["X-Request-ID"] == "body-1"
    # X-Request-ID wins for the request ID (the frontend writes it); the body's id is still echoed
    assert answers[1]["id"] == "body-2" and "X-Request-ID" not in context.get_response_headers(1)
    # an error after the id was read names it; an unusable id is refused, naming TorchServe's ID
    assert answers[2]["request_id"] == "body-3" and context.get_response_headers(2)["X-Request-ID"] == "body-3"
    for idx in (3, 4):
        assert "'id' must be a string" in answers[idx]["error"] and answers[idx]["request_id"] == f"ts-req-{idx}"
        assert "X-Request-ID" not in context.get_response_headers(idx)
