"""Fixtures for the reliability tests: real TorchServe servers serving ``support.MODELS`` (mnistnet, mlp).

* ``weights_dir`` (tests/conftest.py): a private copy of ``weights/<name>.pt`` (missing weights are trained first, like
  serve/package.py does), so a retrain during the run cannot change what is served under us.
* ``store``: real .mar archives built once from those weights with serve/package.py (registry settings but
  one worker per model; batch size and delay from models/registry.py).
* ``start_server(name, log_config=None, models=MODELS, **server_kwargs)``: starts another READY server from ``store`` on free ports with a private
  TMPDIR, working and log directory (serve/server.py); every one is stopped at the end of the session.
* ``server``: the one shared by the bad-input matrix and the secure-defaults tests. Its log config
  (log4j2.xml here) keeps TorchServe's per-batch worker line, so tests can count batches.

Tests that kill workers or load the server hard start their own server with ``start_server``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from models.registry import get_spec
from serve.package import build_archive
from serve.server import Server
from servers import start_ready_server

from .support import MODELS, Reference

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def store(tmp_path_factory, weights_dir) -> Path:
    """A model store with freshly built archives of ``MODELS``, ONE worker each: so that requests sent
    together provably share a batch (test_bad_inputs) and a killed worker is the model's only one."""
    store = tmp_path_factory.mktemp("reliability-store").resolve()
    for name in MODELS:
        build_archive(dataclasses.replace(get_spec(name), workers=1), weights_dir / f"{name}.pt", store)
    return store


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, store):
    """``start_server(name, log_config=None, models=MODELS, **kwargs)`` → a READY :class:`Server` of its own
    (``kwargs`` go to :class:`Server`, e.g. ``fork_workers``)."""
    started: list[Server] = []

    def start(name: str, log_config: Path | None = None, models=MODELS, **kwargs) -> Server:
        extra = {"log_config": log_config} if log_config else {}
        server = start_ready_server(tmp_path_factory.mktemp(f"server-{name}"), store, models, **extra, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> Server:
    """The shared server of the bad-input matrix and secure-defaults tests (per-batch log lines kept)."""
    return start_server("shared", log_config=HERE / "log4j2.xml")


@pytest.fixture(scope="session")
def reference(weights_dir) -> Reference:
    """In-process copies of the served networks, from the same weights files."""
    return Reference(weights_dir)


@pytest.fixture(scope="session")
def digits():
    """Real MNIST test digits: ``(images uint8 (N, 28, 28), labels (N,))``."""
    from train.data import mnist_arrays

    return mnist_arrays("test")
