"""``python -m scripts.gpu_check``: the GPU check's command line (scripts/gpu_check/__init__.py says what runs).

Output: one line per check, ``PASS``/``FAIL``/``SKIP`` with its numbers (``INFO`` lines say what ran where),
then a summary line; ``--out FILE`` also writes a JSON summary. Exit status 1 if any check failed, else 0
(also without a GPU: then nothing is checked).
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from paths import WEIGHTS_DIR  # imports nothing more: fine on a bare GPU box
from scripts.gpu_check import NO_GPU_MESSAGE, Report, resolve_weights

OPTIONAL_MODULES = ("numpy", "PIL", "yaml", "requests", "psutil", "tqdm", "matplotlib", "ts", "model_archiver")


def import_status(module: str) -> str | None:
    """The module's version (or "ok") if it imports, else None."""
    try:
        imported = importlib.import_module(module)
    except Exception:  # ImportError, or a broken install
        return None
    return str(getattr(imported, "__version__", "ok"))


def probe_environment(device) -> dict:
    """What this machine has: Python, torch and CUDA, the GPU, the optional packages, Java."""
    import torch

    from scripts.gpu_check.served import java_path

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "java": java_path(),
        "modules": {m: import_status(m) for m in OPTIONAL_MODULES},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.gpu_check",
                                     description="Prove on a machine with CUDA that the serving path works on the GPU.")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR,
                        help="directory of <name>.pt state_dicts (default: weights/); missing ones are trained")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    parser.add_argument("--models", default="all", help="comma-separated model names (default: all seven)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput measurement (default 3)")
    parser.add_argument("--device", help="default: cuda when available; 'cpu' = dry run of the logic on the CPU")
    parser.add_argument("--no-server", action="store_true", help="skip the TorchServe checks even if Java is there")
    return parser.parse_args(argv)


def write_summary(path: Path | None, summary: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1, default=str) + "\n")


def run_checks(report: Report, args: argparse.Namespace, device, work: Path) -> None:
    """Weights, then the in-process part, then (where it can run) the served part."""
    from models.registry import REGISTRY, get_spec
    from scripts.gpu_check import inprocess, served

    names = list(REGISTRY) if args.models in ("", "all") else [n.strip() for n in args.models.split(",") if n.strip()]
    for name in names:
        get_spec(name)
    weights = resolve_weights(names, args.weights, work / "weights", device, report)
    names = [n for n in names if n in weights]
    if not names:
        return
    reason = inprocess.unavailable()
    if reason:
        report.check("in-process", "FAIL", f"{reason}: TorchServe's Python side is needed to load the archives")
    else:
        inprocess.run(report, names, weights, device, work, args.seconds)
    reason = "--no-server" if args.no_server else served.unavailable()
    if reason:
        report.check("server", "SKIP", f"{reason}: TorchServe's GPU workers, served parity and HTTP "
                     "throughput not checked (the in-process checks above ran the same handlers in TorchServe's Service)")
    else:
        served.run(report, names, weights, device, work, args.seconds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError as err:
        print(f"FAIL torch: not importable ({err}); the GPU check needs PyTorch")
        return 1
    if args.device is None or torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            print(NO_GPU_MESSAGE)
            write_summary(args.out, {"gpu": False, "message": NO_GPU_MESSAGE, "ok": True, "checks": []})
            return 0
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    report = Report()
    env = probe_environment(device)
    gpus = ", ".join(env["gpus"]) or "none"
    report.info(f"python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}), GPUs: {gpus}; "
                f"checking on {device}" + (" (dry run on the CPU: proves nothing about a GPU)" if device.type == "cpu" else ""))
    report.info("modules: " + ", ".join(f"{m} {v or 'MISSING'}" for m, v in env["modules"].items())
                + f"; java {env['java'] or 'MISSING'}")
    if env["modules"]["numpy"] is None:
        report.check("numpy", "FAIL", "not importable: handlers/ and train/ need it (carry a numpy wheel); nothing checked")
        write_summary(args.out, {"gpu": device.type == "cuda", "ok": False, "device": str(device),
                                 "environment": env, "checks": report.checks})
        return 1

    work = Path(tempfile.mkdtemp(prefix="gpuchk-", dir="/tmp"))  # short: TorchServe's socket paths live in it
    started = time.perf_counter()
    try:
        run_checks(report, args, device, work)
    except Exception as err:  # a bug or a broken environment: report it as a failed check, keep the summary
        import traceback

        traceback.print_exc()
        report.check("gpu-check", "FAIL", f"stopped by {type(err).__name__}: {err}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    counts = {s: report.count(s) for s in ("PASS", "FAIL", "SKIP")}
    verdict = "FAILED" if report.failed else "OK"
    print(f"gpu-check {verdict}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"on {device} in {time.perf_counter() - started:.0f} s")
    write_summary(args.out, {"gpu": device.type == "cuda", "ok": not report.failed, "device": str(device),
                             "counts": counts, "environment": env, "notes": report.notes, "checks": report.checks})
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
