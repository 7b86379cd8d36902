"""Training-speed benchmark: seconds per epoch of every registered network on the full data set.

Run from the repository root::

    .venv/bin/python -m bench.train_speed                   # 2 epochs per model, all models
    .venv/bin/python -m bench.train_speed --epochs 1 --models mnistnet deepnet
    .venv/bin/python -m bench.train_speed --wait-quiet 600  # first wait (<= 600 s) for 1-min load < 1

Each model is trained exactly as ``python -m train`` does (same ``train_model``, registry defaults, data
already in memory, artifacts written to a temporary directory) for ``--epochs`` epochs; an epoch's time
includes its held-out evaluation. The table gives mean and best seconds per epoch, training samples per
second and the projected time for the registry's epoch count; the last line compares MNISTNet's
projected 10-epoch time with the 60 s goal. Other work on the machine slows every number down, so the
1-minute load average before and after is printed and recorded. Results: a table on stdout and
``bench/results/train_speed.json``. This is a script, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.registry import REGISTRY, get_spec
from paths import REPO_ROOT as REPO
from train.data import load_dataset
from train.trainer import default_device, train_model

GOAL_MODEL, GOAL_EPOCHS, GOAL_SECONDS = "mnistnet", 10, 60.0
DEFAULT_OUTPUT = REPO / "bench" / "results" / "train_speed.json"


def wait_for_quiet(limit_seconds: float, threshold: float = 1.0) -> float:
    """Wait up to ``limit_seconds`` for the 1-minute load average to drop below ``threshold``."""
    deadline = time.monotonic() + limit_seconds
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        print(f"waiting for a quiet machine: 1-min load {os.getloadavg()[0]:.2f}", flush=True)
        time.sleep(15)
    return os.getloadavg()[0]


def time_model(name: str, epochs: int, device: torch.device) -> dict:
    """Train ``name`` for ``epochs`` epochs into a throw-away directory and return its timings."""
    spec = get_spec(name)
    started = time.perf_counter()
    load_dataset(spec.dataset)  # warm the in-process cache so loading is timed separately
    load_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as scratch:
        metrics = train_model(spec.with_train(epochs=epochs), scratch, device=device, progress=False,
                              log=lambda line: print("  " + line, flush=True))
    per_epoch = metrics["history"]["epoch_seconds"]
    mean = sum(per_epoch) / len(per_epoch)
    n_train = metrics["data"]["n_train"]
    return {
        "model": name,
        "dataset": spec.dataset,
        "n_train": n_train,
        "batch_size": spec.train.batch_size,
        "epochs_timed": epochs,
        "epoch_seconds": per_epoch,
        "mean_epoch_seconds": mean,
        "best_epoch_seconds": min(per_epoch),
        "samples_per_second": n_train / mean,
        "data_load_seconds": load_seconds,
        "registry_epochs": spec.train.epochs,
        "projected_seconds": mean * spec.train.epochs,
    }


def print_table(rows: list[dict]) -> None:
    header = (f"{'model':<17}{'dataset':<13}{'n_train':>8}{'batch':>6}{'s/epoch':>9}{'best':>8}"
              f"{'samples/s':>11}{'epochs':>7}{'projected s':>12}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['model']:<17}{row['dataset']:<13}{row['n_train']:>8}{row['batch_size']:>6}"
              f"{row['mean_epoch_seconds']:>9.2f}{row['best_epoch_seconds']:>8.2f}"
              f"{row['samples_per_second']:>11.0f}{row['registry_epochs']:>7}{row['projected_seconds']:>12.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per model (default 2)")
    parser.add_argument("--models", nargs="+", choices=sorted(REGISTRY), default=list(REGISTRY),
                        help="models to time (default: all registered)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for the 1-minute load average to fall below 1")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON path (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")

    load_before = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else os.getloadavg()[0]
    device = default_device()
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, 1-min load {load_before:.2f}", flush=True)
    rows = []
    for name in args.models:
        rows.append(time_model(name, args.epochs, device))
        print(f"{name}: {rows[-1]['mean_epoch_seconds']:.2f} s/epoch", flush=True)
    load_after = os.getloadavg()[0]
    print()
    print_table(rows)

    result = {
        "torch_version": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_1min_before": load_before,
        "load_1min_after": load_after,
        "epochs_timed": args.epochs,
        "models": rows,
    }
    goal = next((row for row in rows if row["model"] == GOAL_MODEL), None)
    if goal is not None:
        projected = goal["mean_epoch_seconds"] * GOAL_EPOCHS
        verdict = "meets" if projected <= GOAL_SECONDS else "MISSES"
        result["goal"] = {"model": GOAL_MODEL, "epochs": GOAL_EPOCHS, "goal_seconds": GOAL_SECONDS,
                          "projected_seconds": projected, "met": projected <= GOAL_SECONDS}
        print(f"\n{GOAL_MODEL}: projected {GOAL_EPOCHS}-epoch training {projected:.1f} s "
              f"(+{goal['data_load_seconds']:.1f} s first data load) {verdict} the {GOAL_SECONDS:.0f} s goal")
    print(f"1-min load average: {load_before:.2f} before, {load_after:.2f} after "
          f"(other work on the machine slows every number)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
