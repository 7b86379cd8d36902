"""The ``[METRICS]`` line a TorchServe 0.12 worker prints and its frontend parses: the one formatter.

TorchServe's own metrics cache writes one ``logging`` call per observation
(``ts.metrics.caching_metric.CachingMetric.emit_metrics``); the handlers' model-quality metrics
(handlers/metrics.py) and the leaner worker's ``PredictionTime`` (serve/torchserve/worker.py) write the
same lines through these functions instead, a batch at a time. Here, not in serve/torchserve/ with the
rest of our TorchServe coupling: the handlers import it, and wire/ ships inside every archive, so a handler
emits its metrics with the worker patches off and outside this checkout too (docs/torchserve-patches.md).
"""
from __future__ import annotations

import re
import socket
import time

_hostname: list[str] = []


def hostname() -> str:
    """``socket.gethostname()``, asked once per process (TorchServe asks it per line)."""
    if not _hostname:
        _hostname.append(socket.gethostname())
    return _hostname[0]


def label(value) -> str:
    """A dimension value the frontend's parser accepts (no ',', ':', '|' or white space)."""
    return re.sub(r"[,:|\s]", "_", str(value))


def line_parts(name: str, unit: str, dimensions, kind: str) -> tuple[str, str]:
    """The text before and after the value: ``[METRICS]<name>.<unit>:`` and ``|#<d:v,...>|#type:<KIND>``.

    ``dimensions``: ``(name, value)`` pairs in order; ``kind``: counter, gauge or histogram."""
    dims = ",".join(f"{d}:{v}" for d, v in dimensions)
    return f"[METRICS]{name}.{unit}:", f"|#{dims}|#type:{kind.upper()}"


def line_end(timestamp: int | None = None, request_ids: str = "") -> str:
    """The text after ``line_parts``' tail: ``|#hostname:<host>,<unix seconds>`` and ``,<request ids>``."""
    stamp = int(time.time()) if timestamp is None else timestamp
    return f"|#hostname:{hostname()},{stamp}" + (f",{request_ids}" if request_ids else "")


def metric_line(name: str, unit: str, value, dimensions, kind: str, request_ids: str = "",
                timestamp: int | None = None) -> str:
    """One whole line, as ``CachingMetric.emit_metrics`` writes it."""
    head, tail = line_parts(name, unit, dimensions, kind)
    return f"{head}{value}{tail}{line_end(timestamp, request_ids)}"
