"""The benchmark's Triton peer: MNISTNet with the project's weights behind Triton Inference Server (PyTriton).

    .venv/bin/python -m bench.triton_server --setup        # create build/triton-venv (idempotent, ~3 min once)
    build/triton-venv/bin/python -m bench.triton_server --serve --weights weights/mnistnet.pt --http-port 8700 ...

``nvidia-pytriton`` ships a real ``tritonserver`` (2.51) with its Python backend; PyTriton runs the
inference callables in its own process. It lives in a venv of its own, ``build/triton-venv`` (a git-ignored
build product), made from Debian's ``/usr/bin/python3.11``: under other 3.11 builds the backend stub fails
(``'_thread.RLock' object has no attribute '_recursion_count'``). :func:`ensure_venv` creates it.

Served as the project serves it, for a fair peer: model ``mnistnet``, input ``input`` FP32 ``[-1, 784]``
(intensities in [0, 1], clipped, then normalised like training), outputs ``probabilities`` FP32 ``[-1, 10]``
(softmax) and ``predicted_class`` INT64 ``[-1, 1]`` (Triton's batched outputs keep a sample dimension).
Settings: dynamic batching with a preferred batch of 8 requests' worth and a 2 ms queue delay, largest
batch 1,024 samples (our per-request cap, so every sweep size is accepted), 2 model instances,
1 torch thread each; loopback only. The server stops on SIGTERM (``triton.serve()`` ignores SIGINT).
:class:`TritonServer` runs it from the benchmark's venv with the few ``Server`` methods the benchmark uses.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paths import BUILD_DIR, REPO_ROOT

VENV = BUILD_DIR / "triton-venv"
VENV_PYTHON = VENV / "bin" / "python"
BASE_PYTHON = Path("/usr/bin/python3.11")
REQUIREMENTS = ("nvidia-pytriton==0.7.0", "torch==2.13.0+cpu", "numpy")
STAMP = VENV / ".installed"
MODEL = "mnistnet"
MAX_BATCH = 1024  # samples in one execution: our per-request cap (handlers/decoding.MAX_SAMPLES)
PREFERRED_BATCH = 8
QUEUE_DELAY_US = 2000
INSTANCES = 2
# How the peer is configured, printed by the benchmark next to the others.
DESCRIPTION = (f"Triton 2.51 via PyTriton 0.7.0 (build/triton-venv, Debian python3.11, torch 2.13 CPU): dynamic "
               f"batching preferred {PREFERRED_BATCH} / {QUEUE_DELAY_US // 1000} ms queue delay, max batch "
               f"{MAX_BATCH} samples, {INSTANCES} instances, 1 torch thread each, no auth")


START_TRIES = 8
# PyTriton's model instances shake hands within 1 s of each other's start; on a loaded machine (other jobs on
# the 2 cores) that failed in 6 of 7 starts. Triton starts at this nice value (where allowed: root) and every
# one of its processes is put back to 0 once the model is ready, before anything is measured.
START_NICE = -10
HANDSHAKE_TIMEOUT = "get_config_from_handshake_server"  # in the traceback of either way it fails


class TritonSetupError(RuntimeError):
    """The Triton venv could not be created; the message says which step failed and how."""


def venv_ready() -> bool:
    """True when build/triton-venv holds a complete install (its stamp names the requirements)."""
    return STAMP.exists() and STAMP.read_text().split() == list(REQUIREMENTS)


def ensure_venv(quiet: bool = False) -> Path:
    """Create build/triton-venv from /usr/bin/python3.11 with :data:`REQUIREMENTS` unless it is complete.

    Idempotent: a stamp file written after a successful install marks it complete; a half-made venv is
    made again. Raises TritonSetupError naming the failed step (and pip's last output lines)."""
    if venv_ready():
        return VENV_PYTHON
    if not BASE_PYTHON.exists():
        raise TritonSetupError(f"{BASE_PYTHON} is missing: the Triton peer needs Debian's python3.11 "
                               "(apt-get install -y python3.11 python3.11-venv)")
    steps = [([str(BASE_PYTHON), "-m", "venv", "--clear", str(VENV)], "creating the venv"),
             ([str(VENV_PYTHON), "-m", "pip", "install", "--quiet", *REQUIREMENTS], "pip install")]
    for command, what in steps:
        if not quiet:
            print(f"  triton setup: {what}: {' '.join(command)}", flush=True)
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise TritonSetupError(f"Triton setup failed while {what} (exit code {proc.returncode}):\n{tail}")
    STAMP.write_text("\n".join(REQUIREMENTS) + "\n")
    return VENV_PYTHON


def _raise_priority() -> None:
    try:
        os.nice(START_NICE)
    except OSError:  # not permitted: start at the normal priority
        pass


class TritonServer:
    """``python -m bench.triton_server --serve`` in the Triton venv on free loopback ports, stopped with SIGTERM."""

    def __init__(self, weights: Path, log: Path):
        from serve.server import port_is_free

        self.weights, self.log = Path(weights), Path(log)
        self.workdir: Path | None = None
        free = iter(p for p in range(8700, 8900) if port_is_free(p))
        self.http_port, self.grpc_port, self.metrics_port = next(free), next(free), next(free)
        self.inference_url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.models = [MODEL]
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        python = ensure_venv()
        # PyTriton's workspace holds its unix sockets: it must have a short path (a longer one under
        # /tmp/bench-<label>-xxxxxxxx/ already made the model's handshake socket time out).
        self.workdir = Path(tempfile.mkdtemp(prefix="pyt-", dir="/tmp"))
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop("VIRTUAL_ENV", None)
        with open(self.log, "wb") as log:
            self._process = subprocess.Popen(
                [str(python), "-m", "bench.triton_server", "--serve", "--weights", str(self.weights),
                 "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                 "--metrics-port", str(self.metrics_port), "--workspace", str(self.workdir / "w")],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_raise_priority)

    def _normal_priority(self) -> None:
        """Every process of the server back at nice 0 (they inherited :data:`START_NICE`), before any load."""
        import psutil

        try:
            processes = [psutil.Process(self._process.pid)]
            processes += processes[0].children(recursive=True)
        except psutil.Error:
            return
        for process in processes:
            try:
                process.nice(0)
            except psutil.Error:
                pass

    def wait_ready(self, timeout: float = 180.0, progress: bool = False) -> None:
        """Until ``GET /v2/models/mnistnet/ready`` answers 200. PyTriton gives each model instance 1 s to
        fetch its configuration from a handshake socket; on a loaded machine that can run out and the server
        exits. Then it is started again, up to :data:`START_TRIES` times in all (each retry is printed). It starts
        at :data:`START_NICE` and runs at nice 0 from the moment it is ready."""
        import requests

        deadline = time.monotonic() + timeout
        tries = 1
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = self.log.read_text()
                if HANDSHAKE_TIMEOUT in log and tries < START_TRIES:
                    tries += 1
                    print(f"  triton: a model instance missed PyTriton's 1 s handshake (loaded machine); "
                          f"starting again ({tries}/{START_TRIES})", flush=True)
                    self.stop()
                    self.start()
                    continue
                raise RuntimeError(f"Triton exited ({self._process.returncode}): {log[-3000:]}")
            try:
                if requests.get(f"{self.inference_url}/v2/models/{MODEL}/ready", timeout=2).status_code == 200:
                    self._normal_priority()
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"Triton not ready after {timeout:.0f} s: {self.log.read_text()[-3000:]}")

    def keys(self) -> dict[str, str]:
        return {}  # no authentication on the inference API

    def describe(self, model: str) -> dict:
        return {"modelName": model, "batchSize": PREFERRED_BATCH, "maxBatchDelay": QUEUE_DELAY_US / 1000,
                "workers": [None] * INSTANCES}

    def stop(self) -> None:
        """SIGTERM to its process group (PyTriton, tritonserver, the backend stubs), SIGKILL after 20 s;
        then its workspace is removed."""
        try:
            if self._process is not None and self._process.poll() is None:
                os.killpg(self._process.pid, signal.SIGTERM)
                try:
                    self._process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(self._process.pid, signal.SIGKILL)
                    self._process.wait()
        finally:
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)


# ------------------------------------------------------------------- inside the Triton venv (--serve)

def _serve(weights: str, http_port: int, grpc_port: int, metrics_port: int, workspace: str | None) -> None:
    import numpy as np
    import torch
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from models.mnist_net import MNISTNet
    from models.registry import MNIST_MEAN, MNIST_STD

    torch.set_num_threads(1)
    state = torch.load(weights, map_location="cpu", weights_only=True)

    def make_infer():
        model = MNISTNet()
        model.load_state_dict(state)
        model.eval()

        @batch
        def infer(input):  # noqa: A002 - the tensor's name is the input's name
            x = np.clip(input.reshape(len(input), 784), 0.0, 1.0).astype(np.float32)
            x -= np.float32(MNIST_MEAN)
            x /= np.float32(MNIST_STD)
            with torch.inference_mode():
                probabilities = torch.softmax(model(torch.from_numpy(x)).float(), dim=1)
            return {"probabilities": probabilities.numpy(),
                    "predicted_class": probabilities.argmax(dim=1, keepdim=True).numpy().astype(np.int64)}

        return infer

    config = TritonConfig(http_address="127.0.0.1", http_port=http_port, grpc_address="127.0.0.1",
                          grpc_port=grpc_port, metrics_address="127.0.0.1", metrics_port=metrics_port,
                          log_verbose=0)
    with Triton(config=config, workspace=workspace) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=[make_infer() for _ in range(INSTANCES)],
            inputs=[Tensor(name="input", dtype=np.float32, shape=(784,))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(10,)),
                     Tensor(name="predicted_class", dtype=np.int64, shape=(1,))],
            config=ModelConfig(max_batch_size=MAX_BATCH, batcher=DynamicBatcher(
                max_queue_delay_microseconds=QUEUE_DELAY_US, preferred_batch_size=[PREFERRED_BATCH])),
            strict=True,
        )
        triton.serve()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.triton_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help=f"create {VENV.relative_to(REPO_ROOT)} if needed, then exit")
    parser.add_argument("--serve", action="store_true", help="serve (run with the Triton venv's python)")
    parser.add_argument("--weights", default=str(REPO_ROOT / "weights" / "mnistnet.pt"))
    parser.add_argument("--http-port", type=int, default=8700)
    parser.add_argument("--grpc-port", type=int, default=8701)
    parser.add_argument("--metrics-port", type=int, default=8702)
    parser.add_argument("--workspace", help="PyTriton's workspace folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.setup:
        try:
            print(ensure_venv())
        except TritonSetupError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    if args.serve:
        _serve(args.weights, args.http_port, args.grpc_port, args.metrics_port, args.workspace)
        return 0
    parser.error("give --setup or --serve")
    return 2


if __name__ == "__main__":
    sys.exit(main())
