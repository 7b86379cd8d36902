"""Request bodies built from real MNIST test digits (data/mnist, verified by train/data.py).

The project's handler takes pixel intensities in [0, 1] (it normalises itself), PNG/JPEG bytes, or Open
Inference Protocol (v2) bodies; the stock baseline handler takes already-normalised floats. Every builder
returns ``(body bytes, content type)``; ``index`` picks the test digit (default the first one).
"""
from __future__ import annotations

import io
import json
from functools import lru_cache

import numpy as np
from PIL import Image

from models.registry import MNIST_MEAN, MNIST_STD

JSON = "application/json"
PNG = "image/png"


@lru_cache(maxsize=1)
def test_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test images as uint8 ``(N, 28, 28)`` and their labels ``(N,)``."""
    from train.data import mnist_arrays  # verifies the files' sha256 first

    return mnist_arrays("test")


def digits(count: int, start: int = 0) -> np.ndarray:
    """``count`` consecutive test digits (uint8 ``(count, 28, 28)``), wrapping around the test set."""
    images, _ = test_digits()
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return images[np.arange(start, start + count) % len(images)]


def label(index: int) -> int:
    """The true class of test digit ``index``."""
    return int(test_digits()[1][index % len(test_digits()[1])])


def _dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def intensities(images: np.ndarray) -> np.ndarray:
    """uint8 pixels → float intensities in [0, 1] (what the project's API takes)."""
    return images.astype(np.float64) / 255.0


def normalised(images: np.ndarray) -> np.ndarray:
    """uint8 pixels → training-normalised float32 values (what the stock baseline handler takes)."""
    return ((images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD).astype(np.float32)


def json_images(count: int = 1, index: int = 0, flat: bool = False, normalise: bool = False) -> tuple[bytes, str]:
    """A bare JSON array: one image (``count == 1``: ``[28][28]``, or ``[784]`` if ``flat``) or a list of
    ``count`` images. ``normalise=True`` sends training-normalised values (the baseline's input)."""
    images = digits(count, index)
    values = normalised(images) if normalise else intensities(images)
    values = values.reshape(count, 784) if flat else values
    return _dumps(values[0].tolist() if count == 1 else values.tolist()), JSON


def png_image(index: int = 0) -> tuple[bytes, str]:
    """Test digit ``index`` as an 8-bit grayscale PNG file (about 300 bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(digits(1, index)[0], mode="L").save(buffer, format="PNG")
    return buffer.getvalue(), PNG


def v2_images(count: int = 1, index: int = 0, shape: str = "flat", datatype: str = "FP32",
              name: str = "input-0") -> tuple[bytes, str]:
    """An Open Inference Protocol body with ``count`` digits, shape ``[N, 784]`` (``shape="flat"``) or
    ``[N, 28, 28]`` (``shape="square"``). ``FP32`` sends intensities in [0, 1]; ``UINT8`` sends the raw
    0..255 bytes as integers (the most compact JSON form). ``name``: the input's name (ours takes any;
    Triton only its declared ``input``)."""
    images = digits(count, index)
    dims = [count, 784] if shape == "flat" else [count, 28, 28]
    if datatype == "UINT8":
        data = images.reshape(-1).tolist()
    elif datatype == "FP32":
        data = intensities(images).reshape(-1).tolist()
    else:
        raise ValueError(f"datatype must be FP32 or UINT8, got {datatype!r}")
    body = {"inputs": [{"name": name, "shape": dims, "datatype": datatype, "data": data}]}
    return _dumps(body), JSON


def v2_binary_images(count: int = 1, index: int = 0, datatype: str = "FP32",
                     name: str = "input-0") -> tuple[bytes, str, dict]:
    """``count`` digits as an Open Inference Protocol body with the binary tensor data extension (what
    tritonclient sends by default): raw little-endian FP32 intensities or UINT8 pixels, outputs asked back
    in binary. Returns ``(body, content type, headers)``; the headers carry Inference-Header-Content-Length."""
    from client.api import binary_v2_request

    images = digits(count, index).reshape(count, 784)
    array = images if datatype == "UINT8" else intensities(images).astype(np.float32)
    body, header_length = binary_v2_request(array, name=name, datatype=datatype)
    return body, "application/octet-stream", {"Inference-Header-Content-Length": str(header_length)}
