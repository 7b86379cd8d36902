"""LinearRegression: a single affine map, y = w·x + b (the seed's Linear 1→1)."""
from torch import Tensor, nn


class LinearRegression(nn.Module):
    """One ``nn.Linear(input_dim, output_dim)``; trained on y = 2x + 1 + noise it should find w=2, b=1."""

    def __init__(self, input_dim: int = 1, output_dim: int = 1):
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)

    def learned(self) -> dict[str, list[float]]:
        """The fitted weight and bias, which training records in ``<name>.json`` (they should be 2 and 1)."""
        return {"weight": self.linear.weight.detach().cpu().flatten().tolist(),
                "bias": self.linear.bias.detach().cpu().flatten().tolist()}
