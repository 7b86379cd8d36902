"""Helpers shared by the reliability tests: raw HTTP with the right key, error-body checks, worker
processes and their log lines, crafted PNG files, and the in-process reference model."""
from __future__ import annotations

import io
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from models.registry import get_spec
from serve.server import Server

# The models every reliability server serves: one image classifier, one tabular model.
MODELS = ("mnistnet", "mlp")
JSON = {"Content-Type": "application/json"}
PNG = {"Content-Type": "image/png"}
# Worker lines in model_log.log (TorchServe's Python worker prints them; see log4j2.xml here).
WORKER_STARTED = "Torch worker started."
BATCH_RECEIVED = "Backend received inference at:"








# ------------------------------------------------------------------------------------------ workers






def worker_processes(server: Server) -> list[psutil.Process]:
    """The Python backend workers of ``server``: the processes its Java frontend started and, when the fork
    server (serve/torchserve/forkserver.py) runs them, the workers it forked for those."""
    frontend = psutil.Process(server.pid())
    started = [p for p in frontend.children(recursive=True) if "model_service_worker.py" in " ".join(p.cmdline())]
    forkserver = server.forkserver_pid()
    return started + (psutil.Process(forkserver).children() if forkserver else [])


def model_log_lines(server: Server) -> list[str]:
    """Every line of the server's model_log.log files (older rolled-over files first)."""
    files = sorted(server.log_dir.glob("model_log.*.log"), reverse=True) + [server.log_dir / "model_log.log"]
    lines = []
    for path in files:
        if path.is_file():
            lines += path.read_text(errors="replace").splitlines()
    return lines


def count_log_lines(server: Server, needle: str, model: str | None = None) -> int:
    """Lines of model_log.log containing ``needle`` (and, if given, printed by a worker of ``model``)."""
    thread = re.compile(rf"W-\d+-{re.escape(model)}_") if model else None
    return sum(1 for line in model_log_lines(server) if needle in line and (thread is None or thread.search(line)))


def wait_for_log_count(server: Server, needle: str, model: str | None, at_least: int, timeout: float = 5.0) -> int:
    """Poll until ``count_log_lines`` reaches ``at_least`` (logging is asynchronous) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        count = count_log_lines(server, needle, model)
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


# -------------------------------------------------------------------------------------------- images


def png_of(pixels: np.ndarray) -> bytes:
    """A uint8 grayscale array as a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def crafted_png(width: int, height: int, rows: int | None = None) -> bytes:
    """An 8-bit grayscale PNG whose header declares ``width`` x ``height`` and whose image data holds
    ``rows`` all-black rows (default: all of them). Black compresses ~1000:1, so a PNG declaring
    4096x4096 is ~16 kB; with ``rows`` small and the size huge it is a 'PNG bomb' header."""
    rows = height if rows is None else rows
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale, no interlace
    compressor = zlib.compressobj(9)
    line = b"\x00" * (width + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(line) for _ in range(rows)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------- reference


class Reference:
    """In-process copies of the served networks (same weights files) for checking served answers."""

    def __init__(self, weights_dir: Path):
        self.weights_dir = Path(weights_dir)
        self._models: dict[str, torch.nn.Module] = {}

    def probabilities(self, name: str, pixels: np.ndarray) -> np.ndarray:
        """Softmax output of image model ``name`` for uint8 digits ``(N, 28, 28)``."""
        from train.data import normalize_images

        x = normalize_images(pixels).reshape((len(pixels), *get_spec(name).input_shape))
        with torch.no_grad():
            return torch.softmax(self._model(name)(x), dim=1).numpy()

    def outputs(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Raw outputs ``(N,)`` of tabular model ``name`` for float rows ``(N, W)``."""
        with torch.no_grad():
            return self._model(name)(torch.as_tensor(rows, dtype=torch.float32)).reshape(-1).numpy()

    def _model(self, name: str) -> torch.nn.Module:
        if name not in self._models:
            model = get_spec(name).build()
            model.load_state_dict(torch.load(self.weights_dir / f"{name}.pt", weights_only=True))
            self._models[name] = model.eval()
        return self._models[name]
