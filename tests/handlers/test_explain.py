"""Explanations (handlers/explain.py) through the real handlers and TorchServe's Context objects.

The header ``explain: True`` is what TorchServe sets on /explanations (with ``url_path``), on
``/v1/models/{m}:explain`` and ``/v2/models/{m}/explain`` (without ``url_path``).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explain_reference import ATOL, assert_matches_captum, binary_forward, captum_ig, regression_forward
from handlers import explain
from test_handlers import digits, keep_torch_threads, png, run_batch, serve, softmax_of, statuses  # noqa: F401
from train.data import normalize_images

NATIVE = {"explain": "True", "url_path": "explanations/mnistnet"}
KSERVE = {"explain": "True"}  # /v1/models/{m}:explain and /v2/models/{m}/explain
PREDICT = {"explain": "False", "url_path": "predictions/mnistnet"}


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return serve("mnistnet", tmp_path_factory.mktemp("mnist"))


def logits(reference, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.as_tensor(x, dtype=torch.float32)).numpy()


def black(n: int = 1) -> np.ndarray:
    return normalize_images(np.zeros((n, 28, 28), np.uint8)).reshape(n, 784).numpy()


def test_png_explanation_is_a_28x28_map_for_the_predicted_class(mnist, digits):
    handler, context, reference = mnist
    (answer,) = run_batch(handler, context, [{"body": png(digits[0])}], [NATIVE])
    assert statuses(context, 1) == [200]
    expected = softmax_of(reference, digits[:1])[0]
    assert answer["predicted_class"] == answer["target"] == int(expected.argmax())
    np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-6)
    attributions = np.asarray(answer["attributions"])
    assert attributions.shape == (28, 28)
    assert answer["method"] == "integrated_gradients" and answer["steps"] == explain.DEFAULT_STEPS
    assert "black image" in answer["baseline"] and "-0.4242" in answer["baseline"]
    # Completeness: the map adds up to logit(x) - logit(black) for the target, up to the stated delta.
    x = normalize_images(digits[:1]).reshape(1, 784).numpy()
    gap = logits(reference, x)[0, answer["target"]] - logits(reference, black())[0, answer["target"]]
    assert attributions.sum() - gap == pytest.approx(answer["convergence_delta"], abs=1e-3)
    assert abs(answer["convergence_delta"]) < 0.05 * max(1.0, abs(gap))
    # Where there is no ink the input equals the baseline, so attribution is exactly 0 there.
    assert np.all(attributions[digits[0] == 0] == 0)


def test_captum_agrees(mnist, digits):
    """The served map equals Captum's IntegratedGradients run directly on the same network."""
    from captum.attr import IntegratedGradients

    handler, context, reference = mnist
    (answer,) = run_batch(handler, context, [{"body": {"data": (digits[1] / 255.0).tolist(), "target": 3}}], [NATIVE])
    x = normalize_images(digits[1:2]).reshape(1, 784)
    direct = IntegratedGradients(reference).attribute(x, baselines=torch.from_numpy(black()), target=3, n_steps=50)
    assert answer["target"] == 3
    np.testing.assert_allclose(np.reshape(answer["attributions"], (1, 784)), direct.detach().numpy(), atol=1e-5)


def test_non_default_steps_match_captum(mnist, digits):
    """steps=7 and steps=100, predicted and named targets, in one batch: each map and delta is Captum's."""
    handler, context, reference = mnist
    images = (digits[:3] / 255.0).tolist()
    answers = run_batch(handler, context, [{"body": {"data": images, "steps": 7}},
                                           {"body": {"data": images, "steps": 100, "target": [3, 1, 4]}}], [NATIVE] * 2)
    assert statuses(context, 2) == [200, 200]
    x = normalize_images(digits[:3]).reshape(3, 784).numpy()
    predicted = logits(reference, x).argmax(axis=1).tolist()
    assert [a["target"] for a in answers[0]] == predicted and [a["target"] for a in answers[1]] == [3, 1, 4]
    seven = captum_ig(reference, x, black(), predicted, 7)
    assert_matches_captum(answers[0], seven, 7)
    assert_matches_captum(answers[1], captum_ig(reference, x, black(), [3, 1, 4], 100), 100)
    # The steps matter: 7 Gauss-Legendre points give another map than the default 50, well beyond ATOL.
    fifty = captum_ig(reference, x, black(), predicted, explain.DEFAULT_STEPS)
    assert np.abs(seven[0] - fifty[0]).max() > 100 * ATOL


