"""MNISTNet: the reference MNIST classifier, 784→128→64→10 as an nn.Sequential with dropout 0.2."""
from torch import Tensor, nn


class MNISTNet(nn.Module):
    """``Sequential(Linear(784,128), ReLU, Dropout(0.2), Linear(128,64), ReLU, Dropout(0.2), Linear(64,10))``.

    Returns logits (apply softmax for probabilities). Input is viewed as ``(-1, 784)``, so a single
    ``(28, 28)`` image, a ``(N, 1, 28, 28)`` batch or flat ``(N, 784)`` rows all work.
    """

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(784, 128),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(64, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.reshape(-1, 784))
