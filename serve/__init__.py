"""Packaging (``python -m serve.package``) and TorchServe control (``python -m serve start|stop|status``)."""
from pathlib import Path

# The repository root: packaging stages ``models/`` and ``handlers/`` from here, and the default
# config, model store, weights and serve working directory are resolved against it.
REPO_ROOT = Path(__file__).resolve().parent.parent
