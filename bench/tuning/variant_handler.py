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
  TorchServe would otherwise serialise with ``json.dumps(indent=2)``.
"""
import json
import logging
import os

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
        if self.quiet:
            logging.getLogger().setLevel(logging.WARNING)

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
        answers = super().handle(data, context)
        if self.compact:
            answers = [a if isinstance(a, (str, bytes)) else json.dumps(a, separators=(",", ":")) for a in answers]
        return answers
