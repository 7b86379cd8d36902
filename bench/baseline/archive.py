"""Build the stock-baseline archive: MNISTNet + the project's weights + bench/baseline/handler.py.

No ``--config-file``, so TorchServe applies its defaults to it (batch size 1, workers = cores). The archive
is named ``mnist_baseline.mar`` and served at ``/predictions/mnist_baseline``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BASELINE_NAME = "mnist_baseline"
HANDLER = Path(__file__).resolve().parent / "handler.py"
MODEL_FILE = REPO_ROOT / "models" / "mnist_net.py"


def build_baseline_archive(weights: Path, store: Path) -> Path:
    """Write ``<store>/mnist_baseline.mar`` from ``weights`` (a MNISTNet state_dict) and return its path.

    Raises FileNotFoundError if ``weights`` is missing (train it with ``python -m train mnistnet``) and
    RuntimeError with the archiver's output if torch-model-archiver fails.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: train it first (python -m train mnistnet)")
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    tool = Path(sys.executable).parent / "torch-model-archiver"
    cmd = [
        str(tool) if tool.exists() else "torch-model-archiver",
        "--model-name", BASELINE_NAME,
        "--version", "1.0",
        "--model-file", str(MODEL_FILE),
        "--serialized-file", str(weights),
        "--handler", str(HANDLER),
        "--export-path", str(store),
        "--force",
    ]
    with tempfile.TemporaryDirectory(prefix="baseline-archiver-") as tmp:
        # The archiver stages files in $TMPDIR/<model-name>: a private one avoids clashes with other builds.
        result = subprocess.run(cmd, env={**os.environ, "TMPDIR": tmp}, capture_output=True, text=True)
    archive = store / f"{BASELINE_NAME}.mar"
    if result.returncode != 0 or not archive.is_file():
        raise RuntimeError(f"torch-model-archiver failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return archive
