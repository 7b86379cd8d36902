"""Helpers shared by the end-to-end tests (fixtures live in conftest.py)."""
from __future__ import annotations

import numpy as np
import requests

from models.registry import REGISTRY
from api_requests import api_request
from serve.server import Server

IMAGE_MODELS = [name for name, spec in REGISTRY.items() if spec.is_image_model]
TABULAR_MODELS = [name for name, spec in REGISTRY.items() if not spec.is_image_model]
TOLERANCE = 1e-5  # served vs in-process outputs (float32 arithmetic on both sides)


def normalise_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 MNIST pixels → the normalised float32 input training uses (train.data.normalize_images)."""
    from train.data import normalize_images

    return normalize_images(pixels).numpy()


def post(server: Server, path: str, key: str | None = "inference", **kwargs) -> requests.Response:
    """Raw POST to the inference API with the current key of kind ``key`` (None: no Authorization)."""
    return api_request(server, "POST", path, key, **kwargs)


def worker_snapshot(server: Server) -> dict[str, list[tuple]]:
    """model → sorted (worker id, pid, status) of its workers, from the management API."""
    snapshot = {}
    for name in REGISTRY:
        workers = server.describe(name)["workers"]
        snapshot[name] = sorted((w["id"], w["pid"], w["status"]) for w in workers)
    return snapshot
