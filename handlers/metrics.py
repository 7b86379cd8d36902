"""Model-quality metrics from the handler, through TorchServe 0.12's custom metrics (``context.metrics``).

What each worker reports, per model (label ``model_name``), to Prometheus at ``:8082/metrics``:

=================================== ========= ================ ===================================================
name                                type      labels           what
=================================== ========= ================ ===================================================
``model_predicted_class_total``     counter   ``class``        predictions per predicted class (digits 0-9; mlp 0/1)
``model_top_class_uncertainty``     histogram                  1 - p(predicted class), one per prediction (classifiers)
``model_regression_output``         histogram                  each predicted value (regression nets)
``model_rejected_inputs_total``     counter   ``reason``       requests answered 4xx/5xx, by :func:`reason` (low cardinality)
``model_stage_duration_seconds``    histogram ``stage``        seconds per batch in ``decode``, ``forward``, ``encode``, ``explain``
=================================== ========= ================ ===================================================

TorchServe adds a ``Hostname`` label. Why 1 - p instead of p: TorchServe 0.12 builds every histogram
with the Prometheus client's default buckets (0.005 ... 10; the metrics YAML cannot set buckets), which
resolve 1 - p finely where it matters (p >= 0.995, 0.99, 0.975, 0.95, 0.925, 0.9, 0.75, 0.5, 0.25) and
p itself hardly at all. The same default buckets make stage durations' quantiles coarse below 5 ms; the
mean (``_sum`` / ``_count``) is exact.

With ``metrics_mode=prometheus`` TorchServe only exports metrics declared in its metrics YAML
(``serve/metrics.yaml``, passed as ``metrics_config`` by serve/server.py). A worker checks the YAML it was
given (``context.metrics``) at start-up and reports only what is declared there, so a server without
the YAML costs nothing here.

The handler collects a batch's observations and writes them in ONE log record, one line each in the
``[METRICS]`` format the frontend parses (wire/metric_lines.py, shipped in the archive)
instead of one ``logging`` call per observation; with the worker patches on, that record joins the
worker's ``PredictionTime`` line (serve/torchserve/worker.py). Measured cost: README.md.
"""
from __future__ import annotations

import logging
import re
from collections import Counter

import numpy as np

from wire.metric_lines import label, line_end, line_parts

logger = logging.getLogger(__name__)

PREDICTED_CLASS = "model_predicted_class_total"
UNCERTAINTY = "model_top_class_uncertainty"
REGRESSION_OUTPUT = "model_regression_output"
REJECTED = "model_rejected_inputs_total"
STAGE_SECONDS = "model_stage_duration_seconds"

# name → (TorchServe metric type, unit, dimension names in order); serve/metrics.yaml declares the same.
DECLARED = {
    PREDICTED_CLASS: ("counter", "count", ("model_name", "class")),
    UNCERTAINTY: ("histogram", "ratio", ("model_name",)),
    REGRESSION_OUTPUT: ("histogram", "value", ("model_name",)),
    REJECTED: ("counter", "count", ("model_name", "reason")),
    STAGE_SECONDS: ("histogram", "seconds", ("model_name", "stage")),
}

# First match wins; the message is the InputError's (handlers/decoding.py, protocols.py, explain.py).
REASONS = (
    ("explanation", re.compile(r"explain|target|^steps ")),
    ("empty_body", re.compile(r"^empty request body|^no request body|^malformed request")),
    ("malformed_json", re.compile(r"malformed JSON|not UTF-8|neither UTF-8|not valid JSON")),
    ("bad_shape", re.compile(r"^expected |shape|ragged|nested|empty list|holds \d+ values")),
    ("bad_image", re.compile(r"image|PNG|JPEG|base64")),
    ("bad_value", re.compile(r"NaN|infinite|intensities|float32 range|too large for a float|needs integer|"
                             r"allows values|must be a number|array of numbers")),
    ("bad_protocol", re.compile(r"inputs|outputs|instances|parameters|Inference-Header|binary|datatype|'data'")),
)


