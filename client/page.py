"""``python -m client page``: a local digit page (draw or drop a digit, see probabilities and saliency).

A small threaded HTTP server on 127.0.0.1 (stdlib ``http.server``) serves ``client/static/page.html``
and one JSON endpoint, ``POST /api/explain`` (body: the drawing or dropped file as a PNG/JPEG, or a data
URL of one). It prepares the picture the way MNIST digits were prepared and asks TorchServe's
``/explanations/<model>`` with the client's key: **the inference key stays in this process** and never
reaches the browser (the page only talks to this server, which sends no key or TorchServe address).

MNIST preparation (``mnist_pixels``): grayscale; a dark-on-light picture (bright border) is inverted
to white-on-black; the ink's bounding box is scaled to fit 20x20 (aspect kept) and placed in a 28x28
frame so that its centre of mass is at the centre, as in LeCun's preprocessing. Without it a digit
drawn across the whole canvas is larger and off-centre compared to anything the nets were trained on.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from client.api import TorchServeClient, TorchServeError

PAGE = Path(__file__).resolve().parent / "static" / "page.html"
MAX_UPLOAD = 8 * 1024 * 1024  # bytes one drawing or dropped image may have
MAX_SIDE = 4096  # pixels a side
INK_THRESHOLD = 0.1  # intensity that counts as ink for the bounding box

logger = logging.getLogger(__name__)


class PageError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(body: bytes) -> Image.Image:
    """The uploaded picture: raw PNG/JPEG bytes or a ``data:image/...;base64,`` URL of one."""
    if body[:5] == b"data:":
        try:
            body = base64.b64decode(body.split(b",", 1)[1], validate=True)
        except (IndexError, binascii.Error, ValueError):
            raise PageError(400, "the data URL is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(body))
        if max(image.size) > MAX_SIDE:
            raise PageError(413, f"the image is larger than {MAX_SIDE} pixels a side")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise PageError(400, "not a readable image (send a PNG or JPEG)") from None
    return image


def mnist_pixels(image: Image.Image) -> np.ndarray:
    """28x28 float32 intensities in [0, 1], white digit on black, centred by mass in a 20x20 box."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        # Transparent = paper: composite on the colour the opaque border suggests (ink drawn on nothing).
        alpha = np.asarray(rgba)[..., 3]
        if alpha.min() == 0:
            gray = np.asarray(rgba.convert("L"), dtype=np.float32) / 255.0
            ink_is_dark = gray[alpha > 0].mean() < 0.5 if (alpha > 0).any() else False
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if ink_is_dark else (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 0.5:  # dark ink on light paper → MNIST's light ink on black
        gray = 1.0 - gray
    ink = gray > INK_THRESHOLD
    if not ink.any():
        raise PageError(400, "the picture is empty: draw a digit first")
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize(size, Image.LANCZOS), np.float32) / 255
    frame = np.zeros((28, 28), np.float32)
    total = small.sum()
    cy, cx = ((np.indices(small.shape) * small).reshape(2, -1).sum(axis=1) / total) if total else (0, 0)
    top = int(round(14 - cy)) if total else (28 - small.shape[0]) // 2
    left = int(round(14 - cx)) if total else (28 - small.shape[1]) // 2
    top = min(max(top, 0), 28 - small.shape[0])
    left = min(max(left, 0), 28 - small.shape[1])
    frame[top : top + small.shape[0], left : left + small.shape[1]] = small
    return np.clip(frame, 0.0, 1.0)


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, client: TorchServeClient, model: str):
        super().__init__(address, PageHandler)
        self.client = client
        self.model = model
        self.lock = threading.Lock()  # one requests.Session: one TorchServe call at a time

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def explain(self, body: bytes) -> dict:
        pixels = mnist_pixels(decode_upload(body))
        with self.lock:
            answer = self.client.explain(self.model, {"data": pixels.round(5).tolist()})
        return {
            "model": self.model,
            "input": pixels.round(4).tolist(),
            "predicted_class": answer["predicted_class"],
            "probabilities": answer["probabilities"],
            "target": answer["target"],
            "attributions": answer["attributions"],
            "convergence_delta": answer["convergence_delta"],
            "method": answer["method"],
            "baseline": answer["baseline"],
            "steps": answer["steps"],
        }


class PageHandler(BaseHTTPRequestHandler):
    server: PageServer
    server_version = "DigitPage/1"

    def log_message(self, format, *args):  # quiet: one line per request only at debug level
        logger.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/api/model":
            self._json(200, {"model": self.server.model})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self):
        if self.path != "/api/explain":
            self._json(404, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length <= 0 or length > MAX_UPLOAD:
            self._json(413 if length > MAX_UPLOAD else 400,
                       {"error": f"send one image of at most {MAX_UPLOAD} bytes"})
            return
        body = self.rfile.read(length)
        try:
            self._json(200, self.server.explain(body))
        except PageError as err:
            self._json(err.status, {"error": err.message})
        except TorchServeError as err:  # the server's message, never the key
            status = err.status if err.status and 400 <= err.status < 500 else HTTPStatus.BAD_GATEWAY
            self._json(int(status), {"error": f"TorchServe: {err.message}"})


def make_server(client: TorchServeClient, model: str = "mnistnet", host: str = "127.0.0.1", port: int = 0) -> PageServer:
    """A ready (bound, not yet serving) page server; ``serve_forever()`` it in a thread."""
    return PageServer((host, port), client, model)


def serve_page(client: TorchServeClient, model: str, host: str, port: int) -> int:
    """Serve the page until Ctrl-C (``python -m client page``)."""
    server = make_server(client, model, host, port)
    print(f"digit page for {model}: {server.url}  (Ctrl-C stops it)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
