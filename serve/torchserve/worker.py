"""Leaner pieces of TorchServe 0.12's Python worker loop, installed at worker launch (:func:`run`).

TorchServe's worker (ts/model_service_worker.py) reads each batch from the frontend's socket one field at
a time, and emits ``PredictionTime`` through its metrics cache: a large share of a worker's time for a
single-image request (measured in bench/README.md). These replace, with the same wire format and results:

* ``otf_message_handler.retrieve_msg``: one buffered reader per socket, the same message dicts (JSON bodies
  parsed by the loaded handler's ``json_loads`` when it offers one, else orjson/json; text as str;
  ``TS_DECODE_INPUT_REQUEST`` honoured) and the same per-batch INFO line (tests count batches with it);
* ``Service.predict``: the same steps and error answers, ``PredictionTime`` as the same ``[METRICS]`` line
  (wire/metric_lines.py), the response frame built in one ``join``, and the batch's
  ``[METRICS]`` records (the handler's, then PredictionTime) written as ONE record once the answer is
  sent, together with the next batch's INFO line when that batch arrives within 2 ms.

:func:`install` swaps them in before the worker script runs: serve/torchserve/run_worker.py (a plain
worker) and the fork server's child (serve/torchserve/forkserver.py) call :func:`run`. Off with
``SERVE_FAST_WORKER=0`` in the server's environment, and on any TorchServe but 0.12.0 (the guard in
``serve.torchserve.unsupported``). What each patch replaces and why: docs/torchserve-patches.md.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import struct
import sys
import time

from serve.torchserve import SUPPORTED_VERSION, unsupported
from wire.metric_lines import line_end, line_parts

try:  # optional speed-up (requirements pin it)
    import orjson
except ImportError:  # pragma: no cover
    orjson = None

logger = logging.getLogger("ts.service")

SWITCH = "SERVE_FAST_WORKER"  # "0" in the worker's environment keeps TorchServe's own pieces
_INT = struct.Struct("!i")
_TWO_INTS = struct.Struct("!ii")
_END = _INT.pack(-1)
_SMALL = 1 << 14  # blobs up to this size go through the buffer; larger ones are read into place
_installed = False


def _default_json_loads(text: str):
    """TorchServe's ``json.loads``, through orjson when it accepts the text (same values, same errors)."""
    if orjson is not None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


_json_loads = _default_json_loads  # the loaded handler's json_loads once a model is loaded (_load)


class _Reader:
    """Buffered reads of exact lengths from the frontend's socket; exits like TorchServe when it closes."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.file = conn.makefile("rb", buffering=1 << 16)

    def read(self, n: int) -> bytes:
        data = self.file.read(n)
        if len(data) < n:
            _batch.write("Frontend disconnected.")
            sys.exit(0)
        return data

    def int(self) -> int:
        return _INT.unpack(self.read(4))[0]

    def blob(self, n: int) -> bytearray:
        """``n`` bytes as the bytearray TorchServe's reader hands over; a large one (a request body) is read
        straight into its bytearray: one copy from the socket, not a ``bytes`` then its bytearray copy."""
        if n <= _SMALL:
            return bytearray(self.read(n))
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.file.readinto(view[got:])
            if not k:
                _batch.write("Frontend disconnected.")
                sys.exit(0)
            got += k
        return buf


_reader: _Reader | None = None


_NEXT_BATCH_WAIT_S = 0.002  # how long the last batch's metrics wait for the next batch, to leave with it


def _next_message_within(conn: socket.socket, seconds: float) -> bool:
    """True when the frontend's next message begins to arrive within ``seconds``. Only the socket is asked:
    the frontend sends a worker its next message after reading the answer to the last one, so nothing of it
    sits in the reader's buffer yet."""
    try:
        return bool(select.select([conn], [], [], seconds)[0])
    except (OSError, ValueError):
        return False