def reason(status: int, message: str) -> str:
    """A low-cardinality label for a refused request: ``too_large`` (413), ``internal_error`` (5xx),
    else the first of :data:`REASONS` whose pattern the message matches, else ``invalid_input``."""
    if status == 413:
        return "too_large"
    if status >= 500:
        return "internal_error"
    for name, pattern in REASONS:
        if pattern.search(message):
            return name
    return "invalid_input"


class ModelMetrics:
    """Collects one batch's observations (``begin`` … ``flush``) and writes them in one record."""

    def __init__(self, metrics_cache, model_name: str, task: str):
        self.model_name = label(model_name)
        self.task = task
        self.enabled = declared(metrics_cache)
        self.lines: list[str] = []
        self._parts: dict[tuple, tuple[str, str]] = {}  # (name, labels) → (line head, line tail before hostname)
        self.write = logger.info  # where flush() sends the batch's record

    def begin(self) -> None:
        self.lines = []

    def _line_parts(self, name: str, labels: tuple[str, ...]) -> tuple[str, str]:
        parts = self._parts.get((name, labels))
        if parts is None:
            kind, unit, dims = DECLARED[name]
            parts = self._parts[(name, labels)] = line_parts(name, unit, zip(dims, (self.model_name, *labels)), kind)
        return parts

    def _add(self, name: str, value, labels: tuple[str, ...] = ()) -> None:
        head, tail = self._line_parts(name, labels)
        self.lines.append(f"{head}{value}{tail}")

    def stage(self, stage: str, seconds: float) -> None:
        if self.enabled:
            self._add(STAGE_SECONDS, f"{seconds:.9f}", (stage,))

    def rejected(self, status: int, message: str) -> None:
        if self.enabled:
            self._add(REJECTED, 1, (reason(status, message),))

    def predictions(self, answered: list[dict[str, np.ndarray]]) -> None:
        """Class counts and top-class uncertainty (classifiers, mlp) or output values (regression) of the
        answered requests' named outputs (handlers' ``postprocess``)."""
        if not self.enabled or not answered:
            return
        if "predicted_class" in answered[0]:
            classes = np.concatenate([named["predicted_class"] for named in answered])
            for cls, count in sorted(Counter(classes.tolist()).items()):
                self._add(PREDICTED_CLASS, count, (str(cls),))
            p = np.concatenate([named["probabilities"] for named in answered]).astype(np.float64)
            top = p.max(axis=1) if p.ndim == 2 else np.maximum(p, 1 - p)
            head, tail = self._line_parts(UNCERTAINTY, ())
            self.lines += [f"{head}{value:.6g}{tail}" for value in np.maximum(1.0 - top, 0.0).tolist()]
        elif "predictions" in answered[0]:
            values = np.concatenate([np.ravel(named["predictions"]) for named in answered]).astype(np.float64)
            head, tail = self._line_parts(REGRESSION_OUTPUT, ())
            self.lines += [f"{head}{value:.6g}{tail}" for value in values[np.isfinite(values)].tolist()]

    def flush(self) -> None:
        """Write the batch's observations: one record, one ``[METRICS]`` line each."""
        if not self.lines:
            return
        suffix = line_end() + "\n"
        self.write(suffix.join(self.lines) + suffix[:-1])
        self.lines = []


def declared(metrics_cache) -> bool:
    """True when the worker's metrics YAML declares every metric of :data:`DECLARED` with its dimensions."""
    if metrics_cache is None:
        return False
    try:
        from ts.metrics.metric_type_enum import MetricTypes

        for name, (kind, _, dims) in DECLARED.items():
            metric = metrics_cache.get_metric(name, MetricTypes(kind))
            if tuple(metric.dimension_names or ()) != dims:
                logger.warning("metric %s is declared with dimensions %s, not %s: model metrics off",
                               name, metric.dimension_names, list(dims))
                return False
    except Exception as err:  # not declared (MetricsCacheKeyError) or no TorchServe metrics cache
        logger.info("model-quality metrics off: %s", err)
        return False
    return True
