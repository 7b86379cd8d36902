"""Helpers shared by the end-to-end tests (fixtures live in conftest.py)."""
from __future__ import annotations

import numpy as np

from models.registry import REGISTRY

IMAGE_MODELS = [name for name, spec in REGISTRY.items() if spec.is_image_model]
TABULAR_MODELS = [name for name, spec in REGISTRY.items() if not spec.is_image_model]
TOLERANCE = 1e-5  # served vs in-process outputs (float32 arithmetic on both sides)


def normalise_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 MNIST pixels → the normalised float32 input training uses (train.data.normalize_images)."""
    from train.data import normalize_images

    return normalize_images(pixels).numpy()
