"""Session set-up for every test: the inherited environment cleared, the CI skip policy, shared fixtures.

* ``pytest_configure``: removes from ``os.environ`` what a caller's shell may carry that changes what the
  servers and tools the tests start do (``servers.INHERITED_VARIABLES``: PYTHONPATH, TS_*, ...), so that
  every subprocess, also those serve/server.py starts from ``os.environ``, runs as under CI; and registers
  the CI skip policy (tests/ci_skips.py: under ``CI`` a skip not on its allowlist fails the run).
* ``weights_dir``: the fixture the end-to-end and reliability suites share.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ci_skips import SkipPolicy
from models.registry import REGISTRY, get_spec
from serve import REPO_ROOT
from serve.package import ensure_weights
from servers import clear_inherited_environment

_CLEARED: dict[str, str] = {}


def pytest_configure(config):
    _CLEARED.update(clear_inherited_environment())
    config.pluginmanager.register(SkipPolicy(), "ci-skip-policy")


def pytest_report_header(config):
    if _CLEARED:
        return f"cleared from the inherited environment: {', '.join(sorted(_CLEARED))}"
    return None


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """A private copy of ``weights/<name>.pt`` for every registered model (missing ones are trained first),
    so a retrain during the run cannot change what the test servers serve under us."""
    snapshot = tmp_path_factory.mktemp("weights")
    for name in REGISTRY:
        source = ensure_weights(get_spec(name), REPO_ROOT / "weights")
        shutil.copy2(source, snapshot / source.name)
    return snapshot.resolve()
