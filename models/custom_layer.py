"""CustomLayer: a linear map followed by the SmoothStep activation."""
from torch import Tensor, nn

from models.smoothstep import SmoothStep


class CustomLayer(nn.Module):
    """``Linear(input_dim, output_dim) → SmoothStep``: a dense layer whose outputs lie in [0, 1]."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim)
        self.activation = SmoothStep()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.linear(x))