def test_a_batch_mixes_explanations_predictions_and_errors(mnist, digits):
    handler, context, reference = mnist
    images = (digits[:3] / 255.0).tolist()
    requests = [
        {"body": png(digits[0])},                                   # prediction
        {"body": {"data": images, "target": [1, 2, 3]}},            # 3 explanations, one target each
        {"body": {"data": images[0], "target": 10}},                # cannot be explained: 400
        {"body": png(digits[4]), "target": bytearray(b"5")},        # target as a multipart form field
        {"body": {"data": images[:2], "steps": 8}},                 # other steps: a second Captum call
        {"body": {"data": [[0.5] * 5]}},                            # bad input: 400 like a prediction
    ]
    headers = [PREDICT, NATIVE, NATIVE, NATIVE, NATIVE, NATIVE]
    answers = run_batch(handler, context, requests, headers)
    assert statuses(context, 6) == [200, 200, 400, 200, 200, 400]
    assert answers[0]["predicted_class"] == int(softmax_of(reference, digits[:1]).argmax())
    assert "attributions" not in answers[0]
    assert [a["target"] for a in answers[1]] == [1, 2, 3]
    assert all(np.shape(a["attributions"]) == (28, 28) for a in answers[1])
    assert answers[2] == {"error": "cannot explain target 10: model 'mnistnet' has classes 0-9", "code": 400,
                          "request_id": context.get_request_id(2)}
    assert answers[3]["target"] == 5
    assert [a["steps"] for a in answers[4]] == [8, 8]
    assert "expected one 28x28 image" in answers[5]["error"]
    # Explaining one image alone gives the same map as inside the batch.
    (alone,) = run_batch(handler, context, [{"body": {"data": images[1], "target": 2}}], [NATIVE])
    np.testing.assert_allclose(alone["attributions"], answers[1][1]["attributions"], atol=1e-6)


@pytest.mark.parametrize("body, status, fragment", [
    ({"data": [[0.0] * 784] * (explain.MAX_EXPLAIN_SAMPLES + 1)}, 413, f"> {explain.MAX_EXPLAIN_SAMPLES} per request"),
    ({"data": [0.0] * 784, "steps": explain.MAX_STEPS + 1}, 400, f"from 1 to {explain.MAX_STEPS} (the cap)"),
    ({"data": [0.0] * 784, "steps": 0}, 400, "steps must be an integer"),
    ({"data": [0.0] * 784, "steps": 2.5}, 400, "steps must be an integer"),
    ({"data": [0.0] * 784, "target": -1}, 400, "cannot explain target -1"),
    ({"data": [0.0] * 784, "target": True}, 400, "target must be an integer"),
    ({"data": [0.0] * 784, "target": "7"}, 400, "target must be an integer"),
    ({"data": [[0.0] * 784] * 2, "target": [1]}, 400, "target lists 1 classes for 2 sample(s)"),
])
def test_explanations_that_cannot_be_computed_are_4xx(mnist, body, status, fragment):
    handler, context, _ = mnist
    (answer,) = run_batch(handler, context, [{"body": body}], [NATIVE])
    assert statuses(context, 1) == [status]
    assert answer["code"] == status and fragment in answer["error"], answer


def test_parameters_in_headers_and_form_fields(mnist, digits):
    handler, context, _ = mnist
    answers = run_batch(handler, context, [
        {"body": png(digits[0])}, {"body": png(digits[0]), "steps": b"many"}, {"body": png(digits[0])},
        {"body": {"data": (digits[0] / 255.0).tolist(), "target": 6}},
    ], [{**NATIVE, "X-Explain-Target": "2", "X-Explain-Steps": "12"}, NATIVE,
        {**NATIVE, "x-explain-target": "1e3"}, {**NATIVE, "X-Explain-Target": "2"}])
    assert statuses(context, 4) == [200, 400, 400, 200]
    assert (answers[0]["target"], answers[0]["steps"]) == (2, 12)
    assert "form field 'steps' must be an integer" in answers[1]["error"]
    assert "header X-Explain-Target must be an integer" in answers[2]["error"]
    assert answers[3]["target"] == 6  # the JSON body wins over the header


def test_kserve_v1_explain(mnist, digits):
    handler, context, reference = mnist
    body = {"instances": (digits[:2] / 255.0).tolist(), "parameters": {"target": 4}}
    (answer,) = run_batch(handler, context, [{"body": body}], [KSERVE])
    assert statuses(context, 1) == [200]
    assert [e["target"] for e in answer["explanations"]] == [4, 4]
    assert np.shape(answer["explanations"][0]["attributions"]) == (28, 28)
    x = normalize_images(digits[:2]).reshape(2, 784).numpy()
    assert_matches_captum(answer["explanations"], captum_ig(reference, x, black(), 4, explain.DEFAULT_STEPS),
                          explain.DEFAULT_STEPS)
    # steps among the KServe parameters
    (answer,) = run_batch(handler, context, [{"body": {**body, "parameters": {"target": 4, "steps": 24}}}], [KSERVE])
    assert_matches_captum(answer["explanations"], captum_ig(reference, x, black(), 4, 24), 24)


