"""Lay out this repository's archives as the storage of our KServe ServingRuntime (deploy/kserve/).

KServe's storage-initializer downloads an InferenceService's ``storageUri`` to ``/mnt/models`` (a
read-only volume of the predictor pod); our runtime (``servingruntime.yaml``: the project's own image)
starts TorchServe with ``--ts-config=/mnt/models/config/config.properties
--model-store=/mnt/models/model-store``, so the storage holds::

    <storageUri>/config/config.properties
    <storageUri>/model-store/<name>.mar        (one per served model)

The KServe ``config.properties`` is generated, never hand-edited, from the two sources of truth: the
repository's ``config.properties`` (limits, queue sizes, JVM flags, metrics, model API off, the gRPC
ports are carried over) and ``models/registry.py`` via ``serve/package.py`` (one ``model_snapshot``
entry per model: version, workers, batch size, batch delay, timeout: the same as ``make serve``). Only
the cluster-specific settings in KSERVE_SETTINGS differ. The committed copy in
``deploy/kserve/config/config.properties`` is checked against the generator by ``tests/deploy/test_deploy.py``,
and ``tests/kserve/test_kserve_replay.py`` serves a storage laid out by this script.

Usage (from the repository root, after ``make package``)::

    .venv/bin/python deploy/kserve/make_storage.py OUT_DIR          # OUT_DIR/config + OUT_DIR/model-store
    .venv/bin/python deploy/kserve/make_storage.py --write-config   # refresh the committed config
    .venv/bin/python deploy/kserve/make_storage.py --version mnistnet=2.0 OUT_DIR   # a canary's storage
    aws s3 cp --recursive OUT_DIR s3://BUCKET/torchserve-mnist      # or gsutil / a PVC copy
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from models.registry import REGISTRY, get_spec
from paths import MODEL_STORE, REPO_ROOT
from serve.package import model_config
from serve.server import load_properties

COMMITTED_CONFIG = REPO_ROOT / "deploy" / "kserve" / "config" / "config.properties"
ROOT_CONFIG = REPO_ROOT / "config.properties"
KSERVE_MODEL_STORE = "/mnt/models/model-store"

# Keys of the repository config that do not apply in the cluster (addresses, paths, auth); every
# other key (including the gRPC ports and oip_grpc_port) is carried over unchanged.
DROPPED_KEYS = {
    "inference_address", "management_address", "metrics_address",
    "model_store", "load_models", "allowed_urls", "models", "model_snapshot",
    "disable_token_authorization", "token_expiration_min", "enable_envvars_config",
}

# What the cluster needs (the runtime's env in servingruntime.yaml says the same, and wins: TS_* env
# vars override this file because enable_envvars_config is on):
# * inference (REST: native, KServe v1 /v1/models/<m>:predict and the OIP REST surface) on 0.0.0.0:8080,
#   the port KServe sends traffic to; metrics on 0.0.0.0:8082 for Prometheus; management on loopback;
# * token auth OFF: TorchServe 0.12 draws random keys at every start, so each replica would demand a
#   different key. Authentication belongs to the mesh/gateway (deploy/kserve/auth-istio.yaml);
# * the model store is the storage-initializer's download.
# allowed_urls is left at TorchServe's default: registration is off (enable_model_api=false), so only
# the model_snapshot below is ever loaded, from the --model-store the runtime passes.
KSERVE_SETTINGS = {
    "inference_address": "http://0.0.0.0:8080",
    "management_address": "http://127.0.0.1:8081",
    "metrics_address": "http://0.0.0.0:8082",
    "enable_envvars_config": "true",
    "disable_token_authorization": "true",
    "model_store": KSERVE_MODEL_STORE,
}


def read_properties(path: Path) -> dict[str, str]:
    """``key=value`` pairs of a Java properties file in file order (``serve.server.load_properties``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the KServe config is generated from it")
    return load_properties(path)


def model_snapshot(names: list[str], versions: dict[str, str] | None = None) -> dict:
    """TorchServe's ``model_snapshot`` JSON registering ``names`` at start (what KServe's wrapper reads);
    ``versions``: name → version for models served at another version than 1.0 (a canary's storage)."""
    models = {}
    for name in names:
        spec = get_spec(name).at_version((versions or {}).get(name))
        models[name] = {spec.version: {"defaultVersion": True, "marName": f"{spec.artifact_stem}.mar",
                                       **model_config(spec)}}
    return {"name": "startup.cfg", "modelCount": len(models), "models": models}


def kserve_config(names: list[str] | None = None, root_config: Path = ROOT_CONFIG,
                  versions: dict[str, str] | None = None) -> str:
    """The KServe ``config.properties`` text for ``names`` (default: every registered model)."""
    names = list(REGISTRY) if names is None else names
    carried = {k: v for k, v in read_properties(root_config).items() if k not in DROPPED_KEYS}
    lines = [
        "# GENERATED by deploy/kserve/make_storage.py from config.properties and models/registry.py;",
        "# do not edit: regenerate with `.venv/bin/python deploy/kserve/make_storage.py --write-config`.",
        "# KServe layout: <storageUri>/config/config.properties + <storageUri>/model-store/<name>.mar",
        "# Read by deploy/kserve/servingruntime.yaml (the project's image): see deploy/README.md, \"KServe\".",
        "",
        "# --- Cluster settings (deploy/kserve/make_storage.py KSERVE_SETTINGS) ---",
        *(f"{k}={v}" for k, v in KSERVE_SETTINGS.items()),
        "",
        "# --- Carried over from the repository's config.properties ---",
        *(f"{k}={v}" for k, v in carried.items()),
        "",
        "# --- Models: the registry's serving settings, as `make serve` loads them ---",
        "model_snapshot=" + json.dumps(model_snapshot(names, versions), separators=(",", ":")),
    ]
    return "\n".join(lines) + "\n"


def build_storage(out: Path, store: Path, names: list[str] | None = None,
                  versions: dict[str, str] | None = None) -> list[Path]:
    """Write ``out/config/config.properties`` and copy ``store/<name>.mar`` to ``out/model-store``
    (``store/<name>-v<V>.mar`` for a model given a version in ``versions``).

    Raises FileNotFoundError naming every missing archive (build them with ``make package``).
    """
    names = list(REGISTRY) if names is None else names
    archives = [store / f"{get_spec(name).at_version((versions or {}).get(name)).artifact_stem}.mar" for name in names]
    missing = [str(a) for a in archives if not a.is_file()]
    if missing:
        raise FileNotFoundError(f"missing archives (run `make package` first): {', '.join(missing)}")
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(parents=True, exist_ok=True)
    (out / "config" / "config.properties").write_text(kserve_config(names, versions=versions))
    copied = []
    for archive in archives:
        copied.append(Path(shutil.copy2(archive, out / "model-store" / archive.name)))
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the storage (storageUri) of our KServe ServingRuntime.")
    parser.add_argument("out", nargs="?", type=Path, help="output directory (config/ + model-store/)")
    parser.add_argument("--store", type=Path, default=MODEL_STORE,
                        help="where the .mar archives are (default: model_store/)")
    parser.add_argument("--models", default="all", help="comma-separated model names (default: all)")
    parser.add_argument("--version", action="append", default=[], metavar="MODEL=V",
                        help="serve MODEL at version V from model-store/MODEL-vV.mar (a canary's storage; "
                             "repeatable)")
    parser.add_argument("--write-config", action="store_true",
                        help=f"rewrite the committed {COMMITTED_CONFIG.relative_to(REPO_ROOT)}")
    args = parser.parse_args(argv)
    if args.out is None and not args.write_config:
        parser.error("give an output directory, or --write-config")
    try:
        names = None if args.models == "all" else [get_spec(n.strip()).name for n in args.models.split(",")]
        versions = {}
        for entry in args.version:
            name, _, version = entry.partition("=")
            versions[get_spec(name.strip()).name] = get_spec(name.strip()).at_version(version.strip()).version
        if args.write_config:
            COMMITTED_CONFIG.write_text(kserve_config(names))
            print(f"wrote {COMMITTED_CONFIG}")
        if args.out is not None:
            for path in build_storage(args.out, args.store, names, versions):
                print(f"copied {path}")
            print(f"wrote {args.out / 'config' / 'config.properties'}; upload {args.out}/ as the storageUri")
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
