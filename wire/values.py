"""How a JSON value that arrived is checked and shown in an error message: short, bounded renderings
(a huge body never ends up in a message) and the JSON type names a client knows. Standard library only."""
from __future__ import annotations

import json
import reprlib
from typing import Any

_TYPE_NAMES = {type(None): "null", bool: "boolean", str: "string", dict: "object", list: "list"}


def is_int(value: Any) -> bool:
    """True for a JSON integer: an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def type_name(value: Any) -> str:
    """The JSON name of ``value``'s type (``null``, ``boolean``, ``string``, ``object``, ``list``), else Python's."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def short(value: Any, limit: int = 40) -> str:
    """JSON-like rendering cut to ``limit`` characters; a dict shows its keys only (it may be huge)."""
    if isinstance(value, dict):
        text = "{" + ", ".join(json.dumps(str(k)) for k in list(value)[:5]) + (", ...}" if len(value) > 5 else "}")
    elif isinstance(value, list):
        text = reprlib.repr(value)  # bounded: shows at most 6 items per level
    elif isinstance(value, (str, bool)) or value is None:
        text = json.dumps(value)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def what(value: Any) -> str:
    """``null``, or the JSON type name and a short rendering, e.g. ``string "abc"``."""
    return "null" if value is None else f"{type_name(value)} {short(value)}"


def fmt_shape(shape) -> str:
    """A shape as the JSON list a client sent or expects, e.g. ``[2, 784]``."""
    return "[" + ", ".join(str(d) for d in shape) + "]"
