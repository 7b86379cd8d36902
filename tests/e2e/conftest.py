"""Fixtures for the end-to-end tests: ONE real TorchServe serving all seven models for the session.

The session fixture trains whatever is missing in ``weights/`` (the MNIST nets take minutes), copies
the weights to a private directory (so a retrain during the run cannot change what is served under us),
builds real .mar archives from them with serve/package.py, and starts TorchServe with serve/server.py on
free ports with a private TMPDIR, working directory and log directory. It waits until every worker is
READY and stops the server at the end of the session, also when tests fail.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import tritonclient.grpc as tritongrpc
import tritonclient.http as tritonhttp

from client.api import TorchServeClient
from models.registry import REGISTRY, get_spec
from serve.package import package_models
from serve.server import Server
from servers import start_ready_server

@pytest.fixture(scope="session")
def server(tmp_path_factory, weights_dir) -> Server:
    """A READY TorchServe serving every registered model from freshly built archives."""
    root = tmp_path_factory.mktemp("serve")
    store = root / "store"
    package_models(list(REGISTRY), weights_dir, store)
    ts = start_ready_server(root, store)
    try:
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="session")
def client(server) -> TorchServeClient:
    """A TorchServeClient for the session server; it reads the keys from the server's key_file.json."""
    with TorchServeClient(server.inference_url, server.management_url, key_file=server.key_file) as c:
        yield c


@pytest.fixture(scope="session")
def reference(weights_dir):
    """``reference(name, x)``: the in-process model's output for normalised float32 input ``x``:
    softmax probabilities for classifiers, raw outputs (N,) for the single-output tabular nets."""
    models = {}

    def run(name: str, x: np.ndarray) -> np.ndarray:
        if name not in models:
            spec = get_spec(name)
            model = spec.build()
            model.load_state_dict(torch.load(weights_dir / f"{name}.pt", weights_only=True))
            models[name] = model.eval()
        with torch.no_grad():
            out = models[name](torch.as_tensor(x, dtype=torch.float32))
        if get_spec(name).task == "classification":
            return torch.softmax(out, dim=1).numpy()
        return out.reshape(len(out)).numpy()

    return run


@pytest.fixture(scope="session")
def mnist_test():
    """Real MNIST test digits: ``(images uint8 (N, 28, 28), labels (N,))``."""
    from train.data import mnist_arrays

    return mnist_arrays("test")


@pytest.fixture(scope="module")
def http(server):
    """The stock OIP REST client (tritonclient.http) on the module's server."""
    client = tritonhttp.InferenceServerClient(url=server.inference_url.removeprefix("http://"), concurrency=4)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server):
    """The stock OIP gRPC client (tritonclient.grpc) on the module's server."""
    client = tritongrpc.InferenceServerClient(url=server.grpc_address)
    yield client
    client.close()
