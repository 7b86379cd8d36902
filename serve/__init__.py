"""Packaging (``python -m serve.package``) and TorchServe control (``python -m serve start|stop|status``)."""
# The repository root lives in the neutral ``paths`` package (client, train and bench read it too); it is
# re-exported here for callers that still write ``from serve import REPO_ROOT``.
from paths import REPO_ROOT

__all__ = ["REPO_ROOT"]
