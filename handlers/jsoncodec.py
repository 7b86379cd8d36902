"""JSON text in and out of the handlers: orjson for speed, the standard library as the reference.

``json_loads`` parses request bodies (also for serve/torchserve/worker.py, which decodes JSON bodies as
TorchServe would, through the handler's ``json_loads``), ``encode_json`` writes responses. A list parsed from a text of nothing but numbers and
brackets comes back as a :class:`NumberList`, which handlers/decoding.numeric_array converts in one call.
"""
from __future__ import annotations

import json
from typing import Any

try:  # optional speed-up (requirements pin it); both directions fall back to the stdlib
    import orjson
except ImportError:  # pragma: no cover
    orjson = None


def json_loads(text: str | bytes) -> Any:
    """``json.loads``, through orjson (3-6x faster on number arrays) when it is installed and accepts the text.

    The stdlib stays the reference: whatever orjson refuses (NaN literals, huge integers, lone surrogates,
    bad UTF-8 ...) goes to ``json.loads``, so results and errors are the stdlib's. A list parsed from a text
    of nothing but numbers and brackets (also as ``{"data": ...}``) comes back as a :class:`NumberList`.
    """
    if orjson is not None:
        try:
            return _mark_number_lists(orjson.loads(text), text)
        except orjson.JSONDecodeError:
            pass
    return _mark_number_lists(json.loads(text), text)


class NumberList(list):
    """A JSON array whose text held only numbers, brackets, commas and whitespace: nested lists of ints and
    floats, no booleans, strings, nulls or objects. :func:`numeric_array` then converts it in one
    ``np.array`` call instead of checking every element's type (a third of decoding a JSON image)."""


_NUMBER_TEXT = b"0123456789+-.eE,[] \t\n\r"
_DATA_OBJECT = b'{"data":}'  # what is left of {"data": <numbers>} without _NUMBER_TEXT's characters


def _mark_number_lists(value: Any, text: str | bytes) -> Any:
    if isinstance(text, str):
        if not text.isascii():
            return value
        text = text.encode("ascii")
    if type(value) is list:
        if not bytes(text).translate(None, _NUMBER_TEXT):
            return NumberList(value)
    elif type(value) is dict and type(value.get("data")) is list and len(value) == 1:
        if bytes(text).translate(None, _NUMBER_TEXT) == _DATA_OBJECT:
            value["data"] = NumberList(value["data"])
    return value


def encode_json(response: Any) -> bytes:
    """Compact UTF-8 JSON bytes, through orjson (~5x faster than the stdlib for a digit's answer) when it is
    installed and accepts the value, else ``json.dumps``. Why compact and ours: given a dict, TorchServe
    serialises it with ``json.dumps(indent=2)``, which forces Python's slow pure-Python encoder and doubles
    the response size. NaN or infinite floats, which no answer should hold, come out as ``null`` (orjson)
    rather than the stdlib's non-JSON ``NaN``."""
    if orjson is not None:
        try:
            return orjson.dumps(response)
        except TypeError:  # orjson.JSONEncodeError: integers over 64 bits, non-string keys ...
            pass
    return json.dumps(response, separators=(",", ":")).encode()
