"""SmoothStepNet: a small regression network built on CustomLayer (served as ``smoothstepnet``)."""
from torch import Tensor, nn

from models.custom_layer import CustomLayer


class SmoothStepNet(nn.Module):
    """``CustomLayer(input_dim, hidden_dim) → Linear(hidden_dim, output_dim)``.

    Defaults: input_dim=2, hidden_dim=32, output_dim=1. The SmoothStep units act as soft gates,
    so the net fits smooth step-like surfaces (see train/data.py for the generated target).
    """

    def __init__(self, input_dim: int = 2, hidden_dim: int = 32, output_dim: int = 1):
        super().__init__()
        self.hidden = CustomLayer(input_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.hidden(x))
