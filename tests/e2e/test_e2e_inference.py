"""Every accepted input form, for every served model, through a real TorchServe.

Each answer is compared with the in-process model (same weights, eval mode) to 1e-5, so a test passes
only if the request was decoded, normalised, batched and answered exactly as training would compute it.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from e2e_support import IMAGE_MODELS, TABULAR_MODELS, TOLERANCE, normalise_pixels
from servers import post
from models.registry import get_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def digits(mnist_test):
    """Eight real MNIST test digits: uint8 pixels (8, 28, 28) and intensities in [0, 1] (float64)."""
    pixels = mnist_test[0][:8]
    return pixels, pixels / 255.0


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def assert_classified(answer: dict, expected: np.ndarray) -> None:
    """``answer`` is one {"predicted_class", "probabilities"} object matching ``expected`` probabilities."""
    assert set(answer) == {"predicted_class", "probabilities"}
    probabilities = np.array(answer["probabilities"])
    assert probabilities.shape == (10,)
    np.testing.assert_allclose(probabilities, expected, atol=TOLERANCE)
    assert answer["predicted_class"] == int(np.argmax(expected))


# ------------------------------------------------------------------------------------ image models

@pytest.mark.parametrize("model", IMAGE_MODELS)
@pytest.mark.parametrize(
    "form",
    ["json_dict_28x28", "bare_list_28x28", "json_dict_flat_784", "bare_flat_784"],
)
def test_single_image_json_forms(client, reference, digits, model, form):
    pixels, intensities = digits
    image = intensities[0]
    payload = {
        "json_dict_28x28": {"data": image.tolist()},
        "bare_list_28x28": image.tolist(),
        "json_dict_flat_784": {"data": image.ravel().tolist()},
        "bare_flat_784": image.ravel().tolist(),
    }[form]
    answer = client.predict(model, payload)
    assert_classified(answer, reference(model, normalise_pixels(pixels[:1]))[0])


@pytest.mark.parametrize("model", IMAGE_MODELS)
@pytest.mark.parametrize("layout", ["N_28_28", "N_784", "N_1_28_28"])
def test_n_images_in_one_request(client, reference, digits, model, layout):
    pixels, intensities = digits
    shape = {"N_28_28": (8, 28, 28), "N_784": (8, 784), "N_1_28_28": (8, 1, 28, 28)}[layout]
    answers = client.predict(model, {"data": intensities.reshape(shape).tolist()})
    expected = reference(model, normalise_pixels(pixels))
    assert isinstance(answers, list) and len(answers) == 8
    for answer, probabilities in zip(answers, expected):
        assert_classified(answer, probabilities)


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_list_of_one_image_answers_a_list(client, reference, digits, model):
    pixels, intensities = digits
    answers = client.predict(model, [intensities[3].tolist()])
    assert isinstance(answers, list) and len(answers) == 1
    assert_classified(answers[0], reference(model, normalise_pixels(pixels[3:4]))[0])


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_png_raw_body(server, reference, digits, model):
    pixels, _ = digits
    response = post(server, f"/predictions/{model}", data=png_bytes(pixels[1]), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    assert_classified(response.json(), reference(model, normalise_pixels(pixels[1:2]))[0])


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_png_multipart_upload(client, reference, digits, model):
    pixels, _ = digits
    answer = client.predict_multipart(model, png_bytes(pixels[2]))
    assert_classified(answer, reference(model, normalise_pixels(pixels[2:3]))[0])


@pytest.mark.parametrize("model", IMAGE_MODELS)
@pytest.mark.parametrize("shape", [(1, 784), (8, 28, 28)])
def test_open_inference_protocol_v2(client, reference, digits, model, shape):
    pixels, intensities = digits
    n = shape[0]
    response = client.predict_v2(model, intensities[:n].reshape(shape).astype(np.float32), request_id="req-42")
    assert response["model_name"] == model
    assert response["model_version"] == get_spec(model).version
    assert response["id"] == "req-42"
    outputs = {output["name"]: output for output in response["outputs"]}
    assert set(outputs) == {"probabilities", "predicted_class"}
    probabilities, classes = outputs["probabilities"], outputs["predicted_class"]
    assert (probabilities["shape"], probabilities["datatype"]) == ([n, 10], "FP32")
    assert (classes["shape"], classes["datatype"]) == ([n], "INT64")
    # FP32 over the wire: the test digits' intensities k/255 round to float32 exactly as training's input.
    expected = reference(model, normalise_pixels(pixels[:n]))
    np.testing.assert_allclose(np.array(probabilities["data"]).reshape(n, 10), expected, atol=TOLERANCE)
    assert classes["data"] == expected.argmax(axis=1).tolist()


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_v2_body_on_the_predictions_url(server, reference, digits, model):
    """A v2 body posted to /predictions/<model>/<version> is answered v2-shaped too."""
    pixels, intensities = digits
    body = {"inputs": [{"name": "x", "shape": [2, 784], "datatype": "FP64", "data": intensities[:2].ravel().tolist()}]}
    response = post(server, f"/predictions/{model}/{get_spec(model).version}", json=body)
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    np.testing.assert_allclose(
        np.array(outputs["probabilities"]["data"]).reshape(2, 10),
        reference(model, normalise_pixels(pixels[:2])),
        atol=TOLERANCE,
    )


# ---------------------------------------------------------------------------------- versioned URL

@pytest.mark.parametrize("model", IMAGE_MODELS + TABULAR_MODELS)
def test_versioned_url_matches_default_version(server, model):
    spec = get_spec(model)
    payload = {"data": [[0.25] * spec.input_width]}
    default = post(server, f"/predictions/{model}", json=payload)
    versioned = post(server, f"/predictions/{model}/{spec.version}", json=payload)
    assert default.status_code == versioned.status_code == 200, (default.text, versioned.text)
    assert versioned.json() == default.json()


def test_unknown_version_and_model_are_404_with_a_message(server):
    response = post(server, "/predictions/mnistnet/9.9", json={"data": [0.0] * 784})
    assert response.status_code == 404
    assert "9.9" in response.json()["message"]
    response = post(server, "/predictions/no_such_model", json={"data": [0.0] * 784})
    assert response.status_code == 404
    assert "no_such_model" in response.json()["message"]


# ---------------------------------------------------------------------------------- tabular models

def tabular_rows(model: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` float32 rows of the model's input width, values in [-2, 2]."""
    width = get_spec(model).input_width
    return np.random.default_rng(seed).uniform(-2, 2, size=(n, width)).astype(np.float32)


