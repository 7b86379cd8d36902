"""serve/package.py: real torch-model-archiver builds from the repository's models/ and handlers/."""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from models.registry import REGISTRY, get_spec
from paths import REPO_ROOT
from serve.package import (
    PackagingError,
    archive_is_current,
    build_archive,
    ensure_weights,
    package_models,
    parse_model_names,
)


@pytest.fixture(scope="module")
def fresh_weights(tmp_path_factory) -> Path:
    """Untrained state_dicts for every model (packaging does not care whether weights are trained)."""
    directory = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    for name, spec in REGISTRY.items():
        torch.save(spec.build().state_dict(), directory / f"{name}.pt")
    return directory


def read_archive(path: Path) -> tuple[dict, dict, list[str]]:
    """(MANIFEST.json, model-config.yaml, member names) of a .mar."""
    with zipfile.ZipFile(path) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(mar.read(manifest["model"]["configFile"]))
        return manifest, config, mar.namelist()


@pytest.mark.parametrize("name", list(REGISTRY))
def test_archive_manifest_config_and_contents(tmp_path, fresh_weights, name):
    spec = get_spec(name)
    archive = build_archive(spec, fresh_weights / f"{name}.pt", tmp_path)
    assert archive == tmp_path / f"{name}.mar"
    manifest, config, members = read_archive(archive)

    model = manifest["model"]
    assert model["modelName"] == name and model["modelVersion"] == spec.version
    assert model["handler"] == Path(spec.handler).name
    assert model["modelFile"] == Path(spec.model_file).name
    assert model["serializedFile"] == f"{name}.pt"
    assert config["batchSize"] == spec.batch_size and config["maxBatchDelay"] == spec.max_batch_delay_ms
    assert config["minWorkers"] == config["maxWorkers"] == spec.workers

    # The handler/model files at the root can import the packages shipped next to them.
    for package in ("models", "handlers", "wire"):
        sources = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / package).rglob("*.py")
                         if "__pycache__" not in p.parts)
        assert sources and set(sources) <= set(members)
    assert not [m for m in members if m.endswith(".pyc") or "__pycache__" in m]
    with zipfile.ZipFile(archive) as mar:
        state = torch.load(io.BytesIO(mar.read(f"{name}.pt")), weights_only=True)
    expected = torch.load(fresh_weights / f"{name}.pt", weights_only=True)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_image_models_get_the_image_handler():
    for spec in REGISTRY.values():
        expected = "handlers/image_classifier.py" if spec.task == "classification" else "handlers/tabular.py"
        assert spec.handler == expected, spec.name


def test_failed_build_keeps_the_existing_archive(tmp_path, fresh_weights):
    spec = get_spec("mlp")
    archive = build_archive(spec, fresh_weights / "mlp.pt", tmp_path)
    before = archive.read_bytes()
    with pytest.raises(PackagingError, match="torch-model-archiver failed for mlp"):
        build_archive(spec, tmp_path / "no-such-weights.pt", tmp_path)
    assert archive.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.mar"]  # no half-built leftovers


def test_archive_is_rebuilt_only_when_an_input_is_newer(tmp_path, fresh_weights, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "mlp.pt").write_bytes((fresh_weights / "mlp.pt").read_bytes())
    store = tmp_path / "store"
    package_models(["mlp"], weights, store)
    archive = store / "mlp.mar"
    assert archive_is_current(archive, weights / "mlp.pt")
    built_at = archive.stat().st_mtime_ns

    package_models(["mlp"], weights, store)
    assert "up to date" in capsys.readouterr().out
    assert archive.stat().st_mtime_ns == built_at

    # Retrained weights: make the archive older than them.
    earlier = (weights / "mlp.pt").stat().st_mtime - 10
    os.utime(archive, (earlier, earlier))
    assert not archive_is_current(archive, weights / "mlp.pt")
    package_models(["mlp"], weights, store)
    assert "built" in capsys.readouterr().out.splitlines()[-1]
    assert archive_is_current(archive, weights / "mlp.pt")


@pytest.mark.slow
def test_missing_weights_are_trained_first(tmp_path):
    spec = get_spec("linearregression")
    weights = ensure_weights(spec, tmp_path, train_args=("--epochs", "1", "--limit", "200", "--no-progress"))
    assert weights == tmp_path / "linearregression.pt"
    state = torch.load(weights, weights_only=True)
    model = spec.build()
    model.load_state_dict(state)


def test_model_names():
    assert parse_model_names(None) == parse_model_names("all") == list(REGISTRY)
    assert parse_model_names(" mlp , mnistnet ") == ["mlp", "mnistnet"]
    with pytest.raises(KeyError, match="known models"):
        parse_model_names("mlp,resnet")


def test_a_version_builds_its_own_archive_beside_the_served_one(tmp_path, fresh_weights):
    """--version V: <name>-v<V>.pt → <name>-v<V>.mar with manifest version V; <name>.mar is not touched."""
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(1)
    candidate = get_spec("mlp").build().state_dict()
    torch.save(candidate, weights / "mlp-v2.0.pt")
    store = tmp_path / "store"
    served = build_archive(get_spec("mlp"), fresh_weights / "mlp.pt", store)
    before = served.read_bytes()

    archives = package_models(["mlp"], weights, store, version="2.0")
    assert archives == [store / "mlp-v2.0.mar"]
    manifest, config, _ = read_archive(archives[0])
    assert manifest["model"]["modelName"] == "mlp" and manifest["model"]["modelVersion"] == "2.0"
    assert served.read_bytes() == before
    with zipfile.ZipFile(archives[0]) as mar:
        metadata = json.loads(mar.read("oip_metadata.json"))
        state = torch.load(io.BytesIO(mar.read(manifest["model"]["serializedFile"])), weights_only=True)
    assert metadata["versions"] == ["2.0"]
    assert all(torch.equal(state[k], candidate[k]) for k in candidate)


def test_a_version_without_weights_is_not_trained_here(tmp_path):
    with pytest.raises(PackagingError, match=r"mlp-v3\.1\.pt is missing; train it first with "
                                             r"`python -m train mlp --version 3\.1`"):
        package_models(["mlp"], tmp_path, tmp_path / "store", version="3.1")
    assert not (tmp_path / "store" / "mlp-v3.1.mar").exists()


@pytest.mark.parametrize("argv, message", [
    (["--models", "mlp", "--version", "../x"], "bad version '../x'"),
    (["--models", "mlp,mnistnet", "--version", "2.0"], "--version builds one model's version"),
])
def test_bad_version_arguments(argv, message, capsys):
    from serve.package import main

    assert main(argv) == 1
    assert message in capsys.readouterr().err
