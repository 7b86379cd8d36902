"""Where things live in this checkout: the repository root and the default folders every package reads.

A neutral home with no imports of its own (only ``pathlib``), so that ``client``, ``train``, ``serve``,
``bench``, the scripts and the tests can all share one root without importing each other. Moving the
checkout moves every default with it; each command still takes flags that override these.
"""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

WEIGHTS_DIR = REPO_ROOT / "weights"  # trained state dicts, <model>.pt (+ <model>.json), written by `python -m train`
MODEL_STORE = REPO_ROOT / "model_store"  # TorchServe archives, <model>.mar, written by `python -m serve.package`
BUILD_DIR = REPO_ROOT / "build"  # build products that are not archives (the OIP agent's jar)
SERVE_WORKDIR = REPO_ROOT / ".serve"  # the running TorchServe's working folder: key_file.json, its TMPDIR
LOG_DIR = REPO_ROOT / "logs"  # TorchServe's logs under `python -m serve start`
MNIST_ROOT = REPO_ROOT / "data" / "mnist"  # the committed MNIST IDX files and their SHA256SUMS
EXAMPLES_DIR = REPO_ROOT / "examples"  # sample requests (digit PNGs, JSON bodies)
BENCH_RESULTS_DIR = REPO_ROOT / "bench" / "results"  # committed benchmark results and plots
