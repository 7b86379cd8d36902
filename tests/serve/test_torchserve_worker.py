"""serve/torchserve/worker.py reads and writes exactly TorchServe's worker frames (its own code is the reference).

Same bytes in → the same message dicts as ``ts.protocol.otf_message_handler.retrieve_msg`` (also several
messages in a row through one buffered reader); the same handler answers → the same response frame bytes
as ``create_predict_response``; the PredictionTime line is the one TorchServe's metrics cache writes. The
version guard through ``install`` with another version; the launch (run_worker.py) installs the patches
unless ``SERVE_FAST_WORKER=0``. The real worker loop with these pieces runs in every end-to-end test
(tests/e2e/test_e2e_forkserver.py checks each worker said so).
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ts.protocol import otf_message_handler
from ts.protocol.otf_message_handler import create_predict_response, retrieve_msg
from ts.service import Service

from serve.torchserve import unsupported
from serve.torchserve import worker as fast_worker
from serve.torchserve.launch import HERE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handlers"))  # the handler tests' helpers
from test_handlers import _frame_request, digits, keep_torch_threads, png, serve  # noqa: E402,F401 (fixtures)

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


def test_large_bodies_read_into_place_are_the_messages_torchserve_reads():
    """Bodies above the buffered size (read straight into their bytearray, in pieces as the socket delivers
    them) and small ones between them: the same message dicts as TorchServe's reader, bytearrays both."""
    rng = __import__("numpy").random.default_rng(0)
    big = [rng.bytes(n) for n in (fast_worker._SMALL + 1, 1 << 16, 3 * (1 << 20) + 7)]
    batch = [(f"r{i}", {"inference-header-content-length": "12"},
              [("body", "application/octet-stream", body), ("note", "text/plain", b"x" * i)])
             for i, body in enumerate(big)]
    wire = _wire(batch) + _wire(batch[:1])
    ours = _read_all(fast_worker.retrieve_msg, wire, 2)
    assert _comparable(ours) == _comparable(_read_all(retrieve_msg, wire, 2))
    bodies = [request["parameters"][0]["value"] for request in ours[0][1]]
    assert bodies == big and all(type(b) is bytearray for b in bodies)