def assert_tabular(model: str, answer: dict, expected: np.ndarray) -> None:
    """Regression: {"predictions"}; binary (mlp): predictions/classes = p >= 0.5, probabilities = p."""
    if get_spec(model).task == "binary":
        assert set(answer) == {"predictions", "probabilities", "classes"}
        np.testing.assert_allclose(answer["probabilities"], expected, atol=TOLERANCE)
        assert answer["predictions"] == answer["classes"] == (expected >= 0.5).astype(int).tolist()
    else:
        assert set(answer) == {"predictions"}
        np.testing.assert_allclose(answer["predictions"], expected, atol=TOLERANCE, rtol=1e-6)


@pytest.mark.parametrize("model", TABULAR_MODELS)
@pytest.mark.parametrize("form", ["json_dict_rows", "bare_rows", "single_row"])
def test_tabular_json_forms(client, reference, model, form):
    rows = tabular_rows(model, 5)
    if form == "single_row":
        rows = rows[:1]
        payload = rows[0].tolist()
    else:
        payload = {"data": rows.tolist()} if form == "json_dict_rows" else rows.tolist()
    assert_tabular(model, client.predict(model, payload), reference(model, rows))


def test_linearregression_flat_list_and_bare_number(client, reference):
    xs = np.array([-1.5, 0.0, 0.5, 3.0], dtype=np.float32)
    assert_tabular("linearregression", client.predict("linearregression", xs.tolist()),
                   reference("linearregression", xs.reshape(-1, 1)))
    assert_tabular("linearregression", client.predict("linearregression", 2.0),
                   reference("linearregression", np.array([[2.0]], dtype=np.float32)))


@pytest.mark.parametrize("model", TABULAR_MODELS)
def test_tabular_open_inference_protocol_v2(client, reference, model):
    rows = tabular_rows(model, 6, seed=1)
    response = client.predict_v2(model, rows)
    outputs = {output["name"]: output for output in response["outputs"]}
    expected = reference(model, rows)
    if get_spec(model).task == "binary":
        assert set(outputs) == {"probabilities", "predicted_class"}
        assert (outputs["predicted_class"]["datatype"], outputs["predicted_class"]["shape"]) == ("INT64", [6])
        np.testing.assert_allclose(outputs["probabilities"]["data"], expected, atol=TOLERANCE)
        assert outputs["predicted_class"]["data"] == (expected >= 0.5).astype(int).tolist()
    else:
        assert set(outputs) == {"predictions"}
        assert (outputs["predictions"]["datatype"], outputs["predictions"]["shape"]) == ("FP32", [6])
        np.testing.assert_allclose(outputs["predictions"]["data"], expected, atol=TOLERANCE, rtol=1e-6)


def test_tabular_model_refuses_an_image(server, digits):
    response = post(server, "/predictions/regressionnet", data=png_bytes(digits[0][0]),
                    headers={"Content-Type": "image/png"})
    assert response.status_code == 400
    assert "regressionnet" in response.json()["error"]
