"""The container engine and the freshly built CPU image, once per session for every module here
(test_image.py, test_container_drain.py). Without an engine they skip, except under CI (``CI=true``), where
they fail: CI must prove the image. Whoever runs them on a shared machine holds the container lock
(``flock /work/wt/notes/container.lock``): the image's tag is shared."""
from __future__ import annotations

import os
import time

import pytest

from container_image import CPU_TAG, EngineUnavailable, build, find_engine
from models.registry import REGISTRY
from paths import REPO_ROOT
from serve.package import package_models


@pytest.fixture(scope="session")
def engine():
    try:
        return find_engine()
    except EngineUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must build and run the image, but: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def image(engine):
    """The freshly built CPU image's tag (weights and archives brought up to date on the host first)."""
    start = time.monotonic()
    package_models(list(REGISTRY), REPO_ROOT / "weights", REPO_ROOT / "model_store")
    packaged = time.monotonic() - start
    seconds = build(engine, CPU_TAG)
    print(f"\n[container] weights + archives up to date in {packaged:.0f} s; image built in {seconds:.0f} s")
    return CPU_TAG