def test_frontend_gone_in_a_large_body_exits_like_torchserve():
    sender, receiver = socket.socketpair()
    body = b"\0" * (fast_worker._SMALL * 4)
    frame = _frame_request("a", {}, [("body", "application/octet-stream", body)])
    sender.sendall(b"I" + frame[: len(frame) - len(body) // 2])  # half the body, then the frontend is gone
    sender.close()
    with pytest.raises(SystemExit):
        fast_worker.retrieve_msg(receiver)
    receiver.close()


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


def test_prediction_time_line_is_the_metrics_cache_line(caplog):
    """TorchServe's own ``add_time`` through its metrics cache (the reference) against ours."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    import ts

    cache = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    cache.initialize_cache()
    cache.model_name = "mnistnet"
    ids = {0: "a-1", 1: "b-2"}
    cache.set_request_ids(ids)
    with caplog.at_level(logging.INFO):
        cache.add_time("PredictionTime", 1.25)
    theirs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]PredictionTime")]
    ours = fast_worker.prediction_time_line("mnistnet", 1.25, ids)
    unstamped = lambda line: re.sub(r"(\|#hostname:[^,]+),\d+,", r"\1,<t>,", line)  # noqa: E731 (same second or not)
    assert [unstamped(ours)] == [unstamped(line) for line in theirs]
    assert ours.endswith(",a-1,b-2")


def test_guard_keeps_another_torchserve_unpatched(capfd):
    """The real install with another version: nothing of TorchServe replaced, and it says why."""
    before = (otf_message_handler.retrieve_msg, Service.predict)
    assert unsupported("0.12.0") is None
    assert fast_worker.install(version="0.13.0") is False
    assert (otf_message_handler.retrieve_msg, Service.predict) == before
    err = capfd.readouterr().err
    assert "worker patches off: TorchServe 0.13.0 is installed" in err and "0.12.0 only" in err
    assert "TorchServe is not installed" in unsupported("")


SCRIPT = """import sys
from ts.protocol import otf_message_handler
from ts.service import Service
from ts.model_loader import TsModelLoader
print(otf_message_handler.retrieve_msg.__module__, Service.predict.__module__,
      getattr(TsModelLoader.load, "serve_torchserve_patch", False), sys.argv[1:], sys.path[0] == sys.argv[1])
"""


@pytest.mark.parametrize("switch", [None, "0"])
def test_the_launch_installs_the_patches_unless_switched_off(tmp_path, switch):
    """run_worker.py (what a plain worker runs) patches TorchServe before the worker script starts."""
    script = tmp_path / "model_service_worker.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SERVE_FAST_WORKER")}
    if switch is not None:
        env["SERVE_FAST_WORKER"] = switch
    out = subprocess.run([sys.executable, str(HERE / "run_worker.py"), str(script), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    if switch is None:
        assert out[0].startswith("serve.torchserve: worker patches on (TorchServe 0.12.0")
        assert out[1] == f"serve.torchserve.worker serve.torchserve.worker True ['{tmp_path}'] True"
    else:
        assert out == [f"ts.protocol.otf_message_handler ts.service False ['{tmp_path}'] True"]


def test_json_bodies_are_parsed_by_the_loaded_handlers_parser(monkeypatch, tmp_path):
    """After a model loads, the reader parses JSON bodies with the handler's ``json_loads`` (ours marks
    numbers-only arrays, handlers/jsoncodec.py); the values are TorchServe's either way."""
    from handlers.jsoncodec import NumberList

    monkeypatch.setattr(fast_worker, "_json_loads", fast_worker._default_json_loads)
    handler, _, _ = serve("mnistnet", tmp_path)
    body = [("n", {}, [("body", "application/json", b"[[0.5, 1], [2, 3e-1]]")])]
    (_, before), = _read_all(fast_worker.retrieve_msg, _wire(body), 1)
    loaded = fast_worker._load(lambda self, *args: type("Service", (), {"_entry_point": handler.handle})())
    loaded(None)
    (_, after), = _read_all(fast_worker.retrieve_msg, _wire(body), 1)
    value_before, value_after = before[0]["parameters"][0]["value"], after[0]["parameters"][0]["value"]
    assert value_before == value_after == [[0.5, 1], [2, 0.3]]
    assert type(value_before) is list and type(value_after) is NumberList
    (_, theirs), = _read_all(retrieve_msg, _wire(body), 1)
    assert theirs[0]["parameters"][0]["value"] == value_after


class _Writes(logging.Handler):
    """The message of each record the root logger writes (in a worker: one write to the frontend's pipe each)."""

    def __init__(self):
        super().__init__()
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


def test_a_batchs_metrics_leave_after_its_answer_with_the_next_batchs_line(monkeypatch):
    """The [METRICS] records of an answered batch are written once, with the next batch's INFO line when that
    batch is already arriving (one write per batch under load), else on their own before the worker waits;
    every line TorchServe's worker writes is still written, in order, and the frontend splits them per line."""
    writes = _Writes()
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [writes])
    level = root.level
    root.setLevel(logging.INFO)  # (setLevel also clears the loggers' cached levels)
    batch = fast_worker._BatchRecord()
    monkeypatch.setattr(fast_worker, "_batch", batch)
    monkeypatch.setattr(fast_worker, "_reader", None)
    sender, receiver = socket.socketpair()
    try:
        def answered_batch(n: int) -> None:
            batch.begin()
            logging.getLogger("handlers.metrics").info(f"[METRICS]model_stage_seconds.Seconds:0.{n}|#x")
            logging.getLogger("ts.service").warning("a model log line")  # not held: written at once
            batch.end(f"[METRICS]PredictionTime.Milliseconds:{n}|#x")

        answered_batch(1)
        assert writes.records == ["a model log line"]  # the metrics wait for the answer
        sender.sendall(_wire(BATCH[:1]))  # the next batch is already there: one record with its line
        cmd, _ = fast_worker.retrieve_msg(receiver)
        assert cmd == b"I" and len(writes.records) == 2, writes.records
        lines = writes.records[1].split("\n")
        assert lines[:2] == ["[METRICS]model_stage_seconds.Seconds:0.1|#x", "[METRICS]PredictionTime.Milliseconds:1|#x"]
        assert len(lines) == 3 and lines[2].startswith(_torchserves_batch_line())

        answered_batch(2)  # no batch follows: written on their own before the worker waits
        reader = threading.Thread(target=fast_worker.retrieve_msg, args=(receiver,))
        reader.start()
        time.sleep(0.5)
        assert [m.split("\n") for m in writes.records[3:]] == [
            ["[METRICS]model_stage_seconds.Seconds:0.2|#x", "[METRICS]PredictionTime.Milliseconds:2|#x"]]
        sender.sendall(_wire(BATCH[:1]))
        reader.join(10)
        assert not reader.is_alive() and writes.records[-1].startswith(_torchserves_batch_line())
        assert batch.held == []
    finally:
        sender.close(), receiver.close()
        root.setLevel(level)


def _torchserves_batch_line() -> str:
    """The start of the per-batch INFO line in TorchServe's own worker (ts/protocol/otf_message_handler.py),
    which the reliability tests count batches by."""
    import inspect

    source = inspect.getsource(otf_message_handler.retrieve_msg)
    return re.search(r'"(Backend received inference at:)', source).group(1)
