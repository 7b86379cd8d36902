"""TabularHandler: TorchServe handler for the row-input models (regression and binary classification).

Request (see handlers/decoding.py): ``{"data": rows}`` or bare rows, one row of W numbers or a list of N
rows (W = model input width: linearregression 1, regressionnet 10, smoothstepnet 2, mlp 2); for W == 1
also a flat list of N numbers or one bare number; or an Open Inference Protocol (JSON or binary) or
KServe v1 request (handlers/protocols.py).

Response, always one value per row in request order, even for a single row:

* regression (linearregression, regressionnet, smoothstepnet)::

      {"predictions": [y0, y1, ...]}

  OIP output ``predictions`` (FP32, shape [N]); KServe v1 ``{"predictions": [y0, y1, ...]}``.
* binary (mlp, whose output is p(class 1) from a Sigmoid)::

      {"predictions": [1, 0, ...], "probabilities": [0.93, 0.12, ...], "classes": [1, 0, ...]}

  ``probabilities`` = p(class 1); ``predictions`` = predicted class, 1 when p >= the registry's
  ``BINARY_THRESHOLD`` (0.5, the one training scores with) else 0;
  ``classes`` repeats ``predictions`` (the class labels, for clients that read that key).
  OIP outputs ``probabilities`` (FP32, [N]) and ``predicted_class`` (INT64, [N]); KServe v1
  ``{"predictions": [{"probabilities": p, "predicted_class": c}, ...]}``, one per instance.
"""
from __future__ import annotations

import numpy as np
import torch

from handlers.base import ServingHandler
from models.registry import BINARY_THRESHOLD


class TabularHandler(ServingHandler):
    """Serves specs with task ``regression`` or ``binary`` (single-output networks)."""

    tasks = ("regression", "binary")

    def postprocess(self, output: torch.Tensor) -> dict[str, np.ndarray]:
        """Regression: ``predictions`` float32 (N,). Binary: ``probabilities`` float32 (N,) and
        ``predicted_class`` int64 (N,). A multi-output regression net gives ``predictions`` (N, K)."""
        values = output.float().reshape(len(output), -1).numpy().astype(np.float32)
        if values.shape[1] == 1:
            values = values[:, 0]
        if self.spec.task != "binary":
            return {"predictions": values}
        return {"probabilities": values, "predicted_class": (values >= BINARY_THRESHOLD).astype(np.int64)}

    def to_native(self, outputs: dict[str, np.ndarray], is_list: bool) -> dict:
        """``{"predictions": [...]}``; binary adds ``probabilities`` and ``classes`` (module docstring)."""
        if "predicted_class" not in outputs:
            return {"predictions": outputs["predictions"].tolist()}
        classes = outputs["predicted_class"].tolist()
        return {"predictions": classes, "probabilities": outputs["probabilities"].tolist(), "classes": classes}
