"""ImageClassifier: TorchServe handler for the MNIST classifiers (mnistnet, deepnet, feedforwardnet).

Request (see handlers/decoding.py): ``{"data": X}`` or bare X with X one 28x28 image / flat 784-vector
of intensities in [0, 1] or a list of N of them; a PNG/JPEG body or multipart field ``data``; or an
Open Inference Protocol (JSON or binary) or KServe v1 request (handlers/protocols.py).

Response for one image (JSON image, flat vector or PNG/JPEG)::

    {"predicted_class": 7, "probabilities": [p0, ..., p9]}

for a list of N images, a JSON list of N such objects in request order (also when N == 1). OIP:
``outputs`` ``probabilities`` (FP32, shape [N, 10]) and ``predicted_class`` (INT64, [N]); KServe v1:
``{"predictions": [{"probabilities": [...], "predicted_class": k}, ...]}``, one per instance.
Probabilities are the softmax of the network's logits; ``predicted_class`` is their argmax.
"""
from __future__ import annotations

import numpy as np
import torch

from handlers.base import ServingHandler


class ImageClassifier(ServingHandler):
    """Softmax classifier over 10 digit classes; serves specs with task ``classification``."""

    tasks = ("classification",)

    def postprocess(self, output: torch.Tensor) -> dict[str, np.ndarray]:
        """``probabilities`` float32 (N, classes) and ``predicted_class`` int64 (N,)."""
        probabilities = torch.softmax(output.float(), dim=1)
        return {
            "probabilities": probabilities.numpy().astype(np.float32),
            "predicted_class": probabilities.argmax(dim=1).numpy().astype(np.int64),
        }

    def to_native(self, outputs: dict[str, np.ndarray], is_list: bool):
        """One ``{"predicted_class", "probabilities"}`` object per image; a list unless one image was sent."""
        answers = [
            {"predicted_class": int(k), "probabilities": p.tolist()}
            for k, p in zip(outputs["predicted_class"], outputs["probabilities"])
        ]
        return answers if is_list else answers[0]
