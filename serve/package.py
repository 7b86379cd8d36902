"""Package trained models into TorchServe archives: ``python -m serve.package``.

For every requested model (default: all registered models) this

1. trains it first if ``<weights-dir>/<name>.pt`` is missing (``python -m train <name>``);
2. stages a build directory holding the ``models/``, ``handlers/`` and ``wire/`` packages (``.py`` files
   only), so that the handler and the model file can import them inside the archive;
3. writes a per-model YAML config (workers, dynamic batching, response timeout) from the registry;
4. runs ``torch-model-archiver`` into a temporary export directory next to the store and moves the
   result over ``<store>/<name>.mar`` with ``os.replace``, so a failed build never destroys a good
   archive and a running TorchServe never sees a half-written file.

An archive that is newer than its weights and every packaged source file is left alone unless
``--rebuild`` is given. Usage::

    python -m serve.package [--models a,b] [--weights-dir weights] [--store model_store] [--rebuild]
    python -m serve.package --models mnistnet --version 2.0   # weights/mnistnet-v2.0.pt → model_store/mnistnet-v2.0.mar

A version other than the default (1.0) reads ``<name>-v<V>.pt`` and writes ``<name>-v<V>.mar`` (model name
``<name>``, manifest version V: what ``python -m serve rollout <name> V`` registers); it is never trained here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from models.registry import REGISTRY, ModelSpec, get_spec
from paths import MODEL_STORE, REPO_ROOT, WEIGHTS_DIR

# Python packages shipped inside every archive (only their .py files): the handlers and what they import.
ARCHIVED_PACKAGES = ("models", "handlers", "wire")
# Seconds TorchServe waits for one batch before it declares the worker stuck and restarts it.
RESPONSE_TIMEOUT_S = 120


class PackagingError(RuntimeError):
    """A model could not be trained or archived; the message says which and why."""


def parse_model_names(text: str | None) -> list[str]:
    """Model names from a comma-separated list; ``None``, ``""`` or ``"all"`` mean every registered model.

    Raises ``KeyError`` (naming the known models) for an unknown name.
    """
    if not text or text.strip().lower() == "all":
        return list(REGISTRY)
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        get_spec(name)
    return names


def ensure_weights(
    spec: ModelSpec, weights_dir: Path, root: Path = REPO_ROOT, train_args: tuple[str, ...] = ()
) -> Path:
    """Path of ``<weights_dir>/<artifact stem>.pt``, training the model first (``python -m train``) if it is missing.

    ``train_args`` are extra ``python -m train`` options (default none: the registry's training setup). The
    weights of a non-default version are never trained here (which training makes a new version is the user's
    choice): a missing one raises ``PackagingError`` naming the command.
    """
    weights = weights_dir / f"{spec.artifact_stem}.pt"
    if weights.is_file():
        return weights
    if spec.artifact_stem != spec.name:
        raise PackagingError(f"{spec.name} version {spec.version}: {weights} is missing; train it first with "
                             f"`python -m train {spec.name} --version {spec.version}`")
    print(f"  {spec.name}: {weights} is missing, training it (python -m train {spec.name})", flush=True)
    cmd = [sys.executable, "-m", "train", spec.name, "--output-dir", str(weights_dir), *train_args]
    result = subprocess.run(cmd, cwd=root)
    if result.returncode != 0 or not weights.is_file():
        raise PackagingError(
            f"training {spec.name} failed (exit code {result.returncode}); {weights} was not written"
        )
    return weights


def model_config(spec: ModelSpec) -> dict:
    """The per-model TorchServe settings written into the archive as its ``--config-file``."""
    return {
        "minWorkers": spec.workers,
        "maxWorkers": spec.workers,
        "batchSize": spec.batch_size,
        "maxBatchDelay": spec.max_batch_delay_ms,
        "responseTimeout": RESPONSE_TIMEOUT_S,
    }


def source_files(root: Path = REPO_ROOT) -> list[Path]:
    """The ``.py`` files of every package in ``ARCHIVED_PACKAGES`` (bytecode caches excluded)."""
    files = []
    for package in ARCHIVED_PACKAGES:
        files += [p for p in sorted((root / package).rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def stage_packages(staging: Path, root: Path = REPO_ROOT) -> None:
    """Copy the archived packages' ``.py`` files into ``staging/<package>/`` (keeping subfolders).

    torch-model-archiver copies the CONTENTS of an ``--extra-files`` directory into the archive root,
    so passing ``staging`` ships ``models/``, ``handlers/`` and ``wire/`` as importable packages.
    """
    for src in source_files(root):
        dst = staging / src.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def archiver_command(
    spec: ModelSpec, weights: Path, staging: Path, config_file: Path | None, export_dir: Path, root: Path = REPO_ROOT,
    name: str | None = None, handler: Path | None = None,
) -> list[str]:
    """The ``torch-model-archiver`` command line that builds ``<export_dir>/<name>.mar``.

    ``name``/``handler`` default to the spec's; ``config_file`` None builds without a model-config YAML.
    """
    venv_tool = Path(sys.executable).parent / "torch-model-archiver"
    tool = [str(venv_tool)] if venv_tool.exists() else [sys.executable, "-m", "model_archiver.model_packaging"]
    return tool + [
        "--model-name", name or spec.name,
        "--version", spec.version,
        "--model-file", str(root / spec.model_file),
        "--serialized-file", str(weights),
        "--handler", str(handler or root / spec.handler),
        "--extra-files", str(staging),
        *(["--config-file", str(config_file)] if config_file is not None else []),
        "--export-path", str(export_dir),
        "--force",
    ]


def archive_is_current(archive: Path, weights: Path, root: Path = REPO_ROOT) -> bool:
    """True if ``archive`` exists and is newer than ``weights``, every packaged source file and this script."""
    if not archive.is_file() or not weights.is_file():
        return False
    inputs = [weights, Path(__file__), *source_files(root)]
    return archive.stat().st_mtime > max(p.stat().st_mtime for p in inputs)


def build_archive(
    spec: ModelSpec, weights: Path, store: Path, root: Path = REPO_ROOT, *,
    name: str | None = None, handler: Path | None = None, config: dict | None = None,
) -> Path:
    """Build ``<store>/<name>.mar`` from ``weights`` atomically and return its path.

    The benchmark's variants use the keywords: ``name`` (archive/model name, default the spec's),
    ``handler`` (handler file, default the spec's), ``config`` (the model-config YAML; default
    :func:`model_config`, ``{}`` for none, i.e. TorchServe's defaults).
    Raises ``PackagingError`` with the archiver's output if it fails; an existing archive is kept then.
    """
    name = name or spec.name
    file_stem = spec.artifact_stem if name == spec.name else name
    for needed in (root / spec.model_file, Path(handler or root / spec.handler)):
        if not needed.is_file():
            shown = needed.relative_to(root) if needed.is_relative_to(root) else needed
            raise PackagingError(f"{name}: {shown} does not exist")
    store.mkdir(parents=True, exist_ok=True)
    target = store / f"{file_stem}.mar"
    config = model_config(spec) if config is None else config
    with tempfile.TemporaryDirectory(prefix=f"package-{name}-") as tmp:
        tmp = Path(tmp)
        staging = tmp / "extra"
        stage_packages(staging, root)
        # GET /v2/models/<name> answers this file (serve/torchserve/java/OpenInferenceProtocolRequestHandler.java).
        (staging / "oip_metadata.json").write_text(json.dumps(spec.oip_metadata(), indent=1) + "\n")
        config_file = tmp / "model-config.yaml" if config else None
        if config_file is not None:
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        # The archiver assembles files in $TMPDIR/<model-name>: give it a private one so two builds of
        # the same model (e.g. `make serve` and the e2e tests) never mix their files.
        archiver_tmp = tmp / "archiver-tmp"
        archiver_tmp.mkdir()
        # Export next to the target so os.replace is a same-filesystem rename.
        export_dir = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=store))
        try:
            cmd = archiver_command(spec, weights, staging, config_file, export_dir, root, name, handler)
            env = {**os.environ, "TMPDIR": str(archiver_tmp)}
            result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
            built = export_dir / f"{name}.mar"
            if result.returncode != 0 or not built.is_file():
                output = (result.stdout + result.stderr).strip()
                raise PackagingError(
                    f"torch-model-archiver failed for {name} (exit code {result.returncode}):\n{output}"
                )
            os.replace(built, target)  # the archiver names it <name>.mar; a version other than 1.0 gets its own
        finally:
            shutil.rmtree(export_dir, ignore_errors=True)
    return target


def package_models(
    names: list[str],
    weights_dir: Path = WEIGHTS_DIR,
    store: Path = MODEL_STORE,
    rebuild: bool = False,
    root: Path = REPO_ROOT,
    version: str | None = None,
) -> list[Path]:
    """Train (if needed) and archive every model in ``names``; returns the archive paths in order.

    Prints one progress line per model. Stops at the first failure with ``PackagingError``.
    """
    archives = []
    for i, name in enumerate(names, 1):
        spec = get_spec(name).at_version(version)
        prefix = f"[{i}/{len(names)}] {name} {spec.version}:"
        start = time.perf_counter()
        weights = ensure_weights(spec, weights_dir, root)
        target = store / f"{spec.artifact_stem}.mar"
        if not rebuild and archive_is_current(target, weights, root):
            print(f"{prefix} {target} is up to date", flush=True)
        else:
            build_archive(spec, weights, store, root)
            size_kb = target.stat().st_size / 1024
            print(f"{prefix} built {target} ({size_kb:.0f} kB, {time.perf_counter() - start:.1f} s)", flush=True)
        archives.append(target)
    return archives


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve.package",
        description="Train missing weights and build TorchServe .mar archives for the registered models.",
    )
    parser.add_argument("--models", default="all", help="comma-separated model names (default: all)")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR,
                        help="where <name>.pt state_dicts live (default: weights/)")
    parser.add_argument("--store", type=Path, default=MODEL_STORE,
                        help="where <name>.mar archives are written (default: model_store/)")
    parser.add_argument("--version", help="model version to build (default 1.0: <name>.pt → <name>.mar; "
                                          "V: <name>-v<V>.pt → <name>-v<V>.mar, manifest version V)")
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild archives even when they are newer than their inputs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        names = parse_model_names(args.models)
        if args.version is not None and len(names) != 1:
            raise PackagingError("--version builds one model's version: name it with --models <model>")
        package_models(names, args.weights_dir.resolve(), args.store.resolve(), args.rebuild, version=args.version)
    except (KeyError, ValueError, PackagingError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