def test_oip_explain(mnist, digits):
    handler, context, reference = mnist
    body = {"id": "x1", "inputs": [{"name": "input", "shape": [2, 784], "datatype": "UINT8",
                                    "data": digits[:2].reshape(-1).tolist()}], "parameters": {"steps": 16}}
    (answer,) = run_batch(handler, context, [{"body": body}], [KSERVE])
    assert statuses(context, 1) == [200] and answer["id"] == "x1"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["attributions"]["shape"] == [2, 28, 28] and outputs["attributions"]["datatype"] == "FP32"
    expected = softmax_of(reference, digits[:2]).argmax(axis=1).tolist()
    assert outputs["target"]["data"] == outputs["predicted_class"]["data"] == expected
    assert outputs["convergence_delta"]["shape"] == [2] and outputs["probabilities"]["shape"] == [2, 10]
    assert answer["parameters"]["method"] == "integrated_gradients" and answer["parameters"]["steps"] == 16
    # Only some outputs, as the protocol allows; a prediction output name that is not an explanation's → 400.
    only = {**body, "outputs": [{"name": "attributions"}]}
    bad = {**body, "outputs": [{"name": "saliency"}]}
    answers = run_batch(handler, context, [{"body": only}, {"body": bad}], [KSERVE, KSERVE])
    assert [o["name"] for o in answers[0]["outputs"]] == ["attributions"]
    assert statuses(context, 2) == [200, 400] and 'unknown output "saliency"' in answers[1]["error"]


def test_binary_classifier_explains_either_class(tmp_path):
    handler, context, reference = serve("mlp", tmp_path)
    rows = [[1.0, -0.5], [-1.0, 0.5]]
    answers = run_batch(handler, context, [{"body": {"data": rows}}, {"body": {"data": rows, "target": 0}},
                                           {"body": {"data": rows, "target": 2}}], [NATIVE] * 3)
    assert statuses(context, 3) == [200, 200, 400]
    with torch.no_grad():
        p = reference(torch.tensor(rows)).reshape(-1).numpy()
        p0 = reference(torch.zeros(1, 2)).item()
    for a, prob in zip(answers[0], p):
        assert a["predicted_class"] == a["target"] == int(prob >= 0.5)
        assert np.shape(a["attributions"]) == (2,)
        target_p, base_p = (prob, p0) if a["target"] == 1 else (1 - prob, 1 - p0)
        assert sum(a["attributions"]) == pytest.approx(target_p - base_p, abs=abs(a["convergence_delta"]) + 1e-4)
    # Class 0's map is class 1's negated (p(0) = 1 - p(1)).
    np.testing.assert_allclose(np.array(answers[1][0]["attributions"]),
                               -np.array(answers[0][0]["attributions"]) * (1 if answers[0][0]["target"] == 1 else -1),
                               atol=1e-5)
    assert "has classes 0-1" in answers[2]["error"]
    # The values: Captum on p(target), zero-row baseline, default and non-default steps.
    x = np.array(rows, np.float32)
    zero = np.zeros((1, 2), np.float32)
    predicted = [a["target"] for a in answers[0]]
    assert_matches_captum(answers[0], captum_ig(binary_forward(reference), x, zero, predicted, 50), 50)
    assert_matches_captum(answers[1], captum_ig(binary_forward(reference), x, zero, 0, 50), 50)
    (stepped,) = run_batch(handler, context, [{"body": {"data": rows, "target": [1, 0], "steps": 12}}], [NATIVE])
    assert_matches_captum(stepped, captum_ig(binary_forward(reference), x, zero, [1, 0], 12), 12)


def test_regression_attributions_over_features(tmp_path):
    handler, context, reference = serve("regressionnet", tmp_path)
    rows = np.linspace(-1, 1, 20).reshape(2, 10).tolist()
    answers = run_batch(handler, context, [{"body": {"data": rows}}, {"body": {"data": rows, "target": 1}}],
                        [NATIVE] * 2)
    assert statuses(context, 2) == [200, 400]
    with torch.no_grad():
        y = reference(torch.tensor(rows)).reshape(-1).numpy()
        y0 = reference(torch.zeros(1, 10)).item()
    for a, value in zip(answers[0], y):
        assert a["prediction"] == pytest.approx(value, abs=1e-5) and np.shape(a["attributions"]) == (10,)
        assert sum(a["attributions"]) == pytest.approx(value - y0, abs=abs(a["convergence_delta"]) + 1e-4)
        assert a["baseline"] == "zero row: 0 for every feature"
    assert "has one output" in answers[1]["error"]
    x = np.array(rows, np.float32)
    zero = np.zeros((1, 10), np.float32)
    assert_matches_captum(answers[0], captum_ig(regression_forward(reference), x, zero, 0, 50), 50)
    kserve = {"instances": rows, "parameters": {"steps": 9}}
    (answer,) = run_batch(handler, context, [{"body": kserve}], [KSERVE])
    assert_matches_captum(answer["explanations"], captum_ig(regression_forward(reference), x, zero, 0, 9), 9)


def test_predictions_are_unchanged_by_the_explain_header_false(mnist, digits):
    handler, context, reference = mnist
    (answer,) = run_batch(handler, context, [{"body": png(digits[2])}], [PREDICT])
    assert set(answer) == {"predicted_class", "probabilities"}
    assert json.dumps(answer)  # plain JSON
