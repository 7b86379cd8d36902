"""SmoothStep activation: the quintic "smootherstep" x³(6x² − 15x + 10)."""
import torch
from torch import Tensor, nn


def smootherstep(x: Tensor) -> Tensor:
    """``x³(6x² − 15x + 10)`` on [0, 1], 0 below and 1 above (also the smoothstep data set's target curve)."""
    x = torch.clamp(x, 0.0, 1.0)
    return x * x * x * (x * (6.0 * x - 15.0) + 10.0)


class SmoothStep(nn.Module):
    """Elementwise ``s(x) = x³(6x² − 15x + 10)`` on [0, 1], clamped to 0 below and 1 above.

    On [0, 1] it rises from s(0)=0 to s(1)=1 with s(0.5)=0.5, and its first and second derivatives
    vanish at both ends (s'(x) = 30x²(x − 1)²), so the clamped function is C² everywhere. Without
    the clamp the quintic grows like 6x⁵ and a single large pre-activation blows training up.
    """

    def forward(self, x: Tensor) -> Tensor:
        return smootherstep(x)