class _BatchRecord(logging.Filter):
    """On the root logger's handlers: while a batch runs, holds back ``[METRICS]`` records (the handler's
    model metrics, TorchServe's custom metrics) to write them with PredictionTime as one record, after the
    batch's answer is sent: with the next batch's first line when that batch is already waiting, else
    before the worker waits for the frontend (:func:`retrieve_msg`). One write per batch under load, and
    none between a batch and its answer."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] | None = None  # None: not inside a batch
        self.held: list[str] = []  # the records of batches already answered, not yet written

    def filter(self, record: logging.LogRecord) -> bool:
        if self.lines is not None and isinstance(record.msg, str) and record.msg.startswith("[METRICS]"):
            self.lines.append(record.getMessage())
            return False
        return True

    def begin(self) -> None:
        root = logging.getLogger()
        for handler in root.handlers:
            if self not in handler.filters:
                handler.addFilter(self)
        self.lines = []

    def end(self, last: str | None) -> None:
        lines, self.lines = self.lines or [], None
        if last is not None:
            lines.append(last)
        self.held += lines

    def write(self, line: str | None = None) -> None:
        """The held records, then ``line``, as one record (nothing when there is neither)."""
        lines, self.held = self.held, []
        if line is not None:
            lines.append(line)
        if lines:
            logging.getLogger().info("\n".join(lines))


_batch = _BatchRecord()


def retrieve_msg(conn: socket.socket):
    """``(command, message)`` like ``ts.protocol.otf_message_handler.retrieve_msg``, through one buffer."""
    global _reader
    if _reader is None or _reader.conn is not conn:
        _reader = _Reader(conn)
    if _batch.held and not _next_message_within(conn, _NEXT_BATCH_WAIT_S):
        _batch.write()  # the last batch's metrics, before this worker waits for the next one
    cmd = _reader.blob(1)
    if cmd == b"I":
        msg = _inference_msg(_reader)
        # kept: the line marks a batch in model_log (tests count batches with it); held metrics go with it
        _batch.write("Backend received inference at: %d" % time.time())
        return cmd, msg
    if cmd == b"L":
        return cmd, _load_msg(_reader)
    raise ValueError("Invalid command: {}".format(cmd))


def _load_msg(r: _Reader) -> dict:
    msg = {"modelName": r.blob(r.int()), "modelPath": r.blob(r.int()), "batchSize": r.int(),
           "handler": r.blob(r.int())}
    gpu_id = r.int()
    if gpu_id >= 0:
        msg["gpu"] = gpu_id
    msg["envelope"] = r.blob(r.int())
    msg["limitMaxImagePixels"] = struct.unpack("!?", r.read(1))[0]
    return msg


def _inference_msg(r: _Reader) -> list[dict]:
    decode = os.environ.get("TS_DECODE_INPUT_REQUEST") in (None, "true")
    batch = []
    while (length := r.int()) != -1:
        request = {"requestId": r.blob(length)}
        headers = []
        while (length := r.int()) != -1:
            name = r.blob(length)
            headers.append({"name": name, "value": r.blob(r.int())})
        request["headers"] = headers
        parameters = []
        while (length := r.int()) != -1:
            name = r.read(length).decode("utf-8")
            content_type = r.read(r.int()).decode("utf-8")
            value = r.blob(r.int())
            parameters.append({"name": name, "contentType": content_type,
                               "value": _decoded(value, content_type) if decode else value})
        request["parameters"] = parameters
        batch.append(request)
    return batch


def _decoded(value: bytearray, content_type: str):
    """TorchServe's input decoding: JSON parsed, text as str, else the bytes (also when decoding fails)."""
    if content_type == "application/json":
        try:
            return _json_loads(value.decode("utf-8"))
        except Exception:
            logging.warning("Failed json decoding of input data. Forwarding encoded payload")
    elif content_type.startswith("text"):
        try:
            return value.decode("utf-8")
        except Exception:
            logging.warning("Failed utf-8 decoding of input data. Forwarding encoded payload")
    return value


def predict(self, batch):
    """``ts.service.Service.predict`` with a cheaper PredictionTime line and response frame; the batch's
    ``[METRICS]`` lines leave in one record after it."""
    _batch.begin()
    last = None
    try:
        frame, last = _predict(self, batch)
        return frame
    finally:
        _batch.end(last)


def _predict(self, batch):
    from ts.service import PredictionException, Service, create_predict_response

    headers, input_batch, req_id_map = Service.retrieve_data_for_inference(batch)
    context = self.context
    context.request_ids = req_id_map
    context.request_processor = headers
    context.metrics.request_ids = req_id_map
    context.cl_socket = self.cl_socket
    start_time = time.time()
    try:
        ret = self._entry_point(input_batch, context)
    except MemoryError:
        logger.error("System out of memory", exc_info=True)
        return create_predict_response(None, req_id_map, "Out of resources", 507), None
    except PredictionException as e:
        logger.error("Prediction error", exc_info=True)
        return create_predict_response(None, req_id_map, e.message, e.error_code), None
    except Exception as ex:
        if "CUDA" in str(ex):
            logger.error("CUDA out of memory", exc_info=True)
            return create_predict_response(None, req_id_map, "Out of resources", 507), None
        logger.warning("Invoking custom service failed.", exc_info=True)
        return create_predict_response(None, req_id_map, "Prediction failed", 503), None
    if not isinstance(ret, list):
        logger.warning("model: %s, Invalid return type: %s.", context.model_name, type(ret))
        return create_predict_response(None, req_id_map, "Invalid model predict output", 503), None
    if len(ret) != len(input_batch):
        logger.warning("model: %s, number of batch response mismatched, expect: %d, got: %d.",
                       context.model_name, len(input_batch), len(ret))
        return create_predict_response(None, req_id_map, "number of batch response mismatched", 503), None
    duration = round((time.time() - start_time) * 1000, 2)
    line = prediction_time_line(context.model_name, duration, req_id_map)
    frame = _response_frame(ret, req_id_map, context)
    if frame is None:
        return create_predict_response(ret, req_id_map, "Prediction success", 200, context=context), line
    return frame, line


