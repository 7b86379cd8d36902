"""Client for the TorchServe service: :class:`client.api.TorchServeClient` and ``python -m client``."""
from client.api import TorchServeClient, TorchServeError

__all__ = ["TorchServeClient", "TorchServeError"]
