"""Train/serve parity on real MNIST test digits, and correctness under TorchServe's dynamic batching.

The served probabilities must equal the in-process model's (trained weights, eval mode, softmax) to 1e-5
for the same digits sent as JSON and as PNG; concurrent single-image requests (which TorchServe groups
into batches of up to ``batchSize``) must each get their own digit's answer.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from e2e_support import IMAGE_MODELS, TOLERANCE, normalise_pixels

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_DIGITS = 64


@pytest.fixture(scope="module")
def test_digits(mnist_test):
    """The first N_DIGITS MNIST test digits (uint8 pixels) and their labels."""
    images, labels = mnist_test
    return images[:N_DIGITS], labels[:N_DIGITS]


def to_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_json_batch_matches_in_process_model(client, reference, test_digits, model):
    pixels, labels = test_digits
    answers = client.predict(model, {"data": (pixels / 255.0).tolist()})
    served = np.array([answer["probabilities"] for answer in answers])
    expected = reference(model, normalise_pixels(pixels))
    np.testing.assert_allclose(served, expected, atol=TOLERANCE)
    assert [answer["predicted_class"] for answer in answers] == expected.argmax(axis=1).tolist()
    # The served weights are the trained ones, not a fresh initialisation.
    assert np.mean(expected.argmax(axis=1) == labels) >= 0.9


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_concurrent_png_requests_each_get_their_own_answer(client, reference, test_digits, model):
    """64 PNG requests from 16 threads: TorchServe batches them; every answer matches its own digit."""
    pixels, _ = test_digits
    pngs = [to_png(image) for image in pixels]
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda png: client.predict(model, png), pngs))
    expected = reference(model, normalise_pixels(pixels))
    served = np.array([answer["probabilities"] for answer in answers])
    np.testing.assert_allclose(served, expected, atol=TOLERANCE)
    assert [answer["predicted_class"] for answer in answers] == expected.argmax(axis=1).tolist()


def test_concurrent_requests_across_models_and_forms(client, reference, test_digits):
    """Interleaved JSON, PNG and v2 requests to all image models at once, each checked against its digit."""
    pixels, _ = test_digits
    jobs = []
    for i in range(48):
        model = IMAGE_MODELS[i % len(IMAGE_MODELS)]
        form = ("json", "png", "v2")[(i // len(IMAGE_MODELS)) % 3]
        jobs.append((model, form, i))

    def send(job):
        model, form, i = job
        if form == "json":
            return client.predict(model, {"data": (pixels[i] / 255.0).tolist()})["probabilities"]
        if form == "png":
            return client.predict(model, to_png(pixels[i]))["probabilities"]
        response = client.predict_v2(model, (pixels[i : i + 1] / 255.0).astype(np.float32))
        return next(o["data"] for o in response["outputs"] if o["name"] == "probabilities")

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(send, jobs))
    for (model, form, i), probabilities in zip(jobs, results):
        expected = reference(model, normalise_pixels(pixels[i : i + 1]))[0]
        np.testing.assert_allclose(probabilities, expected, atol=TOLERANCE, err_msg=f"{model} {form} digit {i}")
