"""Explanations and model-quality metrics against the real TorchServe of the session (tests/e2e/conftest.py):
/explanations, /v1/models/{m}:explain, /v2/models/{m}/explain, the client and its CLI, Prometheus."""
from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import torch

from e2e_support import normalise_pixels
from explain_reference import assert_matches_captum, binary_forward, captum_ig, regression_forward
from servers import clean_env, post
from handlers.explain import MAX_EXPLAIN_SAMPLES, MAX_STEPS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

from paths import REPO_ROOT as REPO
DIGIT_7 = REPO / "examples" / "digit_7.png"


BLACK = normalise_pixels(np.zeros((1, 28, 28), np.uint8)).reshape(1, 784)  # the digit nets' baseline


def served_model(weights_dir, name: str) -> torch.nn.Module:
    """The in-process network from the weights the session server serves."""
    from models.registry import get_spec

    model = get_spec(name).build()
    model.load_state_dict(torch.load(weights_dir / f"{name}.pt", weights_only=True))
    return model.eval()


def black_logits(weights_dir, name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = served_model(weights_dir, name)
    with torch.no_grad():
        return model(torch.as_tensor(x)).numpy(), model(torch.as_tensor(BLACK)).numpy()


@pytest.mark.parametrize("model", ["mnistnet", "deepnet", "feedforwardnet"])
def test_explanations_route_png(server, weights_dir, mnist_test, model):
    response = post(server, f"/explanations/{model}", data=DIGIT_7.read_bytes(), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["predicted_class"] == answer["target"] == 7
    attributions = np.asarray(answer["attributions"])
    assert attributions.shape == (28, 28)
    assert answer["method"] == "integrated_gradients" and answer["steps"] == 50 and "black image" in answer["baseline"]
    images, labels = mnist_test
    index = int(np.flatnonzero(labels == 7)[0])
    x = normalise_pixels(images[index : index + 1]).reshape(1, 784)
    logits, base = black_logits(weights_dir, model, x)
    gap = logits[0, 7] - base[0, 7]
    assert attributions.sum() - gap == pytest.approx(answer["convergence_delta"], abs=1e-3)
    assert abs(answer["convergence_delta"]) < 0.05 * abs(gap)


def test_target_steps_versions_and_lists(server, mnist_test):
    images, _ = mnist_test
    batch = (images[:3] / 255.0).round(6).tolist()
    response = post(server, "/explanations/mnistnet/1.0", json={"data": batch, "target": [1, 2, 3], "steps": 20})
    assert response.status_code == 200, response.text
    assert [a["target"] for a in response.json()] == [1, 2, 3] and {a["steps"] for a in response.json()} == {20}
    header = post(server, "/explanations/mnistnet", data=DIGIT_7.read_bytes(),
                  headers={"Content-Type": "image/png", "X-Explain-Target": "3", "X-Explain-Steps": "10"})
    assert header.status_code == 200, header.text
    assert (header.json()["target"], header.json()["steps"], header.json()["predicted_class"]) == (3, 10, 7)
    form = post(server, "/explanations/mnistnet", files={"data": ("d.png", DIGIT_7.read_bytes(), "image/png")},
                data={"target": "4"})
    assert form.status_code == 200 and form.json()["target"] == 4, form.text


def test_non_default_steps_match_captum(server, weights_dir, mnist_test):
    """Served maps and deltas for steps other than the default (JSON body, headers) equal Captum's own
    Integrated Gradients on the served weights."""
    images, _ = mnist_test
    model = served_model(weights_dir, "deepnet")
    x = normalise_pixels(images[:3]).reshape(3, 784)
    response = post(server, "/explanations/deepnet", json={"data": (images[:3] / 255.0).tolist(), "steps": 33})
    assert response.status_code == 200, response.text
    predicted = model(torch.as_tensor(x)).argmax(dim=1).tolist()
    assert [a["target"] for a in response.json()] == predicted
    assert_matches_captum(response.json(), captum_ig(model, x, BLACK, predicted, 33), 33)
    header = post(server, "/explanations/deepnet", data=DIGIT_7.read_bytes(),
                  headers={"Content-Type": "image/png", "X-Explain-Target": "2", "X-Explain-Steps": "5"})
    assert header.status_code == 200, header.text
    from PIL import Image

    digit = normalise_pixels(np.asarray(Image.open(DIGIT_7).convert("L"))[None]).reshape(1, 784)
    assert_matches_captum([header.json()], captum_ig(model, digit, BLACK, 2, 5), 5)


def test_kserve_v1_explanations_match_captum(server, weights_dir, mnist_test):
    images, _ = mnist_test
    model = served_model(weights_dir, "mnistnet")
    x = normalise_pixels(images[10:12]).reshape(2, 784)
    instances = (images[10:12] / 255.0).tolist()
    default = post(server, "/v1/models/mnistnet:explain", json={"instances": instances})
    assert default.status_code == 200, default.text
    predicted = model(torch.as_tensor(x)).argmax(dim=1).tolist()
    assert_matches_captum(default.json()["explanations"], captum_ig(model, x, BLACK, predicted, 50), 50)
    chosen = post(server, "/v1/models/mnistnet:explain",
                  json={"instances": instances, "parameters": {"target": 3, "steps": 20}})
    assert chosen.status_code == 200, chosen.text
    assert [e["target"] for e in chosen.json()["explanations"]] == [3, 3]
    assert_matches_captum(chosen.json()["explanations"], captum_ig(model, x, BLACK, 3, 20), 20)


def test_kserve_v1_and_v2_explain(server, mnist_test):
    images, labels = mnist_test
    v1 = post(server, "/v1/models/mnistnet:explain", json={"instances": (images[:2] / 255.0).round(6).tolist()})
    assert v1.status_code == 200, v1.text
    explanations = v1.json()["explanations"]
    assert [e["target"] for e in explanations] == labels[:2].tolist()
    body = {"inputs": [{"name": "input", "shape": [4, 784], "datatype": "UINT8",
                        "data": images[:4].reshape(-1).tolist()}], "parameters": {"steps": 32}}
    v2 = post(server, "/v2/models/mnistnet/explain", json=body)
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert outputs["attributions"]["shape"] == [4, 28, 28]
    assert outputs["target"]["data"] == outputs["predicted_class"]["data"] == labels[:4].tolist()
    assert v2.json()["parameters"]["steps"] == 32


@pytest.mark.parametrize("model, rows, width", [("mlp", [[1.0, -0.5], [-1.0, 0.5], [0.3, 0.2]], 2),
                                                ("regressionnet", np.linspace(-1, 1, 20).reshape(2, 10).tolist(), 10),
                                                ("linearregression", [[2.0], [-0.5]], 1)])
def test_tabular_models_attribute_their_features(server, weights_dir, model, rows, width):
    """Values, not only shapes: Captum on p(target) (mlp) or the prediction (regression nets) from the zero
    row, for the default and a non-default steps, natively and through KServe v1."""
    net = served_model(weights_dir, model)
    forward = binary_forward(net) if model == "mlp" else regression_forward(net)
    x, zero = np.array(rows, np.float32), np.zeros((1, width), np.float32)
    response = post(server, f"/explanations/{model}", json={"data": rows})
    assert response.status_code == 200, response.text
    answers = response.json()
    assert len(answers) == len(rows) and all(np.shape(a["attributions"]) == (width,) for a in answers)
    targets = forward(torch.as_tensor(x)).argmax(dim=1).tolist()  # mlp: the predicted class; regression: 0
    assert [a["target"] for a in answers] == targets
    assert_matches_captum(answers, captum_ig(forward, x, zero, targets, 50), 50)
    v1 = post(server, f"/v1/models/{model}:explain", json={"instances": rows, "parameters": {"steps": 16}})
    assert v1.status_code == 200, v1.text
    assert_matches_captum(v1.json()["explanations"], captum_ig(forward, x, zero, targets, 16), 16)


@pytest.mark.parametrize("path, kwargs, status, fragment", [
    ("/explanations/mnistnet", dict(json={"data": [0.0] * 784, "target": 10}), 400, "cannot explain target 10"),
    ("/explanations/mnistnet", dict(json={"data": [0.0] * 784, "steps": MAX_STEPS + 1}), 400, f"1 to {MAX_STEPS}"),
    ("/explanations/mnistnet", dict(json={"data": [[0.0] * 784] * (MAX_EXPLAIN_SAMPLES + 1)}), 413,
     f"> {MAX_EXPLAIN_SAMPLES} per request"),
    ("/v2/models/mnistnet/explain", dict(json={"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32",
                                                          "data": [0.0] * 784}], "parameters": {"target": -2}}),
     400, "cannot explain target -2"),
    ("/explanations/regressionnet", dict(json={"data": [[0.1] * 10], "target": 1}), 400, "has one output"),
    ("/explanations/mnistnet", dict(json={"data": [1, 2]}), 400, "expected one 28x28 image"),
])
def test_unexplainable_requests_are_json_4xx(server, path, kwargs, status, fragment):
    response = post(server, path, **kwargs)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


