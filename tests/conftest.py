"""Fixtures shared by the end-to-end and reliability suites."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from models.registry import REGISTRY, get_spec
from serve import REPO_ROOT
from serve.package import ensure_weights


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """A private copy of ``weights/<name>.pt`` for every registered model (missing ones are trained first),
    so a retrain during the run cannot change what the test servers serve under us."""
    snapshot = tmp_path_factory.mktemp("weights")
    for name in REGISTRY:
        source = ensure_weights(get_spec(name), REPO_ROOT / "weights")
        shutil.copy2(source, snapshot / source.name)
    return snapshot.resolve()
