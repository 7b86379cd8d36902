"""The independent reference for explanation values: Captum's own Integrated Gradients, run in the test on
the in-process model, and the check that served attributions and ``convergence_delta`` equal it.

handlers/explain.py states its method (Integrated Gradients of the target's logit for digits, of p(target)
for ``mlp``, of the prediction for regression nets; black image or zero-row baseline; ``steps``
Gauss-Legendre points); these helpers restate it from the README, not from that module.
"""
from __future__ import annotations

import numpy as np
import torch

# Served vs Captum run here: the same float32 network and quadrature, batched differently (the handler runs
# all interpolation points of a request in one pass). Measured on the CPU they agree to ~2e-9.
ATOL = 1e-5


def captum_ig(forward, x: np.ndarray, baseline: np.ndarray, target, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Captum's IntegratedGradients (``method="gausslegendre"``) of ``forward`` at rows ``x`` from
    ``baseline`` (one row, broadcast) for ``target`` (an int, or one per row): (attributions, delta)."""
    from captum.attr import IntegratedGradients

    inputs = torch.as_tensor(np.asarray(x, np.float32))
    base = torch.as_tensor(np.asarray(baseline, np.float32)).expand_as(inputs)
    attributions, delta = IntegratedGradients(forward).attribute(
        inputs, baselines=base, target=target, n_steps=steps, method="gausslegendre", return_convergence_delta=True)
    return attributions.detach().numpy(), delta.detach().numpy()


def binary_forward(model):
    """What ``mlp`` explanations attribute: p(target), with p(0) = 1 - p(1)."""
    def forward(x):
        p = model(x).reshape(len(x), 1)
        return torch.cat([1 - p, p], dim=1)
    return forward


def regression_forward(model):
    """What regression explanations attribute: the one predicted value (target 0)."""
    return lambda x: model(x).reshape(len(x), 1)


def assert_matches_captum(answers: list[dict], expected: tuple[np.ndarray, np.ndarray], steps: int) -> None:
    """Each served explanation object (native or KServe v1) states ``steps`` and carries Captum's attributions
    and convergence delta, to :data:`ATOL`."""
    attributions, delta = expected
    assert [a["steps"] for a in answers] == [steps] * len(answers)
    served = np.array([np.reshape(a["attributions"], -1) for a in answers])
    np.testing.assert_allclose(served, attributions.reshape(len(answers), -1), rtol=0, atol=ATOL)
    np.testing.assert_allclose([a["convergence_delta"] for a in answers], delta, rtol=0, atol=ATOL)
