"""Leaner pieces of TorchServe 0.12's Python worker loop, installed once per worker by ServingHandler.initialize.

TorchServe's worker (ts/model_service_worker.py) reads each batch from the frontend's socket one field at
a time (``otf_message_handler``: two or three ``recv`` calls per header and parameter), logs an INFO line
``Backend received inference at: ...`` per batch (which the frontend then reads back and parses), and
emits ``PredictionTime`` through its metrics cache (validation, dimension objects, a logging call). Under
load that was ~30% of a worker's time for a single-image request. This module replaces, for the worker
it runs in and with the same wire format and results:

* ``retrieve_msg``: one buffered reader per socket (a ``recv`` per ~64 kB instead of per field), the same
  message dicts (``requestId``, ``headers``, ``parameters`` with TorchServe's JSON/text decoding of
  values, ``TS_DECODE_INPUT_REQUEST`` honoured; JSON through orjson when it accepts the text, see
  handlers/jsoncodec.json_loads) and the same per-batch INFO line (tests count batches with it);
* ``Service.predict``: the same steps and error answers (507/503 for out-of-memory, handler exceptions, a
  wrong response count), ``PredictionTime`` written as the same ``[METRICS]`` line, and the response frame
  built in one ``join``. Anything unusual (streaming, non-bytes answers) goes through TorchServe's own
  ``create_predict_response``.

The batch's metric lines (the handler's model metrics through :func:`batch_log`, then PredictionTime) leave
in ONE logging record after the batch: one write to stdout for them instead of two, so the frontend's
reader thread wakes once less per batch. The INFO line still goes out when the batch arrives (it tells
that the worker took the batch), and so do the handler's own log lines (warnings, tracebacks).

Nothing here changes what a client sees: per-request statuses, headers and bodies are TorchServe's frames.
``SERVE_FAST_WORKER=0`` in the server's environment keeps TorchServe's own pieces (to compare: bench.profile).
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import time

from handlers.jsoncodec import json_loads

logger = logging.getLogger("ts.service")

_INT = struct.Struct("!i")
_TWO_INTS = struct.Struct("!ii")
_END = _INT.pack(-1)
_installed = False


class _Reader:
    """Buffered reads of exact lengths from the frontend's socket; exits like TorchServe when it closes."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.file = conn.makefile("rb", buffering=1 << 16)

    def read(self, n: int) -> bytes:
        data = self.file.read(n)
        if len(data) < n:
            logging.info("Frontend disconnected.")
            sys.exit(0)
        return data

    def int(self) -> int:
        return _INT.unpack(self.read(4))[0]

    def blob(self, n: int) -> bytearray:
        """``n`` bytes as the bytearray TorchServe's reader hands over."""
        return bytearray(self.read(n))


_reader: _Reader | None = None
_batch_lines: list[str] = []  # this batch's metric lines, written in one record when its answer is ready


def batch_log(text: str) -> None:
    """Add ``text`` (one or more lines) to the batch's record instead of logging it now."""
    _batch_lines.append(text)


def _write_batch_lines() -> None:
    if _batch_lines:
        logging.getLogger().info("\n".join(_batch_lines))
        _batch_lines.clear()


def retrieve_msg(conn: socket.socket):
    """``(command, message)`` like ``ts.protocol.otf_message_handler.retrieve_msg``, through one buffer."""
    global _reader
    if _reader is None or _reader.conn is not conn:
        _reader = _Reader(conn)
    cmd = _reader.blob(1)
    if cmd == b"I":
        msg = _inference_msg(_reader)
        logging.info("Backend received inference at: %d", time.time())  # kept: the line marks a batch in model_log
        _batch_lines.clear()
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
            return json_loads(value.decode("utf-8"))
        except Exception:
            logging.warning("Failed json decoding of input data. Forwarding encoded payload")
    elif content_type.startswith("text"):
        try:
            return value.decode("utf-8")
        except Exception:
            logging.warning("Failed utf-8 decoding of input data. Forwarding encoded payload")
    return value


def predict(self, batch):
    """``ts.service.Service.predict`` with a cheaper PredictionTime line and response frame; then the batch's
    log lines in one record."""
    try:
        return _predict(self, batch)
    finally:
        _write_batch_lines()


def _predict(self, batch):
    from ts.service import PREDICTION_METRIC, PredictionException, Service, create_predict_response

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
        return create_predict_response(None, req_id_map, "Out of resources", 507)
    except PredictionException as e:
        logger.error("Prediction error", exc_info=True)
        return create_predict_response(None, req_id_map, e.message, e.error_code)
    except Exception as ex:
        if "CUDA" in str(ex):
            logger.error("CUDA out of memory", exc_info=True)
            return create_predict_response(None, req_id_map, "Out of resources", 507)
        logger.warning("Invoking custom service failed.", exc_info=True)
        return create_predict_response(None, req_id_map, "Prediction failed", 503)
    if not isinstance(ret, list):
        logger.warning("model: %s, Invalid return type: %s.", context.model_name, type(ret))
        return create_predict_response(None, req_id_map, "Invalid model predict output", 503)
    if len(ret) != len(input_batch):
        logger.warning("model: %s, number of batch response mismatched, expect: %d, got: %d.",
                       context.model_name, len(input_batch), len(ret))
        return create_predict_response(None, req_id_map, "number of batch response mismatched", 503)
    duration = round((time.time() - start_time) * 1000, 2)
    _prediction_time(context, duration, req_id_map, PREDICTION_METRIC)
    frame = _response_frame(ret, req_id_map, context)
    if frame is None:
        return create_predict_response(ret, req_id_map, "Prediction success", 200, context=context)
    return frame


def _prediction_time(context, duration: float, req_id_map: dict, name: str) -> None:
    """The ``[METRICS]`` line ``metrics.add_time(name, duration)`` writes, added to the batch's record."""
    metric_str = (f"[METRICS]{name}.ms:{duration}|#ModelName:{context.model_name},Level:Model|#type:GAUGE|"
                  f"#hostname:{_hostname()},{int(time.time())}")
    batch_log(f"{metric_str},{','.join(req_id_map.values())}")


_host: list[str] = []


def _hostname() -> str:
    if not _host:
        _host.append(socket.gethostname())
    return _host[0]


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


def install() -> bool:
    """Swap the pieces into TorchServe's worker modules (once); False when not inside a TorchServe worker."""
    global _installed
    if _installed:
        return True
    if os.environ.get("SERVE_FAST_WORKER", "1") == "0":
        return False
    try:
        import ts.service as service
        from ts.protocol import otf_message_handler
    except ImportError:
        return False
    # A worker runs ts/model_service_worker.py as __main__ (plainly or forked: serve/forkserver.py), which
    # imported retrieve_msg by name; anywhere else (tests, tools) nothing is touched.
    loop = sys.modules.get("__main__")
    if getattr(loop, "retrieve_msg", None) is not otf_message_handler.retrieve_msg:
        return False
    loop.retrieve_msg = retrieve_msg
    service.Service.predict = predict
    _installed = True
    return True
