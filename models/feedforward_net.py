"""FeedForwardNet: one hidden layer classifier, 784→128→10 for MNIST."""
from torch import Tensor, nn


class FeedForwardNet(nn.Module):
    """``Linear(input_size, hidden_size) → ReLU → Linear(hidden_size, output_size)``; returns logits.

    Any input whose trailing dimensions hold ``input_size`` values (e.g. ``(N, 28, 28)``) is flattened.
    """

    def __init__(self, input_size: int = 784, hidden_size: int = 128, output_size: int = 10):
        super().__init__()
        self.input_size = input_size
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, self.input_size)
        return self.fc2(self.relu(self.fc1(x)))
