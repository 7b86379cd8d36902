"""DeepNet: a deeper MNIST classifier, 784→512→256→128→10 with dropout 0.2."""
from torch import Tensor, nn


class DeepNet(nn.Module):
    """Three ReLU hidden layers (512, 256, 128), each followed by ``Dropout(0.2)``; returns logits."""

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.fc1 = nn.Linear(784, 512)
        self.fc2 = nn.Linear(512, 256)
        self.fc3 = nn.Linear(256, 128)
        self.fc4 = nn.Linear(128, 10)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, 784)
        x = self.dropout(self.relu(self.fc1(x)))
        x = self.dropout(self.relu(self.fc2(x)))
        x = self.dropout(self.relu(self.fc3(x)))
        return self.fc4(x)
