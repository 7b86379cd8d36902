"""MLP: binary classifier 2→10→1 with a ReLU hidden layer and a Sigmoid output."""
from torch import Tensor, nn


class MLP(nn.Module):
    """``Linear(input_dim, hidden_dim) → ReLU → Linear(hidden_dim, output_dim) → Sigmoid``.

    The output is already a probability in (0, 1); train it with ``nn.BCELoss``.
    """

    def __init__(self, input_dim: int = 2, hidden_dim: int = 10, output_dim: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_dim, output_dim)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return self.sigmoid(self.fc2(self.relu(self.fc1(x))))
