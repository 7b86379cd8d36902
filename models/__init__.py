"""The networks, one class per module, and the registry of model specs that the pipeline reads.

The classes load on first use (``from models import MNISTNet`` imports torch then), so that
``import models.registry`` stays free of torch.
"""
from models.registry import MNIST_MEAN, MNIST_STD, REGISTRY, ModelSpec, TrainConfig, get_spec

_CLASSES = {
    "CustomLayer": "models.custom_layer", "DeepNet": "models.deep_net", "FeedForwardNet": "models.feedforward_net",
    "LinearRegression": "models.linear_regression", "MLP": "models.mlp", "MNISTNet": "models.mnist_net",
    "Net": "models.regression_net", "SmoothStep": "models.smoothstep", "SmoothStepNet": "models.smoothstep_net",
}

__all__ = [*_CLASSES, "REGISTRY", "ModelSpec", "TrainConfig", "get_spec", "MNIST_MEAN", "MNIST_STD"]


def __getattr__(name: str):
    """``models.MNISTNet`` and friends, imported when first asked for."""
    if name in _CLASSES:
        import importlib

        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
