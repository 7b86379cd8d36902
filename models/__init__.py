"""The networks, one class per module, and the registry of model specs that the pipeline reads."""
from models.custom_layer import CustomLayer
from models.deep_net import DeepNet
from models.feedforward_net import FeedForwardNet
from models.linear_regression import LinearRegression
from models.mlp import MLP
from models.mnist_net import MNISTNet
from models.regression_net import Net
from models.registry import MNIST_MEAN, MNIST_STD, REGISTRY, ModelSpec, TrainConfig, get_spec
from models.smoothstep import SmoothStep
from models.smoothstep_net import SmoothStepNet

__all__ = [
    "CustomLayer", "DeepNet", "FeedForwardNet", "LinearRegression", "MLP", "MNISTNet", "Net",
    "SmoothStep", "SmoothStepNet", "REGISTRY", "ModelSpec", "TrainConfig", "get_spec",
    "MNIST_MEAN", "MNIST_STD",
]
