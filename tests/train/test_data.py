"""train/data.py: the verified MNIST copy, its checksum guard and IDX reader, and the generated data sets."""
from __future__ import annotations

import gzip
import hashlib
import shutil

import numpy as np
import pytest
import torch

from models.registry import MNIST_MEAN, MNIST_STD
from train import data
from train.data import (DEFAULT_MNIST_ROOT, GENERATORS, MNISTChecksumError, MNISTFormatError, load_dataset,
                        mnist_arrays, mnist_tensors)

# Published per-digit counts of the MNIST training and test sets.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ------------------------------------------------------------------------------------------ real MNIST

@pytest.mark.parametrize("split, n, first, counts", [
    ("train", 60_000, [5, 0, 4, 1, 9], TRAIN_COUNTS),
    ("test", 10_000, [7, 2, 1, 0, 4], TEST_COUNTS),
])
def test_mnist_shapes_labels_and_counts(split, n, first, counts):
    images, labels = mnist_arrays(split)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert labels[:5].tolist() == first
    per_class = np.bincount(labels, minlength=10)
    assert per_class.sum() == n
    assert per_class.tolist() == counts


def test_mnist_pixel_statistics_match_registry_constants():
    images, _ = mnist_arrays("train")
    # From the histogram of the 47M pixel values: exact and much faster than float arrays.
    counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256) / 255.0
    mean = (counts * levels).sum() / counts.sum()
    std = np.sqrt((counts * (levels - mean) ** 2).sum() / counts.sum())
    assert mean == pytest.approx(0.1307, abs=1e-4)
    assert std == pytest.approx(0.3081, abs=1e-4)
    assert (MNIST_MEAN, MNIST_STD) == (0.1307, 0.3081)


