"""Client for the TorchServe service: :class:`client.api.TorchServeClient` and ``python -m client``.

The names below load client/api.py (and ``requests``) on first use, so ``client.oip`` alone needs only numpy.
"""
__all__ = ["TorchServeClient", "TorchServeError"]


def __getattr__(name: str):
    if name in __all__:
        from client import api

        return getattr(api, name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
