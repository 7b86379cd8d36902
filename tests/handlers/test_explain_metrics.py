"""Model-quality metrics (handlers/metrics.py): declared in serve/metrics.yaml, written in the exact
line format TorchServe's frontend parses, low-cardinality reasons, nothing when undeclared."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import ts
import yaml
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers import metrics
from paths import REPO_ROOT
from test_handlers import digits, keep_torch_threads, png, run_batch, serve  # noqa: F401

YAML = REPO_ROOT / "serve" / "metrics.yaml"
# org.pytorch.serve.metrics.Metric's parser (TorchServe 0.12 frontend), as a Python regex.
FRONTEND_PATTERN = re.compile(
    r"\s*([\w\s]+)\.([\w\s]+):([0-9\-,.e]+)\|#([^|]*)(\|#type:([^|,]+))?\|#hostname:([^,]+),([^,]+)(,(.*))?"
)


def parse(records: list[str]) -> list[tuple[str, float, dict, str]]:
    """(name, value, dimensions, type) of every [METRICS] line, checked against the frontend's pattern."""
    found = []
    for record in records:
        for line in record.splitlines():
            assert line.startswith("[METRICS]"), line
            match = FRONTEND_PATTERN.fullmatch(line[len("[METRICS]"):])
            assert match, line
            dims = dict(d.split(":", 1) for d in match.group(4).split(","))
            found.append((match.group(1), float(match.group(3)), dims, match.group(6)))
    return found


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.INFO, logger="handlers.metrics")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "handlers.metrics" and r.getMessage().startswith("[METRICS]")]


def cache() -> MetricsCacheYamlImpl:
    metrics_cache = MetricsCacheYamlImpl(config_file_path=str(YAML))
    metrics_cache.initialize_cache()
    return metrics_cache


def test_yaml_declares_exactly_the_handler_metrics_and_keeps_torchserve_defaults():
    config = yaml.safe_load(YAML.read_text())
    declared = {(kind, m["name"]): (m["unit"], tuple(m["dimensions"]))
                for kind, entries in config["model_metrics"].items() for m in entries}
    for name, (kind, unit, dims) in metrics.DECLARED.items():
        assert declared[(kind, name)] == (unit, dims)
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name) and all(re.fullmatch(r"[a-z_]+", d) for d in dims)
    assert metrics.STAGE_SECONDS.endswith("_seconds") and metrics.DECLARED[metrics.STAGE_SECONDS][0] == "histogram"
    assert all(name.endswith("_total") for name, (kind, _, _) in metrics.DECLARED.items() if kind == "counter")
    # TorchServe's own frontend metrics stay declared (ts_inference_requests_total and friends).
    stock = yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())
    assert config["ts_metrics"] == stock["ts_metrics"]
    assert metrics.declared(cache())


def test_undeclared_metrics_are_off():
    assert not metrics.declared(None)
    empty = MetricsCacheYamlImpl(config_file_path=str(YAML))  # parsed but not initialised: nothing declared
    assert not metrics.declared(empty)


@pytest.mark.parametrize("status, message, reason", [
    (413, "too many samples: 2000 > 1024 per request; split the request", "too_large"),
    (500, "inference failed: RuntimeError", "internal_error"),
    (400, "malformed JSON: Expecting value: line 1 column 1 (char 0)", "malformed_json"),
    (400, "empty request body; send JSON like {\"data\": [...]} or a PNG/JPEG image", "empty_body"),
    (400, "only PNG and JPEG images are accepted; the body looks like a GIF image", "bad_image"),
    (400, "pixel values must be intensities in [0, 1]; got values in [0, 255]", "bad_value"),
    (400, "data[0] is nan; NaN and infinite values are not allowed", "bad_value"),
    (400, "expected one 28x28 image, a flat 784-vector, or a list of N of either; got 5 values", "bad_shape"),
    (400, "'inputs' must be a list holding exactly one input tensor; got 2 inputs", "bad_protocol"),
    (400, "cannot explain target 10: model 'mnistnet' has classes 0-9", "explanation"),
    (400, "steps must be an integer from 1 to 256 (the cap); got 1000", "explanation"),
    (400, "something new", "invalid_input"),
])
def test_reasons(status, message, reason):
    assert metrics.reason(status, message) == reason


def test_a_batch_reports_classes_uncertainty_stages_and_rejections_in_one_record(tmp_path, digits, records):
    handler, context, reference = serve("mnistnet", tmp_path)
    handler.metrics = metrics.ModelMetrics(cache(), "mnistnet", "classification")
    assert handler.metrics.enabled
    requests = [{"body": png(digits[0])}, {"body": {"data": (digits[:3] / 255.0).tolist()}}, {"body": b"{"}]
    answers = run_batch(handler, context, requests)
    assert len(records()) == 1  # the whole batch in one log record
    found = parse(records())
    classes = {d["class"]: v for n, v, d, _ in found if n == metrics.PREDICTED_CLASS}
    predicted = [answers[0]["predicted_class"]] + [a["predicted_class"] for a in answers[1]]
    assert classes == {str(k): predicted.count(k) for k in set(predicted)}
    uncertainty = [v for n, v, _, t in found if n == metrics.UNCERTAINTY]
    assert len(uncertainty) == 4 and all(0 <= u <= 0.9 for u in uncertainty)
    assert {t for n, _, _, t in found if n == metrics.UNCERTAINTY} == {"HISTOGRAM"}
    top = [max(answers[0]["probabilities"])] + [max(a["probabilities"]) for a in answers[1]]
    np.testing.assert_allclose(uncertainty, 1 - np.array(top), atol=1e-5)
    stages = {d["stage"] for n, _, d, _ in found if n == metrics.STAGE_SECONDS}
    assert stages == {"decode", "forward", "encode"}
    assert [(d["reason"], v) for n, v, d, _ in found if n == metrics.REJECTED] == [("malformed_json", 1.0)]
    assert all(d["model_name"] == "mnistnet" for _, _, d, _ in found)
    assert {t for *_, t in found} <= {"COUNTER", "HISTOGRAM"}


def test_explanations_report_their_stage_and_regression_outputs_their_values(tmp_path, digits, records):
    (tmp_path / "m").mkdir()
    (tmp_path / "r").mkdir()
    handler, context, _ = serve("mnistnet", tmp_path / "m")
    handler.metrics = metrics.ModelMetrics(cache(), "mnistnet", "classification")
    run_batch(handler, context, [{"body": png(digits[0])}], [{"explain": "True", "url_path": "explanations/mnistnet"}])
    assert {d.get("stage") for n, _, d, _ in parse(records()) if n == metrics.STAGE_SECONDS} >= {"decode", "explain"}

    handler, context, reference = serve("regressionnet", tmp_path / "r")
    handler.metrics = metrics.ModelMetrics(cache(), "regressionnet", "regression")
    (answer,) = run_batch(handler, context, [{"body": {"data": [[0.1] * 10, [-0.3] * 10]}}])
    values = [v for n, v, d, _ in parse(records()[-1:]) if n == metrics.REGRESSION_OUTPUT]
    np.testing.assert_allclose(values, answer["predictions"], rtol=1e-5)


def test_no_metrics_without_declaration(tmp_path, digits, records):
    handler, context, _ = serve("mnistnet", tmp_path)  # Context without a metrics cache
    assert not handler.metrics.enabled
    run_batch(handler, context, [{"body": png(digits[0])}, {"body": b"{"}])
    assert records() == []
