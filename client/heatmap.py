"""Render an explanation: the digit with its Integrated Gradients attributions over it, as a PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def digit_pixels(data) -> np.ndarray | None:
    """The 28x28 intensities in [0, 1] the server decodes from ``data`` (PNG/JPEG bytes, or a JSON value /
    array holding one image), or None when it is not exactly one image."""
    if isinstance(data, (bytes, bytearray)):
        from handlers.decoding import decode_image_bytes  # the server's own decoding, pixel for pixel

        return decode_image_bytes(bytes(data), (28, 28)).reshape(28, 28)
    values = data.get("data") if isinstance(data, dict) else data
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        return None
    if array.size != 784:
        return None
    return np.clip(array.reshape(28, 28), 0.0, 1.0)


def write_overlay(path: Path, pixels: np.ndarray | None, explanation: dict) -> Path:
    """Write ``path``: the digit in gray with the attribution map over it (red: evidence for the target
    class, blue: against), titled with the prediction, the target and the convergence delta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attributions = np.asarray(explanation["attributions"], dtype=np.float32).reshape(28, 28)
    limit = float(np.abs(attributions).max()) or 1.0
    fig, ax = plt.subplots(figsize=(3.2, 3.6), dpi=100)
    if pixels is not None:
        ax.imshow(pixels, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.imshow(attributions, cmap="bwr", vmin=-limit, vmax=limit, alpha=0.6, interpolation="nearest")
    predicted = explanation.get("predicted_class")
    probabilities = explanation.get("probabilities")
    head = f"predicted {predicted}" if predicted is not None else f"prediction {explanation.get('prediction')}"
    if probabilities is not None and predicted is not None:
        head += f" (p={probabilities[predicted]:.3f})"
    ax.set_title(f"{head}\nIG for class {explanation['target']}, delta {explanation['convergence_delta']:.1e}",
                 fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