def test_normalised_tensors_use_registry_constants():
    images, labels = mnist_arrays("test")
    x, y = mnist_tensors("test")
    assert x.shape == (10_000, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(labels))
    expected = (images[:3].astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    assert np.allclose(x[:3].numpy(), expected, atol=1e-6)
    train_x, _ = mnist_tensors("train")
    assert train_x.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert train_x.std().item() == pytest.approx(1.0, abs=1e-3)


def test_mnist_arrays_are_cached_per_process():
    assert mnist_arrays("train")[0] is mnist_arrays("train")[0]


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown MNIST split 'validation'"):
        mnist_arrays("validation")


# -------------------------------------------------------------------------------------- checksum guard

@pytest.fixture
def mnist_copy(tmp_path):
    """A private copy of data/mnist that a test may damage."""
    root = tmp_path / "mnist"
    shutil.copytree(DEFAULT_MNIST_ROOT, root)
    for path in root.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return root


def test_copy_of_the_real_files_loads(mnist_copy):
    images, labels = mnist_arrays("test", mnist_copy)
    assert images.shape == (10_000, 28, 28)
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_flipped_byte_raises_clear_checksum_error(mnist_copy):
    target = mnist_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    expected = hashlib.sha256(target.read_bytes()).hexdigest()
    blob = bytearray(target.read_bytes())
    blob[100] ^= 0xFF
    target.write_bytes(bytes(blob))
    actual = hashlib.sha256(bytes(blob)).hexdigest()
    with pytest.raises(MNISTChecksumError) as excinfo:
        mnist_arrays("test", mnist_copy)
    message = str(excinfo.value)
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert expected in message and actual in message
    assert "git checkout -- data/mnist" in message


def test_missing_file_raises_clear_checksum_error(mnist_copy):
    (mnist_copy / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(MNISTChecksumError, match=r"train-images-idx3-ubyte\.gz: MNIST file is missing"):
        mnist_arrays("train", mnist_copy)


def test_missing_checksum_list_is_an_error(mnist_copy):
    (mnist_copy / "SHA256SUMS").unlink()
    with pytest.raises(MNISTChecksumError, match="SHA256SUMS: checksum list is missing"):
        mnist_arrays("test", mnist_copy)


def test_idx_header_is_checked_even_when_checksum_matches(mnist_copy):
    # A labels file written with the images magic, and SHA256SUMS updated to match it.
    bad = gzip.compress((0x00000803).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(3))
    target = mnist_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(bad)
    sums = mnist_copy / "SHA256SUMS"
    lines = [line for line in sums.read_text().splitlines() if "t10k-labels" not in line]
    lines.append(f"{hashlib.sha256(bad).hexdigest()}  t10k-labels-idx1-ubyte.gz")
    sums.write_text("\n".join(lines) + "\n")
    with pytest.raises(MNISTFormatError, match="IDX magic 0x00000803, expected 0x00000801"):
        mnist_arrays("test", mnist_copy)


def test_truncated_payload_is_detected(tmp_path):
    path = tmp_path / "short.gz"
    header = (0x00000801).to_bytes(4, "big") + (10).to_bytes(4, "big")
    path.write_bytes(gzip.compress(header + bytes(7)))
    with pytest.raises(MNISTFormatError, match=r"dims \(10,\)"):
        data.read_idx(path, 0x00000801)


# ------------------------------------------------------------------------------------- generated sets

@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_are_seeded_and_deterministic(name):
    make = GENERATORS[name]
    first, again, other = make(seed=3), make(seed=3), make(seed=4)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("name, width, n_train, n_test", [
    ("linear", 1, 4000, 1000),
    ("regression10", 10, 4000, 1000),
    ("moons", 2, 1600, 400),
    ("smoothstep", 2, 3200, 800),
])
def test_generator_shapes_and_split(name, width, n_train, n_test):
    x_train, y_train, x_test, y_test = GENERATORS[name]()
    assert x_train.shape == (n_train, width) and x_test.shape == (n_test, width)
    assert y_train.shape == (n_train, 1) and y_test.shape == (n_test, 1)
    for tensor in (x_train, y_train, x_test, y_test):
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
    # Train and held-out rows together are exactly the unsplit samples: a partition, nothing lost or reused.
    everything, _, none, _ = GENERATORS[name](test_fraction=0.0)
    assert len(none) == 0
    joined = torch.cat([x_train, x_test])
    assert torch.equal(joined[:, 0].sort().values, everything[:, 0].sort().values)


def test_linear_least_squares_recovers_slope_and_intercept():
    x, y, _, _ = GENERATORS["linear"]()
    design = torch.cat([x, torch.ones_like(x)], dim=1).double()
    weight, bias = torch.linalg.lstsq(design, y.double()).solution.flatten().tolist()
    assert weight == pytest.approx(2.0, abs=0.02)
    assert bias == pytest.approx(1.0, abs=0.05)
    assert x.min() >= -5 and x.max() <= 5


def test_regression10_follows_documented_formula():
    x, y, _, _ = GENERATORS["regression10"](noise=0.0)
    w = torch.tensor(data.REGRESSION10_WEIGHTS)
    formula = x @ w + 0.5 * x[:, 0] * x[:, 1] + torch.sin(2 * x[:, 2]) + 0.5 * x[:, 3].abs()
    assert torch.allclose(y.squeeze(1), formula, atol=1e-5)
    _, noisy, _, _ = GENERATORS["regression10"]()
    assert (noisy - y).std().item() == pytest.approx(0.1, rel=0.1)


def test_moons_are_balanced_binary_labels():
    x_train, y_train, x_test, y_test = GENERATORS["moons"]()
    labels = torch.cat([y_train, y_test])
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    assert labels.sum().item() == len(labels) / 2
    # Noise-free moons lie on circles of radius `scale` around their two centres.
    clean, label, _, _ = GENERATORS["moons"](noise=0.0, test_fraction=0.0)
    centres = torch.where(label == 0, torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.5]))
    assert torch.allclose((clean - centres).norm(dim=1), torch.full((len(clean),), 2.0), atol=1e-5)


def test_smoothstep_target_is_two_soft_steps():
    x, y, _, _ = GENERATORS["smoothstep"](noise=0.0)
    assert x.min() >= -1 and x.max() <= 1
    assert y.min() >= 0 and y.max() <= 1.5 + 1e-6
    expected = data.smootherstep(0.5 + 0.75 * x[:, 0] + 0.5 * x[:, 1]) + 0.5 * data.smootherstep(
        0.5 - 2 * x[:, 1])
    assert torch.allclose(y.squeeze(1), expected)


def test_load_dataset_limit_and_info():
    dataset = load_dataset("moons", limit=50)
    assert len(dataset.x_train) == 50 and len(dataset.x_test) == 50
    assert dataset.info["generator"] == "make_moons"
    assert dataset.info["noise"] == 0.1 and dataset.info["seed"] == data.DATA_SEED
    mnist = load_dataset("mnist", limit=10)
    assert mnist.x_train.shape == (10, 28, 28)
    assert set(mnist.info["sha256"]) == {name for pair in data.MNIST_FILES.values() for name in pair}


def test_load_dataset_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="limit must be a positive"):
        load_dataset("linear", limit=0)
