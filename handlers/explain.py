"""Explanations: Captum Integrated Gradients for every served model (``/explanations/<m>``,
``/v1/models/<m>:explain``, ``/v2/models/<m>/explain``).

TorchServe marks those routes with header ``explain: True`` (handlers/protocols.py reads it); the
request body is any input the model's prediction route takes, plus optional parameters:

* ``target``: the class to explain, one int for every sample or a list of one per sample. Digit
  classifiers: 0..9, default the predicted class. ``mlp``: 0 or 1, default the predicted class.
  Regression nets have one output: ``target`` may only be 0 (or absent).
* ``steps``: Integrated Gradients steps (Gauss-Legendre points), 1..MAX_STEPS, default DEFAULT_STEPS.

Where the parameters go: native JSON ``{"data": X, "target": 3, "steps": 64}``; KServe v1
``{"instances": [...], "parameters": {"target": 3}}`` (top-level keys work too); Open Inference
Protocol ``{"inputs": [...], "parameters": {"target": 3, "steps": 64}}``; for any body (a PNG/JPEG, a
bare JSON list) the request headers ``X-Explain-Target`` / ``X-Explain-Steps`` or multipart form fields
``target`` / ``steps`` next to ``data``. (TorchServe 0.12 does not hand the query string of
``/predictions`` or ``/explanations`` to the handler, so ``?target=3`` cannot work.) The JSON body wins
over form fields, which win over headers.

Attribution: Integrated Gradients of the model's raw output for the target (the class **logit** for
the digit classifiers, p(class 1) for ``mlp`` (p(class 0) = 1 - p for target 0), the prediction for
regression nets) along the straight line from a baseline to the input: for images the **black image**
(intensity 0 everywhere, i.e. (0 - 0.1307) / 0.3081 after normalisation), for tabular nets the zero
row. Attributions are per input value (28x28 for a digit; additive over pixels, and the same in
intensity or normalised units). ``convergence_delta`` = sum(attributions) - (F(input) - F(baseline)),
the quadrature error: small (|delta| << 1) means the map accounts for the output.

A request that cannot be explained is a 4xx JSON error of its own: a ``target`` outside the model's
classes or of the wrong kind (400), ``steps`` outside 1..MAX_STEPS (400), more than
MAX_EXPLAIN_SAMPLES samples in one request (413); bad input gives the same errors as predictions.

Responses (per sample; images ``attributions`` is 28x28, tabular a row of W):

* native ``/explanations``: ``{"predicted_class", "probabilities", "target", "attributions",
  "convergence_delta", "method", "baseline", "steps", "attribution_of"}`` for a digit (regression:
  ``prediction`` instead of the class fields; mlp: ``predicted_class`` and ``probability``); a list
  of them for a list of samples;
* KServe v1: ``{"explanations": [one such object per instance]}``;
* OIP: outputs ``attributions`` (FP32 [N, 28, 28] / [N, W]), ``target`` (INT64 [N]),
  ``convergence_delta`` (FP32 [N]) and the model's own outputs, with ``parameters`` naming method,
  baseline, steps and what was attributed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from handlers.decoding import InputError, finish
from wire.values import is_int, short, what

DEFAULT_STEPS = 50
MAX_STEPS = 256
MAX_EXPLAIN_SAMPLES = 64  # samples one explanation request may carry; more → 413
INTERNAL_BATCH_ROWS = 8192  # interpolated rows per forward/backward chunk (bounds memory per batch)
METHOD = "integrated_gradients"
PARAMETER_NAMES = ("target", "steps")
HEADERS = {"target": "x-explain-target", "steps": "x-explain-steps"}  # lowercased, as request_headers gives them


@dataclass
class ExplainOptions:
    """One request's validated explanation parameters: ``target`` None (predicted class) or one int
    per sample, and ``steps``."""

    target: list[int] | None
    steps: int


def baseline_description(spec) -> str:
    if spec.is_image_model:
        if spec.normalize:
            mean, std = spec.normalize
            return f"black image: intensity 0 (normalised: {(0 - mean) / std:.4f}) at every pixel"
        return "black image: intensity 0 at every pixel"
    return "zero row: 0 for every feature"


def attribution_of(spec) -> str:
    return spec.task_info.attribution_of


def output_count(spec) -> int:
    """How many classes a target may name: num_classes, 2 for binary, 1 for regression."""
    return spec.target_count


def read_parameters(source: Any, where: str) -> dict:
    """The explanation parameters found in the JSON object ``source`` (unknown keys are ignored)."""
    if source is None:
        return {}
    if not isinstance(source, dict):
        raise InputError(f"{where} must be an object; got {what(source)}")
    return {name: source[name] for name in PARAMETER_NAMES if name in source}


def text_parameters(request: Any, headers: dict[str, str] | None = None) -> dict:
    """Parameters sent as headers (``X-Explain-Target: 3``) or multipart form fields (``target``,
    ``steps``; TorchServe hands form fields to the handler as request fields), as integers."""
    found = {}
    for name in PARAMETER_NAMES:
        sources = [(f"header {HEADERS[name].title()}", (headers or {}).get(HEADERS[name]))]
        if isinstance(request, dict):
            sources.append((f"form field {name!r}", request.get(name)))
        for where, value in sources:
            if value is None:
                continue
            if isinstance(value, (bytes, bytearray)):
                value = bytes(value).decode("utf-8", "replace")
            if isinstance(value, str):
                text = value.strip()
                if not re.fullmatch(r"[+-]?\d{1,6}", text):
                    raise InputError(f"{where} must be an integer; got {short(text)}")
                value = int(text)
            found[name] = value
    return found


def options(parameters: dict, spec, n_samples: int) -> ExplainOptions:
    """Validate a request's parameters for ``n_samples`` samples of model ``spec`` (InputError if not)."""
    if n_samples > MAX_EXPLAIN_SAMPLES:
        raise InputError(
            f"too many samples for one explanation: {n_samples} > {MAX_EXPLAIN_SAMPLES} per request "
            f"(the cap on explanation requests); split the request",
            status=413,
        )
    steps = parameters.get("steps", DEFAULT_STEPS)
    if not is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be an integer from 1 to {MAX_STEPS} (the cap); got {short(steps)}")
    target = parameters.get("target")
    if target is None:
        return ExplainOptions(None, steps)
    classes = output_count(spec)
    targets = target if isinstance(target, list) else [target] * n_samples
    if len(targets) != n_samples:
        raise InputError(f"target lists {len(targets)} classes for {n_samples} sample(s); give one int or one per sample")
    for value in targets:
        if not is_int(value):
            raise InputError(f"target must be an integer class (or a list of them); got {short(value)}")
        if not 0 <= value < classes:
            allowed = "0" if classes == 1 else f"0-{classes - 1}"
            has = "has one output" if classes == 1 else f"has classes {allowed}"
            raise InputError(f"cannot explain target {value}: model {spec.name!r} {has}")
    return ExplainOptions(list(targets), steps)


