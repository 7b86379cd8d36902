"""``python -m train <name>|all [options]``: train registered networks and write their artifacts.

Examples::

    python -m train mnistnet                    # 10 epochs with the registry's defaults → weights/mnistnet.*
    python -m train all --missing               # every model whose weights/<name>.pt is missing
    python -m train mlp --epochs 3 --output-dir /tmp/w --seed 1 --limit 500
    python -m train mnistnet --version 2.0 --epochs 1   # → weights/mnistnet-v2.0.*; never touches a served version

Options override ``spec.train`` for every model trained by this call. Bad input (unknown name, epochs < 1,
lr <= 0, unwritable output directory, ...) exits with status 2 and a message listing the known models.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from models.registry import DEFAULT_VERSION, REGISTRY, check_version, get_spec
from train.trainer import DEFAULT_OUTPUT_DIR, train_model

KNOWN = ", ".join(sorted(REGISTRY))


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose every error message (exit status 2) ends with the known model names."""

    def error(self, message):
        super().error(f"{message}\nknown models: {KNOWN} (or 'all')")


def _number(text: str, kind: type, check, requirement: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}") from None
    if not check(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def _non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a finite number > 0")


def _version(text: str) -> str:
    try:
        return check_version(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m train",
        description=f"Train registered networks offline. Known models: {KNOWN} (or 'all').",
        epilog=f"known models: {KNOWN}",
    )
    parser.add_argument("name", metavar="NAME", help=f"a registered model ({KNOWN}) or 'all'")
    parser.add_argument("--epochs", type=_positive_int, help="epochs (default: the registry's, 10)")
    parser.add_argument("--batch-size", type=_positive_int, help="mini-batch size (default: the registry's)")
    parser.add_argument("--lr", type=_positive_float, help="Adam learning rate (default: the registry's)")
    parser.add_argument("--seed", type=_non_negative_int, help="seed for init, dropout, shuffling (default 0)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help=f"where <name>.pt/.json/.png go (default {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--version", type=_version, default=DEFAULT_VERSION,
                        help=f"model version to write: {DEFAULT_VERSION} (default) writes <name>.*, any other V "
                             "<name>-v<V>.*, so retraining never overwrites a served version's weights")
    parser.add_argument("--missing", action="store_true", help="skip models whose <name>.pt already exists")
    parser.add_argument("--limit", type=_positive_int,
                        help="use only the first N training and held-out samples (smoke runs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide the per-epoch progress bars")
    return parser


def check_output_dir(parser: argparse.ArgumentParser, directory: Path) -> None:
    """Create ``directory`` if needed and prove it is writable, or exit 2 saying why."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        parser.error(f"--output-dir {directory} is not a writable directory ({error.strerror or error})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.name != "all" and args.name not in REGISTRY:
        parser.error(f"unknown model {args.name!r}")
    if args.name == "all" and args.version != DEFAULT_VERSION:
        parser.error("--version names one model's version: give a model name, not 'all'")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda requested but CUDA is not available")
    check_output_dir(parser, args.output_dir)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = sorted(REGISTRY) if args.name == "all" else [args.name]
    if args.missing:
        stems = {name: get_spec(name).at_version(args.version).artifact_stem for name in names}
        present = [name for name in names if (args.output_dir / f"{stems[name]}.pt").is_file()]
        for name in present:
            print(f"{name}: {args.output_dir / (stems[name] + '.pt')} exists, skipped (--missing)")
        names = [name for name in names if name not in present]
    for index, name in enumerate(names, start=1):
        spec = get_spec(name).at_version(args.version).with_train(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        print(f"[{index}/{len(names)}] training {name} ({spec.model_class.__name__}, {spec.dataset}, "
              f"{spec.train})", flush=True)
        metrics = train_model(spec, args.output_dir, limit=args.limit, device=args.device,
                              progress=not args.no_progress, log=lambda line: print(line, flush=True))
        print(f"{name}: {summary(metrics)}, {metrics['seconds']:.1f}s → {args.output_dir / (spec.artifact_stem + '.pt')}",
              flush=True)
    return 0


def summary(metrics: dict) -> str:
    """One line with the final held-out numbers of a run."""
    if metrics["task"] == "classification":
        return f"test accuracy {metrics['test_accuracy']:.2%}"
    if metrics["task"] == "binary":
        return f"held-out accuracy {metrics['held_out_accuracy']:.2%}"
    text = (f"held-out MSE {metrics['held_out_mse']:.4f} (mean baseline {metrics['baseline_mse']:.4f}), "
            f"R² {metrics['held_out_r2']:.4f}")
    if "learned" in metrics:
        text += f", weight {metrics['learned']['weight']}, bias {metrics['learned']['bias']}"
    return text


if __name__ == "__main__":
    sys.exit(main())
