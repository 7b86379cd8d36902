"""Build the serving image with whatever container engine this machine has: ``make image`` and tests/container.

    python tests/container/container_image.py [--tag TAG] [--gpu]

Engine, in this order:
1. a container-setup script (env ``CONTAINER_SETUP``, ``<repo>/../shared/tools/container-setup``,
   ``/work/shared/tools/container-setup``): it installs podman and a local ``python:3.11-slim`` on machines
   without a docker engine and prints its build command, whose read-only wheel-folder mounts we reuse;
   when one of those folders already holds the CPU torch wheel, PyTorch's index is not asked
   (``--build-arg TORCH_INDEX_URL=``);
2. podman or docker on PATH whose engine answers (``info``), with the Dockerfile's defaults.
Podman builds use ``--format docker``: the OCI format drops HEALTHCHECK.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from paths import REPO_ROOT as REPO
CPU_TAG = "torchserve-mnist:cpu"
GPU_TAG = "torchserve-mnist:gpu"
# The GPU image: PyPI's CUDA build of torch (the checkout's pin in requirements.txt), no extra index.
GPU_BUILD_ARGS = ["--build-arg", "TORCH_SPEC=torch==2.14.1", "--build-arg", "TORCH_INDEX_URL="]
BUILD_LOG = Path(os.environ.get("TMPDIR", "/tmp")) / "torchserve-mnist-build.log"


class EngineUnavailable(RuntimeError):
    """No container engine can be had here; the message says why and how to get one."""


@dataclass
class Engine:
    """A container engine command and the extra flags this machine's builds need."""

    exe: str
    build_flags: list[str] = field(default_factory=list)

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``<engine> args...``; output captured as text; a non-zero exit raises with the output."""
        result = subprocess.run([self.exe, *args], capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{self.exe} {' '.join(args)} exited {result.returncode}:\n"
                               f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result


def setup_script() -> Path | None:
    """The first container-setup script that exists, or None."""
    candidates = [os.environ.get("CONTAINER_SETUP", ""), REPO.parent / "shared" / "tools" / "container-setup",
                  "/work/shared/tools/container-setup"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def _works(exe: str) -> bool:
    found = shutil.which(exe)
    return bool(found) and subprocess.run([found, "info"], capture_output=True, timeout=60).returncode == 0


def find_engine() -> Engine:
    """The engine to build and run with (see the module docstring); EngineUnavailable when there is none."""
    script = setup_script()
    if script:
        result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1200)
        if result.returncode != 0:
            raise EngineUnavailable(f"{script} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        build_line = next((l for l in result.stdout.splitlines() if l.startswith("Build:")), "")
        mounts = re.findall(r"-v (\S+):(\S+):ro", build_line)
        flags = ["--pull=never", "--network=host"]
        for host, inside in mounts:
            flags += ["-v", f"{host}:{inside}:ro"]
        if any(next(Path(host).glob("torch-*+cpu-*.whl"), None) for host, _ in mounts):
            flags += ["--build-arg", "TORCH_INDEX_URL="]
        return Engine("podman", ["--format", "docker", *flags])
    for exe in ("podman", "docker"):
        if _works(exe):
            return Engine(exe, ["--format", "docker"] if exe == "podman" else [])
    raise EngineUnavailable("no container engine: install podman or docker, or point CONTAINER_SETUP at "
                            "shared/tools/container-setup (it installs podman and a local base image)")


def build(engine: Engine, tag: str = CPU_TAG, extra: list[str] | None = None, log: Path = BUILD_LOG) -> float:
    """Build the Dockerfile at the repository root as ``tag``; returns the seconds it took.
    The full build output goes to ``log``; a failed build raises with its tail."""
    cmd = [engine.exe, "build", *engine.build_flags, *(extra or []), "-t", tag, str(REPO)]
    start = time.monotonic()
    with log.open("w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=1800).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"image build failed ({code}); full log: {log}\n{tail}")
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help=f"the CUDA image ({' '.join(GPU_BUILD_ARGS)})")
    parser.add_argument("--tag", help=f"image tag (default: {CPU_TAG}, with --gpu {GPU_TAG})")
    args = parser.parse_args(argv)
    tag = args.tag or (GPU_TAG if args.gpu else CPU_TAG)
    try:
        engine = find_engine()
    except EngineUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    extra = list(GPU_BUILD_ARGS) if args.gpu else []
    print(f"building {tag} with {engine.exe} (log: {BUILD_LOG})", flush=True)
    try:
        seconds = build(engine, tag, extra)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = int(engine("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
    print(f"built {tag} in {seconds:.0f} s: {size / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