def test_concurrent_explanations_and_predictions_are_batched_correctly(server, mnist_test, reference):
    images, _ = mnist_test
    def explain(i):
        return i, post(server, "/explanations/mnistnet", json={"data": (images[i] / 255.0).round(6).tolist()})
    def predict(i):
        return i, post(server, "/predictions/mnistnet", json={"data": (images[i] / 255.0).round(6).tolist()})
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(explain if i % 2 else predict, i) for i in range(32)]
        results = [f.result() for f in futures]
    for i, response in results:
        assert response.status_code == 200, response.text
        answer = response.json()
        assert ("attributions" in answer) == bool(i % 2)
        expected = reference("mnistnet", normalise_pixels(images[i : i + 1]).reshape(1, 784))[0]
        np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-4)
        assert answer["predicted_class"] == int(expected.argmax())


def test_client_explain_and_cli_overlay(server, client, tmp_path):
    answer = client.explain("mnistnet", DIGIT_7.read_bytes(), steps=16)
    assert answer["predicted_class"] == 7 and answer["steps"] == 16
    out = tmp_path / "heat.png"
    result = subprocess.run(
        [sys.executable, "-m", "client", "--url", server.inference_url, "--token", server.keys()["inference"],
         "explain", "mnistnet", "--png", str(DIGIT_7), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=clean_env(),
    )
    assert result.returncode == 0, result.stderr
    assert '"predicted_class": 7' in result.stdout and out.is_file()
    from PIL import Image

    picture = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert picture.shape[0] > 200 and picture.shape[1] > 200
    red = (picture[..., 0] - picture[..., 2] > 80).sum()  # the heatmap's positive evidence is drawn in red
    assert red > 100
    bad = subprocess.run(
        [sys.executable, "-m", "client", "--url", server.inference_url, "--token", server.keys()["inference"],
         "explain", "mnistnet", "--png", str(DIGIT_7), "--target", "11"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=clean_env(),
    )
    assert bad.returncode == 1 and "400" in bad.stderr and "cannot explain target 11" in bad.stderr


def scrape(server) -> dict[tuple[str, frozenset], float]:
    text = requests.get(server.metrics_url, timeout=10).text
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def metric(samples, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_model_quality_metrics_in_prometheus(server, mnist_test):
    images, labels = mnist_test
    sevens = images[labels == 7][:5]
    before = scrape(server)
    assert post(server, "/predictions/feedforwardnet", json={"data": (sevens / 255.0).round(6).tolist()}).status_code == 200
    assert post(server, "/predictions/feedforwardnet", data=b"{", headers={"Content-Type": "application/json"}).status_code == 400
    assert post(server, "/predictions/regressionnet", json={"data": [[0.1] * 10]}).status_code == 200
    wanted = [  # (metric, labels, at least)
        ("model_predicted_class_total", {"model_name": "feedforwardnet", "class": "7"}, 5),
        ("model_rejected_inputs_total", {"model_name": "feedforwardnet", "reason": "malformed_json"}, 1),
        ("model_top_class_uncertainty_count", {"model_name": "feedforwardnet"}, 5),
        ("model_top_class_uncertainty_bucket", {"model_name": "feedforwardnet", "le": "0.1"}, 4),  # confident sevens
        ("model_regression_output_count", {"model_name": "regressionnet"}, 1),
        *[("model_stage_duration_seconds_count", {"model_name": "feedforwardnet", "stage": stage}, 1)
          for stage in ("decode", "forward", "encode")],
    ]
    deadline = time.time() + 10
    while True:  # each worker writes a batch's metric lines after its answer; the frontend reads them asynchronously
        after = scrape(server)
        grown = {(name, tuple(labels.items())): metric(after, name, **labels) - metric(before, name, **labels)
                 for name, labels, _ in wanted}
        if all(grown[(name, tuple(labels.items()))] >= least for name, labels, least in wanted) \
                or time.time() > deadline:
            break
        time.sleep(0.2)
    for name, labels, least in wanted:
        assert grown[(name, tuple(labels.items()))] >= least, (name, labels, grown)
    text = requests.get(server.metrics_url, timeout=10).text
    assert "# TYPE model_top_class_uncertainty histogram" in text
    assert "# TYPE model_predicted_class_total counter" in text
    assert "ts_inference_requests_total{" in text  # TorchServe's own metrics are still there
