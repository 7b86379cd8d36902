"""Training data: the project's verified copy of real MNIST, and four seeded generated data sets.

MNIST comes only from ``data/mnist/MNIST/raw/*.gz`` in this repository (torchvision's layout). Before a
file is decoded its sha256 is checked against ``data/mnist/SHA256SUMS``; a missing or altered file raises
:class:`MNISTChecksumError` naming the file, both hashes and how to restore it. Decoding is a plain IDX
reader (gzip + ``numpy.frombuffer``) and decoded arrays are cached in memory for the life of the process.

The generated sets (``linear``, ``regression10``, ``moons``, ``smoothstep``) are pure functions of their
parameters: the same ``seed`` always gives the same samples and the same train/held-out split.
:func:`load_dataset` returns any of the five as in-memory float tensors ready for the trainer.
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.registry import MNIST_MEAN, MNIST_STD
from models.smoothstep import smootherstep  # the target curve of the smoothstep data set
from paths import MNIST_ROOT

DEFAULT_MNIST_ROOT = MNIST_ROOT
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_RESTORE_HINT = (
    "restore the project's copy with `git checkout -- data/mnist` from the repository root "
    "(the four .gz files and SHA256SUMS are tracked in git)"
)

# Generated data sets draw from this seed unless told otherwise, so every training seed sees the same data.
DATA_SEED = 0


class MNISTChecksumError(RuntimeError):
    """An MNIST file is missing, unlisted in SHA256SUMS, or its sha256 differs from the listed one."""


class MNISTFormatError(ValueError):
    """An MNIST file passed its checksum check but is not the IDX layout we expect."""


# ----------------------------------------------------------------------------------------------- MNIST

_sha_cache: dict[Path, str] = {}
_array_cache: dict[tuple[Path, str], tuple[np.ndarray, np.ndarray]] = {}


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_sha256sums(root: Path) -> dict[str, str]:
    """``{file name: sha256}`` from ``root/SHA256SUMS`` (``sha256sum`` format: ``<hex>  <name>``)."""
    sums_path = root / "SHA256SUMS"
    if not sums_path.is_file():
        raise MNISTChecksumError(f"{sums_path}: checksum list is missing; {_RESTORE_HINT}")
    sums = {}
    for line_no, line in enumerate(sums_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise MNISTChecksumError(f"{sums_path}:{line_no}: expected '<sha256>  <file>', got {line!r}")
        sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def verify_mnist_file(root: Path, name: str) -> Path:
    """Path of ``root/MNIST/raw/<name>`` after checking its sha256 against ``root/SHA256SUMS``.

    Raises :class:`MNISTChecksumError` (naming the file, the expected and the actual hash, and how to
    restore the copy) if the file is missing, not listed, or altered.
    """
    path = root / "MNIST" / "raw" / name
    expected = read_sha256sums(root).get(name)
    if expected is None:
        raise MNISTChecksumError(f"{name} is not listed in {root / 'SHA256SUMS'}; {_RESTORE_HINT}")
    if not path.is_file():
        raise MNISTChecksumError(
            f"{path}: MNIST file is missing (expected sha256 {expected}, actual: no file); {_RESTORE_HINT}"
        )
    actual = _sha_cache.get(path) or sha256_of(path)
    if actual != expected:
        raise MNISTChecksumError(
            f"{path}: sha256 mismatch, expected {expected}, actual {actual}; the file is corrupted or "
            f"was replaced; {_RESTORE_HINT}"
        )
    _sha_cache[path] = actual
    return path


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Decode a gzipped IDX file of unsigned bytes into an array shaped by its header."""
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 4:
        raise MNISTFormatError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise MNISTFormatError(f"{path}: IDX magic {magic:#010x}, expected {expected_magic:#010x}")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header_len + math.prod(dims):
        raise MNISTFormatError(
            f"{path}: header says dims {dims} ({math.prod(dims)} bytes) but the payload has "
            f"{len(raw) - header_len} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def mnist_arrays(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw MNIST as ``(images uint8 (N, 28, 28), labels int64 (N,))``, verified and cached per process.

    Args:
        split: ``"train"`` (60,000 digits) or ``"test"`` (10,000 digits).
        root: directory holding ``SHA256SUMS`` and ``MNIST/raw/``; default the repository's ``data/mnist``.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"unknown MNIST split {split!r}; expected one of {sorted(MNIST_FILES)}")
    root = Path(root if root is not None else DEFAULT_MNIST_ROOT).resolve()
    key = (root, split)
    if key not in _array_cache:
        image_name, label_name = MNIST_FILES[split]
        images = read_idx(verify_mnist_file(root, image_name), _IDX_IMAGES_MAGIC)
        labels = read_idx(verify_mnist_file(root, label_name), _IDX_LABELS_MAGIC)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise MNISTFormatError(f"{image_name}: images have shape {images.shape}, expected (N, 28, 28)")
        if labels.shape != (images.shape[0],):
            raise MNISTFormatError(
                f"{label_name}: {labels.shape} labels for {images.shape[0]} images in {image_name}"
            )
        if labels.max() > 9:
            raise MNISTFormatError(f"{label_name}: label {labels.max()} outside 0..9")
        _array_cache[key] = (images, labels.astype(np.int64))
    return _array_cache[key]


def mnist_checksums(root: str | Path | None = None) -> dict[str, str]:
    """The verified sha256 of each of the four MNIST files (recorded in training metrics)."""
    root = Path(root if root is not None else DEFAULT_MNIST_ROOT).resolve()
    names = [name for pair in MNIST_FILES.values() for name in pair]
    return {name: _sha_cache[verify_mnist_file(root, name)] for name in names}


def normalize_images(images: np.ndarray | Tensor) -> Tensor:
    """uint8 pixels → float32 ``(x / 255 − MNIST_MEAN) / MNIST_STD`` with the registry's constants."""
    # torch.tensor copies: the cached arrays are read-only views of the decompressed bytes.
    pixels = torch.tensor(np.asarray(images), dtype=torch.float32)
    return (pixels / 255.0 - MNIST_MEAN) / MNIST_STD


def mnist_tensors(split: str = "train", root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Normalised MNIST: ``(float32 (N, 28, 28), int64 (N,))``; see :func:`mnist_arrays` for arguments."""
    images, labels = mnist_arrays(split, root)
    return normalize_images(images), torch.from_numpy(labels.copy())


# ------------------------------------------------------------------------------------- generated sets

def _split(x: Tensor, y: Tensor, test_fraction: float, generator: torch.Generator):
    """Shuffle with ``generator`` and cut off the last ``test_fraction`` as the held-out set."""
    order = torch.randperm(len(x), generator=generator)
    n_test = int(round(len(x) * test_fraction))
    train_idx, test_idx = order[n_test:], order[:n_test]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def make_linear(n_samples: int = 5000, noise: float = 0.5, test_fraction: float = 0.2, seed: int = DATA_SEED):
    """``linear``: x ~ U(−5, 5), one feature; y = 2x + 1 + ε with ε ~ N(0, noise²) (noise=0.5).

    Returns ``(x_train, y_train, x_test, y_test)``, float32 shaped ``(n, 1)``; defaults give 4000/1000.
    A least-squares fit recovers weight 2 and bias 1 to about ±0.02.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n_samples, 1, generator=gen) * 10.0 - 5.0
    y = 2.0 * x + 1.0 + noise * torch.randn(n_samples, 1, generator=gen)
    return _split(x, y, test_fraction, gen)


# Fixed coefficients of the regression10 target (part of the data set's definition, not drawn per seed).
REGRESSION10_WEIGHTS = (1.0, -2.0, 0.5, 1.5, -1.0, 0.8, -0.3, 0.0, 2.0, -1.2)


def make_regression10(n_samples: int = 5000, noise: float = 0.1, test_fraction: float = 0.2,
                      seed: int = DATA_SEED):
    """``regression10``: 10 features x ~ N(0, 1); a fixed non-linear target plus small noise::

        y = Σᵢ wᵢ·xᵢ + 0.5·x₀·x₁ + sin(2·x₂) + 0.5·|x₃| + ε,   ε ~ N(0, noise²), noise=0.1
        w = (1.0, −2.0, 0.5, 1.5, −1.0, 0.8, −0.3, 0.0, 2.0, −1.2)

    The linear part carries most of the variance (≈14.7 of ≈15.8); the products, sine and kink reward a
    non-linear model. Returns float32 ``x (n, 10)``, ``y (n, 1)`` split 4000/1000 by default.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, 10, generator=gen)
    weights = torch.tensor(REGRESSION10_WEIGHTS)
    y = (x @ weights + 0.5 * x[:, 0] * x[:, 1] + torch.sin(2.0 * x[:, 2]) + 0.5 * x[:, 3].abs()
         + noise * torch.randn(n_samples, generator=gen))
    return _split(x, y.unsqueeze(1), test_fraction, gen)


def make_moons(n_samples: int = 2000, noise: float = 0.1, scale: float = 2.0, test_fraction: float = 0.2,
               seed: int = DATA_SEED):
    """``moons``: two interleaved half-circles in 2-D with Gaussian noise; labels 0 (upper) / 1 (lower).

    Class 0: (cos t − 0.5, sin t − 0.25); class 1: (0.5 − cos t, 0.25 − sin t); t ~ U(0, π); then
    N(0, noise²) added to each coordinate (noise=0.1), and everything multiplied by ``scale`` (2.0).
    This is the classic layout centred on the origin and stretched to about [−3, 3] × [−1.5, 1.5].
    Half the samples per class. Returns float32 ``x (n, 2)`` and float32 ``y (n, 1)`` in {0, 1} (the
    target of ``BCELoss``), split 1600/400 by default.
    """
    gen = torch.Generator().manual_seed(seed)
    n_upper = n_samples // 2
    n_lower = n_samples - n_upper
    t_upper = torch.rand(n_upper, generator=gen) * math.pi
    t_lower = torch.rand(n_lower, generator=gen) * math.pi
    # Centred on the origin (class 1 is class 0 mirrored through it) and scaled ×2, so the kinks of
    # default-initialised ReLU units fall inside the data: with the classic layout a 10-unit MLP got stuck
    # near 90% for about one seed in five.
    upper = torch.stack([torch.cos(t_upper) - 0.5, torch.sin(t_upper) - 0.25], dim=1)
    lower = torch.stack([0.5 - torch.cos(t_lower), 0.25 - torch.sin(t_lower)], dim=1)
    x = scale * (torch.cat([upper, lower]) + noise * torch.randn(n_samples, 2, generator=gen))
    y = torch.cat([torch.zeros(n_upper), torch.ones(n_lower)]).unsqueeze(1)
    return _split(x, y, test_fraction, gen)


def make_smoothstep(n_samples: int = 4000, noise: float = 0.02, test_fraction: float = 0.2,
                    seed: int = DATA_SEED):
    """``smoothstep``: x ~ U(−1, 1)², a sum of two soft steps along different directions::

        y = S(0.5 + 0.75·x₀ + 0.5·x₁) + 0.5·S(0.5 − 2·x₁) + ε,   ε ~ N(0, noise²), noise=0.02

    with S the clamped quintic smootherstep. A wide gentle step plus a narrow one; SmoothStepNet's hidden
    units have exactly this form, so it can fit the surface closely. Float32 ``x (n, 2)``, ``y (n, 1)``,
    split 3200/800 by default.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n_samples, 2, generator=gen) * 2.0 - 1.0
    y = (smootherstep(0.5 + 0.75 * x[:, 0] + 0.5 * x[:, 1]) + 0.5 * smootherstep(0.5 - 2.0 * x[:, 1])
         + noise * torch.randn(n_samples, generator=gen))
    return _split(x, y.unsqueeze(1), test_fraction, gen)


