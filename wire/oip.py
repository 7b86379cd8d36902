"""The Open Inference Protocol (KServe v2) codec: datatypes, BYTES elements and the binary tensor data body.

The one place that knows how OIP tensors are laid out in bytes; the handlers (shipped inside every archive)
and the client (client/oip.py) use it. numpy and the standard
library only. docs/protocols.md describes the formats.
"""
from __future__ import annotations

import json
import re
import struct
from typing import Any, Callable, Iterable

import numpy as np

from wire.values import is_int, short, what

HEADER_LENGTH = "Inference-Header-Content-Length"

# OIP datatype → little-endian numpy dtype. BF16 has no numpy dtype (raw bytes only); BYTES is variable-length.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    **{f"UINT{bits}": np.dtype(f"<u{bits // 8}") for bits in (8, 16, 32, 64)},
    **{f"INT{bits}": np.dtype(f"<i{bits // 8}") for bits in (8, 16, 32, 64)},
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# Bytes per element of every fixed-size datatype.
ELEMENT_SIZES: dict[str, int] = {**{name: dtype.itemsize for name, dtype in NUMPY_DTYPES.items()}, "BF16": 2}
DATATYPES = (*ELEMENT_SIZES, "BYTES")
# (lowest, highest) value of every integer datatype.
INTEGER_RANGES: dict[str, tuple[int, int]] = {
    name: (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    for name, dtype in NUMPY_DTYPES.items() if dtype.kind in "iu"
}

_LENGTH = struct.Struct("<I")  # the length before each BYTES element
_INTEGER_TEXT = re.compile(r"[+-]?\d{1,100}")


class WireError(ValueError):
    """Bytes or a header that do not follow the OIP wire format; the message says what is wrong."""


# ------------------------------------------------------------------------------------------ datatypes


def numpy_dtype(datatype: str) -> np.dtype:
    """The little-endian numpy dtype of ``datatype``; WireError for BF16, BYTES and unknown names."""
    try:
        return NUMPY_DTYPES[datatype]
    except (KeyError, TypeError):
        if datatype == "BF16":
            raise WireError("BF16 has no numpy dtype: its tensors travel as raw bytes only") from None
        if datatype == "BYTES":
            raise WireError("BYTES elements have no fixed size: use serialize_bytes / deserialize_bytes") from None
        raise WireError(f"unknown datatype {short(datatype)}; one of {', '.join(DATATYPES)}") from None


def byte_size(datatype: str, shape: Iterable[int]) -> int:
    """Bytes of a fixed-size tensor of ``shape``; WireError for BYTES and unknown datatypes."""
    if datatype not in ELEMENT_SIZES:
        raise WireError(f"datatype {short(datatype)} has no fixed element size")
    count = 1
    for dim in shape:
        count *= dim
    return count * ELEMENT_SIZES[datatype]


def tensor_bytes(values: Any, datatype: str) -> bytes:
    """The raw bytes of a tensor (an array or nested lists) as ``datatype``, row-major, little-endian.
    BYTES: each element framed by :func:`serialize_bytes`."""
    if datatype == "BYTES":
        flat = np.asarray(values, dtype=object).reshape(-1)
        return serialize_bytes(flat)
    return np.ascontiguousarray(values, dtype=numpy_dtype(datatype)).tobytes()


def tensor_from_bytes(data, datatype: str, shape: list[int]) -> np.ndarray:
    """The array of ``shape`` held in ``data`` (a view of it, not a copy; BYTES: an object array of bytes).
    WireError when the size does not match the shape."""
    if datatype == "BYTES":
        count = 1
        for dim in shape:
            count *= dim
        return np.array(deserialize_bytes(data, count) or [], dtype=object).reshape(shape)
    dtype = numpy_dtype(datatype)
    needed = byte_size(datatype, shape)
    if len(data) != needed:
        raise WireError(f"{len(data)} bytes of {datatype} for shape {list(shape)}, which needs {needed}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# ------------------------------------------------------------------------------------- BYTES elements


def serialize_bytes(values: Iterable) -> bytes:
    """BYTES elements as OIP binary data: a 4-byte little-endian length before each element (str as UTF-8)."""
    parts = []
    for index, value in enumerate(values):
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value)
        else:
            raise WireError(f"BYTES element {index} is {type(value).__name__}; elements must be bytes or str")
        parts.append(_LENGTH.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def deserialize_bytes(data, count: int | None = None) -> list[bytes]:
    """The elements of BYTES data; ``count`` given, exactly that many must fill ``data`` exactly."""
    view = memoryview(data).cast("B")
    size, offset, elements = len(view), 0, []
    while (offset < size) if count is None else (len(elements) < count):
        index = len(elements)
        if offset + 4 > size:
            if count is None:
                raise WireError(f"BYTES data ends inside the length of element {index}")
            raise WireError(f"BYTES data ends after {index} of {count} elements")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > size:
            raise WireError(f"BYTES element {index} runs past the data")
        elements.append(bytes(view[offset:offset + length]))
        offset += length
    if offset != size:
        raise WireError(f"{size - offset} bytes left after the {count} BYTES elements of its shape")
    return elements


# ----------------------------------------------------------------------------- binary tensor data body


def header_length(value: Any) -> int:
    """The Inference-Header-Content-Length header's value as a non-negative integer (WireError if not)."""
    text = str(value).strip()
    if not _INTEGER_TEXT.fullmatch(text):
        raise WireError(f"{HEADER_LENGTH} must be an integer; got {short(text)}")
    length = int(text)
    if length < 0:
        raise WireError(f"{HEADER_LENGTH} must not be negative; got {length}")
    return length


def split_body(body, length: Any, loads: Callable[[str], Any] = json.loads) -> tuple[Any, memoryview]:
    """``(JSON header, binary section)`` of a body with the binary tensor data extension; the binary section
    is a view of ``body``, not a copy. ``length``: the Inference-Header-Content-Length header's value, or
    None for a plain JSON body (then the binary section is empty). ``loads`` parses the header's text;
    what it raises as ValueError is reported as invalid JSON. WireError says what is wrong."""
    view = memoryview(body).cast("B")
    if length is None:
        return _load(bytes(view), "the body", "the body is not UTF-8 JSON", loads), view[len(view):]
    length = header_length(length)
    if length > len(view):
        raise WireError(f"{HEADER_LENGTH} is {length} but the body has only {len(view)} bytes")
    if length == 0:
        raise WireError(f"{HEADER_LENGTH} is 0: the body has no JSON inference header")
    header = _load(bytes(view[:length]), f"the JSON inference header ({length} bytes)",
                   f"the first {length} bytes of the body ({HEADER_LENGTH}) are not UTF-8 JSON", loads)
    return header, view[length:]


def _load(raw: bytes, where: str, not_utf8: str, loads: Callable[[str], Any]) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(not_utf8) from None
    try:
        return loads(text)
    except RecursionError:
        raise WireError(f"{where} is not valid JSON: nested too deeply") from None
    except ValueError as err:
        raise WireError(f"{where} is not valid JSON: {err}") from None


def binary_tensors(tensors: list, binary: memoryview | None, where: str = "inputs") -> list[memoryview | None]:
    """Each tensor's bytes of the binary section (its ``parameters.binary_data_size``), None for a tensor that
    carries JSON ``data``. The sizes must add up to the binary section exactly; ``binary`` None means the
    body came without a binary section. ``where`` (``inputs`` or ``outputs``) names them in messages."""
    sizes = []
    for i, tensor in enumerate(tensors):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if parameters is not None and not isinstance(parameters, dict):
            raise WireError(f"{where}[{i}].parameters must be an object; got {what(parameters)}")
        size = (parameters or {}).get("binary_data_size")
        if size is not None and not (is_int(size) and size >= 0):
            raise WireError(
                f"{where}[{i}].parameters.binary_data_size must be a non-negative integer; got {what(size)}"
            )
        sizes.append(size)
    declared = sum(s for s in sizes if s is not None)
    received = 0 if binary is None else len(binary)
    message = "request" if where == "inputs" else "response"
    if declared and binary is None:
        raise WireError(f"{where} declare binary_data_size but the {message} has no {HEADER_LENGTH} header")
    if declared > received:
        raise WireError(
            f"{where} declare {declared} bytes of binary data but the body holds only {received} after the JSON header"
        )
    if declared < received:
        raise WireError(
            f"the body holds {received} bytes after the JSON header but {where} declare only {declared}: "
            f"{received - declared} trailing bytes"
        )
    parts, offset = [], 0
    for size in sizes:
        if size is None:
            parts.append(None)
        else:
            parts.append(binary[offset:offset + size])
            offset += size
    return parts


def encode_header(header: dict) -> bytes:
    """A JSON header as compact UTF-8 bytes."""
    return json.dumps(header, separators=(",", ":")).encode()


def join_body(header: bytes | dict, blobs: Iterable[bytes] = ()) -> tuple[bytes, int | None]:
    """``(body, header length)`` of a message with binary tensors: the JSON header (bytes, or a dict to encode),
    then the ``blobs`` in tensor order. The length is the Inference-Header-Content-Length value; None when
    there are no blobs: the body is plain JSON then."""
    if isinstance(header, dict):
        header = encode_header(header)
    blobs = list(blobs)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
