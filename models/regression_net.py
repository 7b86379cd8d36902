"""Net: the seed's regression network, 10→20→1, as an nn.Sequential (served as ``regressionnet``)."""
from torch import Tensor, nn


class Net(nn.Module):
    """``Sequential(Linear(10, 20), ReLU, Linear(20, 1))``: 241 parameters."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
