"""Bench-only handler for tuning experiments: the project's ImageClassifier with optional changes.

Each change is switched on by an environment variable of the worker (bench/tuning/tune.py sets them),
so one archive measures every combination. This file is NOT served by the project; it exists to
measure handler changes proposed for handlers/ before anyone makes them:

* ``TUNE_QUIET_WORKER_LOGS=1``: raise the worker's root logger to WARNING after start-up, dropping
  TorchServe's per-batch INFO lines ("Backend received inference", ``[METRICS]`` lines) that the
  worker formats and writes and the frontend reads and parses for every batch;
* ``TUNE_ORJSON=1``: parse JSON bodies with orjson (needs ``TS_DECODE_INPUT_REQUEST=false`` so that
  TorchServe hands the raw bytes to the handler instead of parsing them with the json module first);
* ``TUNE_COMPACT_RESPONSE=1``: return each answer as compact JSON text instead of a dict, which
  TorchServe would otherwise serialise with ``json.dumps(indent=2)`` (the slow pure-Python encoder);
  with ``TUNE_ORJSON=1`` too, the text comes from ``orjson.dumps`` (byte-identical, ~12x faster).
  Since handlers/base.py returns compact JSON bytes itself (commit d012743) this switch only matters
  for measurements of older handler versions;
* ``TUNE_RAW_UINT8=1``: accept a raw ``application/octet-stream`` body of N x 784 pixel bytes (0..255,
  row-major), decoded with ``numpy.frombuffer`` instead of parsing JSON numbers.
"""
import json
import logging
import os

import numpy as np

from handlers.image_classifier import ImageClassifier
from handlers.decoding import JPEG_MAGIC, PNG_MAGIC


class TuningImageClassifier(ImageClassifier):
    """ImageClassifier plus the switchable changes listed in the module docstring."""

    def initialize(self, context):
        super().initialize(context)
        self.quiet = os.environ.get("TUNE_QUIET_WORKER_LOGS") == "1"
        self.compact = os.environ.get("TUNE_COMPACT_RESPONSE") == "1"
        self.orjson = None
        if os.environ.get("TUNE_ORJSON") == "1":
            import orjson

            self.orjson = orjson
        self.raw_uint8 = os.environ.get("TUNE_RAW_UINT8") == "1"
        if self.quiet:
            logging.getLogger().setLevel(logging.WARNING)

    def _raw_pixels(self, payload):
        """N x 784 float intensities from raw pixel bytes, or None if ``payload`` is not such a body."""
        if not self.raw_uint8 or not isinstance(payload, (bytes, bytearray)) or payload.startswith((PNG_MAGIC, JPEG_MAGIC)):
            return None
        width = self.spec.input_width
        if not payload or len(payload) % width:
            return None
        return np.frombuffer(payload, dtype=np.uint8).reshape(-1, width)

    def handle(self, data, context):
        if self.orjson is not None:
            for request in data:
                for key in ("data", "body"):
                    raw = request.get(key)
                    if isinstance(raw, (bytes, bytearray)) and not raw.startswith((PNG_MAGIC, JPEG_MAGIC)):
                        try:
                            request[key] = self.orjson.loads(raw)
                        except self.orjson.JSONDecodeError:
                            pass  # leave it to the project's decoder, which reports the error
        raw = {i: self._raw_pixels(r.get("data", r.get("body"))) for i, r in enumerate(data)}
        raw = {i: pixels for i, pixels in raw.items() if pixels is not None}
        if raw:
            answers = [None] * len(data)
            rest = [i for i in range(len(data)) if i not in raw]
            if rest:
                for i, answer in zip(rest, super().handle([data[i] for i in rest], context)):
                    answers[i] = answer
            mean, std = self.spec.normalize
            pixels = np.concatenate(list(raw.values()))
            x = ((pixels.astype(np.float32) / np.float32(255.0)) - np.float32(mean)) / np.float32(std)
            outputs = self.forward(x)
            start = 0
            for i, part in raw.items():
                named = self.postprocess(outputs[start:start + len(part)])
                start += len(part)
                answers[i] = self.to_native(named, len(part) > 1)
        else:
            answers = super().handle(data, context)
        if self.compact:
            dumps = self.orjson.dumps if self.orjson is not None else (lambda a: json.dumps(a, separators=(",", ":")))
            answers = [a if isinstance(a, (str, bytes)) else dumps(a) for a in answers]
        return answers
