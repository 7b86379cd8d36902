"""Locust load test: realistic mixed traffic against a running TorchServe (native API and v2 API).

Run it headless against a LOCAL server only (bounded users, spawn rate and run time)::

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 16 -r 4 -t 60s \
        --host http://127.0.0.1:8080 --csv loadtest/results/mixed --only-summary

Two user classes share the load by ``weight`` (native 3 : v2 1); each picks its next request by task
weight. Bodies are built once at start-up from real MNIST test digits (data/mnist):

* native ``/predictions/<image model>``: one image as JSON 28x28 or flat 784 (intensities in [0, 1]),
  a list of 8-64 images, a PNG file as the raw body; a few tabular rows for ``mlp`` / ``regressionnet``;
* v2 ``/v2/models/<model>/infer``: ``[1, 784]`` FP32, ``[N, 28, 28]`` UINT8 (N in 8..64), tabular rows.

Each response is checked lightly: HTTP 200 and the expected key (``predicted_class`` for images,
``predictions`` for tabular models, ``outputs`` for v2); anything else is a locust failure.

Environment (defaults in brackets): ``LOADTEST_IMAGE_MODEL`` [mnistnet], ``LOADTEST_TABULAR_MODELS``
[mlp,regressionnet] (empty to skip tabular traffic), ``LOADTEST_SEED`` [0]. The inference key is found
like client/api.py finds it: ``$TS_INFERENCE_KEY``, else ``key_file.json`` in ``$TS_KEY_FILE``, ``.serve/``
(where ``make serve`` starts TorchServe) or the current directory. Only loopback hosts are accepted.
"""
from __future__ import annotations

import json
import os
import random
import sys

from locust import FastHttpUser, between, events, task

from bench import payloads
from client.api import read_key
from models.registry import get_spec

IMAGE_MODEL = os.environ.get("LOADTEST_IMAGE_MODEL", "mnistnet")
TABULAR_MODELS = [m for m in os.environ.get("LOADTEST_TABULAR_MODELS", "mlp,regressionnet").split(",") if m]
POOL = 32  # distinct digits per body kind: requests vary without building bodies during the test
rng = random.Random(int(os.environ.get("LOADTEST_SEED", "0")))


def _tabular_rows(width: int, count: int) -> list[list[float]]:
    return [[round(rng.uniform(-1.5, 1.5), 4) for _ in range(width)] for _ in range(count)]


def _build_bodies() -> dict[str, list[bytes]]:
    """Every body kind, POOL of each, built once (locust workers import this module once)."""
    bodies = {
        "json28": [payloads.json_images(1, i)[0] for i in range(POOL)],
        "json784": [payloads.json_images(1, i, flat=True)[0] for i in range(POOL)],
        "batch": [payloads.json_images(rng.randint(8, 64), i * 64, flat=rng.random() < 0.5)[0] for i in range(8)],
        "png": [payloads.png_image(i)[0] for i in range(POOL)],
        "v2_flat": [payloads.v2_images(1, i, "flat", "FP32")[0] for i in range(POOL)],
        "v2_square": [payloads.v2_images(rng.randint(8, 64), i * 64, "square", "UINT8")[0] for i in range(8)],
    }
    for name in TABULAR_MODELS:
        width = get_spec(name).input_width
        bodies[f"tab:{name}"] = [json.dumps({"data": _tabular_rows(width, rng.randint(1, 16))}).encode()
                                 for _ in range(8)]
        v2 = []
        for _ in range(8):
            rows = _tabular_rows(width, rng.randint(1, 16))
            v2.append(json.dumps({"inputs": [{"name": "x", "shape": [len(rows), width], "datatype": "FP32",
                                              "data": [v for row in rows for v in row]}]}).encode())
        bodies[f"v2tab:{name}"] = v2
    return bodies


BODIES = _build_bodies()
TOKEN: str | None = None


LOOPBACK_PREFIXES = ("http://127.", "http://localhost", "http://[::1]")


@events.init.add_listener
def _check_host_and_find_key(environment, **_kwargs):
    """Refuse non-loopback hosts, then find the inference key once, before any user starts."""
    global TOKEN
    host = environment.host or ""
    if not host.startswith(LOOPBACK_PREFIXES):
        raise SystemExit(f"loadtest: --host must be a loopback address such as http://127.0.0.1:8080, got {host!r}")
    TOKEN = os.environ.get("TS_INFERENCE_KEY") or read_key("inference")
    if not TOKEN:
        print("loadtest: no inference key found (TS_INFERENCE_KEY, key_file.json); sending none", file=sys.stderr)


def _headers(content_type: str) -> dict:
    headers = {"Content-Type": content_type}
    if TOKEN:
        headers["Authorization"] = f"Bearer {TOKEN}"
    return headers


class _ServingUser(FastHttpUser):
    abstract = True
    wait_time = between(0.0, 0.05)  # a little think time: realistic clients are not a tight loop

    def _post(self, path: str, body: bytes, content_type: str, name: str, expect: str) -> None:
        """POST and mark the request failed unless it is 200 with key ``expect`` in every answer."""
        with self.client.post(path, data=body, headers=_headers(content_type), name=name,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            try:
                answer = json.loads(response.content)
            except ValueError:
                response.failure(f"response is not JSON: {(response.text or '')[:200]}")
                return
            items = answer if isinstance(answer, list) else [answer]
            if not items or not all(isinstance(a, dict) and expect in a for a in items):
                response.failure(f"no {expect!r} in the response: {(response.text or '')[:200]}")
            else:
                response.success()


class NativeApiUser(_ServingUser):
    """TorchServe's own inference API: ``POST /predictions/<model>``."""

    weight = 3

    def _image(self, kind: str, content_type: str = payloads.JSON) -> None:
        self._post(f"/predictions/{IMAGE_MODEL}", rng.choice(BODIES[kind]), content_type,
                   f"native {kind}", "predicted_class")

    @task(6)
    def single_image_28x28(self):
        self._image("json28")

    @task(3)
    def single_image_flat(self):
        self._image("json784")

    @task(4)
    def png_digit(self):
        self._image("png", payloads.PNG)

    @task(2)
    def image_batch(self):
        self._image("batch")

    @task(1)
    def tabular_rows(self):
        if TABULAR_MODELS:
            name = rng.choice(TABULAR_MODELS)
            self._post(f"/predictions/{name}", rng.choice(BODIES[f"tab:{name}"]), payloads.JSON,
                       f"native tabular {name}", "predictions")


class V2ApiUser(_ServingUser):
    """The Open Inference Protocol (KServe v2) endpoint: ``POST /v2/models/<model>/infer``."""

    weight = 1

    @task(4)
    def flat_fp32(self):
        self._post(f"/v2/models/{IMAGE_MODEL}/infer", rng.choice(BODIES["v2_flat"]), payloads.JSON,
                   "v2 [1,784] FP32", "outputs")

    @task(2)
    def square_uint8_batch(self):
        self._post(f"/v2/models/{IMAGE_MODEL}/infer", rng.choice(BODIES["v2_square"]), payloads.JSON,
                   "v2 [N,28,28] UINT8", "outputs")

    @task(1)
    def tabular_rows(self):
        if TABULAR_MODELS:
            name = rng.choice(TABULAR_MODELS)
            self._post(f"/v2/models/{name}/infer", rng.choice(BODIES[f"v2tab:{name}"]), payloads.JSON,
                       f"v2 tabular {name}", "outputs")