# One-line definitions recorded in the metrics file next to each generator's parameters.
FORMULAS = {
    "linear": "x ~ U(-5, 5); y = 2x + 1 + N(0, noise^2)",
    "regression10": "x ~ N(0, I_10); y = x.w + 0.5*x0*x1 + sin(2*x2) + 0.5*|x3| + N(0, noise^2), "
                    f"w = {REGRESSION10_WEIGHTS}",
    "moons": "class 0: (cos t - 0.5, sin t - 0.25), class 1: (0.5 - cos t, 0.25 - sin t), t ~ U(0, pi), "
             "+ N(0, noise^2 I), all times scale",
    "smoothstep": "x ~ U(-1, 1)^2; y = S(0.5 + 0.75*x0 + 0.5*x1) + 0.5*S(0.5 - 2*x1) + N(0, noise^2), "
                  "S = clamped smootherstep z^3(6z^2 - 15z + 10)",
}
GENERATORS = {
    "linear": make_linear,
    "regression10": make_regression10,
    "moons": make_moons,
    "smoothstep": make_smoothstep,
}
DATASETS = ("mnist", *GENERATORS)


# ----------------------------------------------------------------------------------------- one entry

@dataclass
class Dataset:
    """In-memory train and held-out tensors plus a description recorded in the training metrics."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    info: dict = field(default_factory=dict)


def load_dataset(name: str, *, limit: int | None = None, mnist_root: str | Path | None = None,
                 seed: int = DATA_SEED) -> Dataset:
    """Any data set by name (``mnist``, ``linear``, ``regression10``, ``moons``, ``smoothstep``).

    Args:
        limit: keep only the first ``limit`` training and the first ``limit`` held-out samples (fast
            smoke runs and tests); default None keeps everything.
        mnist_root: MNIST directory, default the repository's ``data/mnist``.
        seed: seed of the generated sets (ignored for MNIST); default ``DATA_SEED`` = 0.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples, got {limit}")
    if name == "mnist":
        x_train, y_train = mnist_tensors("train", mnist_root)
        x_test, y_test = mnist_tensors("test", mnist_root)
        info = {"source": "data/mnist/MNIST/raw (real MNIST, verified)",
                "sha256": mnist_checksums(mnist_root),
                "normalize": {"mean": MNIST_MEAN, "std": MNIST_STD}}
    elif name in GENERATORS:
        make = GENERATORS[name]
        x_train, y_train, x_test, y_test = make(seed=seed)
        info = {"generator": make.__name__, "formula": FORMULAS[name], "seed": seed, **_defaults_of(make)}
    else:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    if limit is not None:
        x_train, y_train, x_test, y_test = x_train[:limit], y_train[:limit], x_test[:limit], y_test[:limit]
    info.update(n_train=len(x_train), n_test=len(x_test))
    return Dataset(name, x_train, y_train, x_test, y_test, info)


def _defaults_of(func) -> dict:
    """Keyword defaults of a generator except ``seed`` (its parameters, for the metrics file)."""
    return {name: p.default for name, p in inspect.signature(func).parameters.items()
            if p.default is not inspect.Parameter.empty and name != "seed"}