_PREDICTION_TIME: dict[str, tuple[str, str]] = {}  # model name → line_parts


def prediction_time_line(model_name: str, duration_ms: float, req_id_map: dict) -> str:
    """The ``[METRICS]`` line ``context.metrics.add_time("PredictionTime", duration_ms)`` writes."""
    parts = _PREDICTION_TIME.get(model_name)
    if parts is None:
        parts = _PREDICTION_TIME[model_name] = line_parts(
            "PredictionTime", "Milliseconds", (("ModelName", model_name), ("Level", "Model")), "gauge")
    return f"{parts[0]}{duration_ms}{parts[1]}{line_end(request_ids=','.join(req_id_map.values()))}"


_SUCCESS = _TWO_INTS.pack(200, len(b"Prediction success")) + b"Prediction success"


def _response_frame(ret: list, req_id_map: dict, context) -> bytes | None:
    """TorchServe's response frame for bytes answers; None for anything its own encoder must handle."""
    if context.stopping_criteria or os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    parts = [_SUCCESS]
    for idx, req_id in req_id_map.items():
        body = ret[idx]
        if not isinstance(body, (bytes, bytearray)):
            return None
        headers = context.get_response_headers(idx)
        if headers.get("ts_stream_next") == "true":
            return None
        rid = req_id.encode("utf-8")
        content_type = (headers.get("content-type") or "").encode("utf-8")
        code, phrase = context.get_response_status(idx)
        phrase = (phrase or "").encode("utf-8")
        parts += [_INT.pack(len(rid)), rid, _INT.pack(len(content_type)), content_type,
                  _TWO_INTS.pack(code if code is not None else 200, len(phrase)), phrase, _INT.pack(len(headers))]
        for key, value in headers.items():
            k, v = key.encode("utf-8"), value.encode("utf-8")
            parts += [_INT.pack(len(k)), k, _INT.pack(len(v)), v]
        parts += [_INT.pack(len(body)), body]
    parts.append(_END)
    return b"".join(parts)


def _load(original):
    """``TsModelLoader.load`` that then takes the loaded handler's ``json_loads`` for request bodies."""

    def load(self, *args, **kwargs):
        global _json_loads
        service = original(self, *args, **kwargs)
        handler = getattr(getattr(service, "_entry_point", None), "__self__", None)
        _json_loads = getattr(handler, "json_loads", None) or _default_json_loads
        return service

    load.serve_torchserve_patch = True
    return load


def install(version: str | None = None) -> bool:
    """Swap the pieces into TorchServe's worker modules, before the worker script imports them. False (and
    nothing touched) with ``SERVE_FAST_WORKER=0`` or on a TorchServe other than 0.12.0 (``version``: the
    installed one unless given), which prints why on stderr (model_log.log in a worker)."""
    global _installed
    if _installed:
        return True
    if os.environ.get(SWITCH, "1") == "0":
        return False
    refusal = unsupported(version)
    if refusal:
        print(f"serve.torchserve: worker patches off: {refusal}; running TorchServe's own worker loop",
              file=sys.stderr, flush=True)
        return False
    import ts.model_loader as model_loader
    import ts.service as service
    from ts.protocol import otf_message_handler

    otf_message_handler.retrieve_msg = retrieve_msg
    service.Service.predict = predict
    model_loader.TsModelLoader.load = _load(model_loader.TsModelLoader.load)
    _installed = True
    return True


def run(argv: list[str]) -> None:
    """Run the worker script ``argv[0]`` with ``argv[1:]`` as ``__main__``, as ``python SCRIPT ARGS`` would
    (its folder first on ``sys.path``), with the patches installed first (when :func:`install` allows)."""
    import runpy

    script = os.path.realpath(argv[0])
    if install():
        print(f"serve.torchserve: worker patches on (TorchServe {SUPPORTED_VERSION}: retrieve_msg, "
              f"Service.predict), pid {os.getpid()}", flush=True)
    sys.argv[:] = argv
    if sys.path and sys.path[0] != os.path.dirname(script):
        sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")
