"""train/trainer.py and ``python -m train``: short real runs, determinism, artifacts, CLI errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.registry import REGISTRY, TrainConfig, get_spec
from train import __main__ as cli
from train import trainer
from train.data import load_dataset
from train.trainer import evaluate, load_trained, shift_images, train_model

from paths import REPO_ROOT as REPO
from servers import clean_env
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMON_KEYS = {
    "model", "model_class", "task", "dataset", "epochs", "batch_size", "lr", "weight_decay", "lr_schedule",
    "augment_shift", "seed", "limit", "seconds", "torch_version", "device", "parameter_count", "data",
    "history",
}


def quiet_train(spec, output_dir, **kwargs):
    return train_model(spec, output_dir, progress=False, log=lambda line: None, device="cpu", **kwargs)


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=clean_env())


def assert_valid_png(path: Path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()


def initial_held_out_loss(spec, limit):
    """Held-out loss of the untrained network exactly as train_model initialises it (seeded)."""
    data = load_dataset(spec.dataset, limit=limit)
    torch.manual_seed(spec.train.seed)
    model = spec.build()
    return evaluate(model, spec.task, data.x_test, data.y_test, spec.task_info.loss())["loss"]


# ------------------------------------------------------------------------------------ training itself

@pytest.mark.parametrize("name, limit", [("mnistnet", 2000), ("regressionnet", None), ("mlp", None)])
def test_one_epoch_lowers_the_loss(tmp_path, name, limit):
    spec = get_spec(name).with_train(epochs=1)
    before = initial_held_out_loss(spec, limit)
    metrics = quiet_train(spec, tmp_path, limit=limit)
    assert metrics["history"]["held_out_loss"][0] < 0.8 * before


def test_mnist_subset_run_learns_digits(tmp_path):
    spec = get_spec("feedforwardnet").with_train(epochs=2)
    metrics = quiet_train(spec, tmp_path, limit=3000)
    assert metrics["test_accuracy"] > 0.8  # chance is 0.1
    assert len(metrics["history"]["train_loss"]) == 2
    assert metrics["history"]["train_loss"][1] < metrics["history"]["train_loss"][0]


def test_same_seed_gives_identical_weights(tmp_path):
    # mnistnet exercises dropout, shuffling and the shift augmentation, all of which draw random numbers.
    spec = get_spec("mnistnet").with_train(epochs=1, augment_shift=2, seed=7)
    quiet_train(spec, tmp_path / "a", limit=1000)
    quiet_train(spec, tmp_path / "b", limit=1000)
    quiet_train(spec.with_train(seed=8), tmp_path / "c", limit=1000)
    a, b, c = (torch.load(tmp_path / d / "mnistnet.pt", weights_only=True) for d in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


def test_linear_regression_records_learned_parameters(tmp_path):
    metrics = quiet_train(get_spec("linearregression"), tmp_path)
    weight, bias = metrics["learned"]["weight"][0], metrics["learned"]["bias"][0]
    assert weight == pytest.approx(2.0, abs=0.05)
    assert bias == pytest.approx(1.0, abs=0.05)
    state = torch.load(tmp_path / "linearregression.pt", weights_only=True)
    assert state["linear.weight"].item() == pytest.approx(weight)


def test_shift_images_moves_pixels_without_losing_them():
    images = torch.full((64, 28, 28), -1.0)
    images[:, 14, 14] = 5.0
    shifted = shift_images(images, 2, torch.Generator().manual_seed(0), fill=-1.0)
    assert shifted.shape == images.shape
    rows, cols = (shifted == 5.0).nonzero()[:, 1:].T
    assert len(rows) == 64  # exactly one bright pixel per image survives
    assert ((rows - 14).abs() <= 2).all() and ((cols - 14).abs() <= 2).all()
    assert len({(r, c) for r, c in zip(rows.tolist(), cols.tolist())}) > 5  # offsets differ per image
    border = shift_images(torch.zeros(8, 28, 28), 2, torch.Generator().manual_seed(1), fill=-1.0)
    assert set(border.unique().tolist()) <= {0.0, -1.0}


def test_cosine_schedule_decays_to_zero():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = trainer.make_scheduler(optimizer, TrainConfig(lr_schedule="cosine"), 10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------ artifacts

def test_classifier_artifacts(tmp_path):
    spec = get_spec("deepnet").with_train(epochs=1)
    metrics = quiet_train(spec, tmp_path, limit=500)
    model = spec.build()
    model.load_state_dict(torch.load(tmp_path / "deepnet.pt", weights_only=True))
    saved = json.loads((tmp_path / "deepnet.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert COMMON_KEYS | {"test_accuracy", "test_loss", "confusion_matrix"} <= saved.keys()
    assert saved["parameter_count"] == sum(p.numel() for p in model.parameters())
    assert saved["limit"] == 500 and saved["epochs"] == 1 and saved["device"] == "cpu"
    assert len(saved["data"]["sha256"]) == 4
    matrix = torch.tensor(saved["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum().item() == 500
    assert matrix.diagonal().sum().item() / 500 == pytest.approx(saved["test_accuracy"])
    assert_valid_png(tmp_path / "deepnet_curves.png")
    assert_valid_png(tmp_path / "deepnet_confusion.png")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert (tmp_path / "deepnet.pt").stat().st_mode & 0o777 == 0o644
    # load_trained gives the same predictions as the in-memory state.
    loaded = load_trained(spec, tmp_path)
    sample = torch.randn(4, 784)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(sample), model(sample))


@pytest.mark.parametrize("name, keys", [
    ("regressionnet", {"held_out_mse", "held_out_r2", "baseline_mse"}),
    ("smoothstepnet", {"held_out_mse", "held_out_r2", "baseline_mse"}),
    ("mlp", {"held_out_accuracy", "held_out_loss"}),
])
def test_small_model_artifacts(tmp_path, name, keys):
    spec = get_spec(name).with_train(epochs=2)
    quiet_train(spec, tmp_path)
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert COMMON_KEYS | keys <= saved.keys()
    assert saved["data"]["generator"].startswith("make_") and "formula" in saved["data"]
    assert len(saved["history"]["train_loss"]) == 2
    spec.build().load_state_dict(torch.load(tmp_path / f"{name}.pt", weights_only=True))
    assert_valid_png(tmp_path / f"{name}_curves.png")
    assert not (tmp_path / f"{name}_confusion.png").exists()
    if spec.task == "regression":
        assert saved["held_out_mse"] < saved["baseline_mse"]
        assert saved["held_out_r2"] == pytest.approx(1 - saved["held_out_mse"] / saved["baseline_mse"], abs=0.02)


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")

    def fail(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        trainer.atomic_write(target, b"new and complete")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_trains_and_missing_skips_existing(tmp_path):
    out = tmp_path / "w"
    first = run_cli("mlp", "--epochs", "1", "--output-dir", str(out), "--no-progress")
    assert first.returncode == 0, first.stderr
    assert "mlp epoch 1/1" in first.stdout and "held-out accuracy" in first.stdout
    weights = out / "mlp.pt"
    stamp = weights.stat().st_mtime_ns
    # `all --missing` trains only what has no .pt: give every other model a placeholder first.
    for name in REGISTRY:
        if name not in ("mlp", "linearregression"):
            (out / f"{name}.pt").write_bytes(b"placeholder")
    second = run_cli("all", "--missing", "--epochs", "1", "--output-dir", str(out), "--no-progress")
    assert second.returncode == 0, second.stderr
    assert "mlp: " in second.stdout and "skipped" in second.stdout
    assert "training linearregression" in second.stdout
    assert "training mlp" not in second.stdout and "training mnistnet" not in second.stdout
    assert weights.stat().st_mtime_ns == stamp
    state = torch.load(out / "linearregression.pt", weights_only=True)
    get_spec("linearregression").build().load_state_dict(state)


def test_cli_unknown_model_exits_2_listing_known_models():
    result = run_cli("resnet9000", "--epochs", "1")
    assert result.returncode == 2
    assert "unknown model 'resnet9000'" in result.stderr
    for name in REGISTRY:
        assert name in result.stderr


@pytest.mark.parametrize("args, complaint", [
    (["resnet9000"], "unknown model 'resnet9000'"),
    (["mlp", "--epochs", "0"], "--epochs: must be an integer >= 1"),
    (["mlp", "--epochs", "ten"], "--epochs: expected an integer >= 1, got 'ten'"),
    (["mlp", "--lr", "fast"], "--lr: expected a finite number > 0, got 'fast'"),
    (["mlp", "--lr", "inf"], "--lr: must be a finite number > 0"),
    (["mlp", "--lr", "-0.1"], "--lr: must be a finite number > 0"),
    (["mlp", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (["mlp", "--seed", "-1"], "--seed: must be an integer >= 0"),
    (["mlp", "--limit", "0"], "--limit: must be an integer >= 1"),
    ([], "the following arguments are required: NAME"),
])
def test_cli_rejects_bad_arguments(args, complaint, capsys, tmp_path):
    # The same parser `python -m train` runs (the subprocess tests above and below prove the exit path).
    with pytest.raises(SystemExit) as excinfo:
        cli.parse_args([*args, "--output-dir", str(tmp_path)])
    assert excinfo.value.code == 2
    stderr = capsys.readouterr().err
    assert complaint in stderr
    for name in REGISTRY:
        assert name in stderr, f"error message does not list {name}"


def test_cli_rejects_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli("mlp", "--output-dir", str(blocker / "weights"))
    assert result.returncode == 2
    assert "is not a writable directory" in result.stderr
    assert "mnistnet" in result.stderr
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = run_cli("mlp", "--output-dir", str(locked))
        assert result.returncode == 2 and "not a writable directory" in result.stderr


def test_a_version_never_overwrites_the_default_weights(tmp_path):
    """--version 2.0 writes <name>-v2.0.* and leaves <name>.pt (version 1.0) as it was."""
    from train.__main__ import main as train_main

    common = ["--output-dir", str(tmp_path), "--epochs", "1", "--limit", "64", "--no-progress"]
    assert train_main(["linearregression", *common]) == 0
    default = (tmp_path / "linearregression.pt").read_bytes()
    assert train_main(["linearregression", "--version", "2.0", "--seed", "3", *common]) == 0
    assert (tmp_path / "linearregression.pt").read_bytes() == default
    metrics = json.loads((tmp_path / "linearregression-v2.0.json").read_text())
    assert metrics["version"] == "2.0"
    spec = get_spec("linearregression").at_version("2.0")
    model = load_trained(spec, tmp_path)
    saved = torch.load(tmp_path / "linearregression-v2.0.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


@pytest.mark.parametrize("argv, message", [
    (["mlp", "--version", "v2"], "bad version 'v2'"),
    (["all", "--version", "2.0"], "give a model name, not 'all'"),
])
def test_bad_versions_are_refused(argv, message, capsys):
    from train.__main__ import main as train_main

    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