class Explainer:
    """Integrated Gradients over one loaded model; ``explain`` answers a whole batch of samples."""

    def __init__(self, model: torch.nn.Module, spec, device: torch.device):
        from captum.attr import IntegratedGradients  # imported here: prediction-only workers skip it

        self.spec = spec
        self.device = device
        self.model = model
        self.ig = IntegratedGradients(self._forward)
        # The black image (or zero row) normalised exactly as a request's pixels are (decoding.finish), so
        # pixels equal to the baseline get exactly 0 attribution.
        self.baseline = torch.from_numpy(finish(np.zeros((1, spec.input_width)), spec)).to(device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.spec.task == "binary":
            p = out.reshape(len(out), 1)
            return torch.cat([1 - p, p], dim=1)
        if self.spec.task == "regression":
            return out.reshape(len(out), -1)
        return out

    def explain(self, samples: np.ndarray, targets: list[int | None], steps: list[int]) -> dict[str, np.ndarray]:
        """Per sample (first axis): ``outputs`` (model output), ``target`` (int64), ``attributions``
        (float32, like the samples), ``convergence_delta`` (float32). ``targets[i]`` None = the
        predicted class; samples with the same ``steps`` go through Captum together."""
        x = torch.from_numpy(samples).to(self.device)
        with torch.inference_mode():
            outputs = self.model(x).cpu()
        predicted = self._predicted(outputs)
        target = np.array([p if t is None else t for p, t in zip(predicted, targets)], dtype=np.int64)
        attributions = np.empty(samples.shape, dtype=np.float32)
        delta = np.empty(len(samples), dtype=np.float32)
        steps = np.asarray(steps)
        for n_steps in np.unique(steps):
            rows = np.flatnonzero(steps == n_steps)
            inputs = x[torch.from_numpy(rows).to(self.device)].clone().requires_grad_(True)
            with torch.enable_grad():
                attr, d = self.ig.attribute(
                    inputs,
                    baselines=self.baseline.expand_as(inputs),
                    target=torch.from_numpy(target[rows]).to(self.device),
                    n_steps=int(n_steps),
                    internal_batch_size=max(len(rows), INTERNAL_BATCH_ROWS),
                    return_convergence_delta=True,
                )
            attributions[rows] = attr.detach().cpu().numpy()
            delta[rows] = d.detach().cpu().numpy()
        return {"outputs": outputs.numpy(), "target": target, "attributions": attributions, "convergence_delta": delta}

    def _predicted(self, outputs: torch.Tensor) -> list[int]:
        if self.spec.task == "classification":
            return outputs.argmax(dim=1).tolist()
        if self.spec.task == "binary":
            return (outputs.reshape(-1) >= 0.5).long().tolist()
        return [0] * len(outputs)


# ------------------------------------------------------------------------------------ responses


def describe(spec, steps: int) -> dict:
    """What every explanation states: method, baseline, steps, what was attributed."""
    return {"method": METHOD, "baseline": baseline_description(spec), "steps": steps,
            "attribution_of": attribution_of(spec)}


def shaped(spec, attributions: np.ndarray) -> np.ndarray:
    """Attributions in the input's natural shape: (N, H, W) for images, (N, W) for rows."""
    if spec.is_image_model:
        return attributions.reshape(len(attributions), *spec.image_size)
    return attributions.reshape(len(attributions), -1)


def sample_objects(spec, model_outputs: dict[str, np.ndarray], result: dict, steps: int) -> list[dict]:
    """One JSON object per sample (native and KServe v1 answers)."""
    maps = shaped(spec, result["attributions"])
    common = describe(spec, steps)
    answers = []
    for i in range(len(maps)):
        if spec.task == "classification":
            head = {"predicted_class": int(model_outputs["predicted_class"][i]),
                    "probabilities": model_outputs["probabilities"][i].tolist()}
        elif spec.task == "binary":
            head = {"predicted_class": int(model_outputs["predicted_class"][i]),
                    "probability": float(model_outputs["probabilities"][i])}
        else:
            head = {"prediction": model_outputs["predictions"][i].tolist()}
        answers.append({
            **head,
            "target": int(result["target"][i]),
            "attributions": maps[i].tolist(),
            "convergence_delta": float(result["convergence_delta"][i]),
            **common,
        })
    return answers


def oip_outputs(spec) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """The OIP outputs of an explanation: the attributions, target and delta, then the model's own."""
    shape = tuple(spec.image_size) if spec.is_image_model else (spec.input_width,)
    return (("attributions", "FP32", shape), ("target", "INT64", ()), ("convergence_delta", "FP32", ())) + tuple(
        spec.outputs
    )


def oip_arrays(spec, model_outputs: dict[str, np.ndarray], result: dict) -> dict[str, np.ndarray]:
    return {
        "attributions": shaped(spec, result["attributions"]).astype(np.float32),
        "target": result["target"].astype(np.int64),
        "convergence_delta": result["convergence_delta"].astype(np.float32),
        **model_outputs,
    }
