"""Following one request: its request ID, its W3C trace context in the worker's log lines, and its timing.

A request's ID is the caller's ``X-Request-ID`` when it sent a usable one, else the ID TorchServe's frontend
gave the job; the frontend writes it into the answer's ``X-Request-ID`` header and the access log
(serve/torchserve/java/Session.java), the handler into error bodies (``request_id``) and log lines.
A ``traceparent`` header (W3C Trace Context) is read; while a batch runs, the worker's log lines name the
request IDs and trace IDs of that batch (:class:`LogContext`). ``Server-Timing`` names the stages of a
request in milliseconds; its queue time comes from the ID the frontend gave the job (:func:`received_us`).
The formats: docs/protocols.md, "Request IDs and timing".
"""
from __future__ import annotations

import logging
import re

REQUEST_ID = "x-request-id"  # request header names arrive lowercased
TRACEPARENT = "traceparent"
SERVER_TIMING = "Server-Timing"
REQUEST_ID_HEADER = "X-Request-ID"  # an answer's; the frontend keeps the one a handler sets
MAX_ID_LENGTH = 128
_USABLE_ID = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_ID_LENGTH)  # printable ASCII, no spaces: safe in a header
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def usable_id(value) -> str | None:
    """``value`` as a request ID when it is 1-128 printable ASCII characters without spaces, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and _USABLE_ID.fullmatch(value):
        return value
    return None


def request_id(headers: dict[str, str], fallback: str | None = None) -> str | None:
    """The request's ID: header ``X-Request-ID`` when usable, else ``fallback`` (TorchServe's)."""
    value = headers.get(REQUEST_ID)
    return fallback if value is None else usable_id(value) or fallback


def trace_id(headers: dict[str, str]) -> str | None:
    """The trace ID of a valid ``traceparent`` header (version not ``ff``, IDs not all zeros), else None."""
    value = headers.get(TRACEPARENT)
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    match = _TRACEPARENT.match(value)
    if not match or (match.group(1) == "00" and len(value) != 55) or (len(value) > 55 and value[55] != "-") \
            or match.group(1) == "ff" or set(match.group(2)) == {"0"} or set(match.group(3)) == {"0"}:
        return None
    return match.group(2)


def received_us(frontend_id) -> int | None:
    """When the frontend received a request, in µs since the epoch, read from the ID it gave the job: a UUID
    version 7 whose 12 bits after the version hold the sub-millisecond fraction (RFC 9562 method 3; made by
    serve/torchserve/java/RequestIds.java ``newId``). None for any other ID."""
    if type(frontend_id) is not str or len(frontend_id) != 36 or frontend_id[14] != "7":
        return None
    try:  # the first 64 bits, one parse: 48 of milliseconds, 4 of version, 12 of fraction
        high = int(frontend_id[:18].replace("-", ""), 16)
    except ValueError:
        return None
    return (high >> 16) * 1000 + (high & 0xFFF) * 1000 // 4096


def queue_ms(frontend_id, now_us: int) -> float | None:
    """Milliseconds from the frontend receiving the request named ``frontend_id`` (:func:`received_us`) to
    ``now_us`` (µs since the epoch), or None when the ID does not say."""
    received = received_us(frontend_id)
    return None if received is None else max(0.0, (now_us - received) / 1000)


_PREDICTION_TIMING = "queue;dur=%.3f, decode;dur=%.3f, infer;dur=%.3f, encode;dur=%.3f"  # %: faster than f""


def server_timing(stages_ms: dict[str, float | None]) -> str:
    """A ``Server-Timing`` value: ``decode;dur=0.120, infer;dur=1.400``, stages in the order given (None: left
    out), durations in ms."""
    if len(stages_ms) == 4:  # a served prediction: one format (a fifth of the generic join's cost)
        try:
            return _PREDICTION_TIMING % (stages_ms["queue"], stages_ms["decode"], stages_ms["infer"],
                                         stages_ms["encode"])
        except (KeyError, TypeError):  # other stages, or one of them None
            pass
    return ", ".join(f"{name};dur={ms:.3f}" for name, ms in stages_ms.items() if ms is not None)


class LogContext(logging.Filter):
    """On the root logger's handlers: while a batch runs, each log line ends with the batch's request IDs
    (and trace IDs, when a request sent a ``traceparent``). ``[METRICS]`` lines stay as they are (the
    frontend parses them)."""

    def __init__(self):
        super().__init__()
        self.suffix = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if self.suffix and isinstance(record.msg, str) and not record.msg.startswith("[METRICS]") \
                and not getattr(record, "_traced", False):
            record.msg = f"{record.msg}{self.suffix}"
            record._traced = True  # several handlers share the record: suffix once
        return True

    def begin(self, request_ids: list, trace_ids: list) -> None:
        """Tag the lines logged from now on with these IDs (None entries are left out)."""
        root = logging.getLogger()
        for handler in root.handlers:
            if self not in handler.filters:
                handler.addFilter(self)
        ids = ",".join(i for i in request_ids if i)
        traces = ",".join(sorted({t for t in trace_ids if t}))
        self.suffix = (f" [request_id={ids}" + (f" trace_id={traces}" if traces else "") + "]") if ids else ""

    def end(self) -> None:
        self.suffix = ""


log_context = LogContext()
