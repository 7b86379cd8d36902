"""The Open Inference Protocol's binary tensor data extension, client side: numpy and the standard library only,
so that scripts without ``requests`` (scripts/gpu_check.py on a bare GPU box) share it with client/api.py.

Wire format (Triton's extension_binary_data.md, what tritonclient sends by default): the body is a JSON
header of ``Inference-Header-Content-Length`` bytes, then each binary tensor's raw little-endian bytes in
order; a tensor with ``parameters.binary_data_size`` carries no ``data``.
"""
from __future__ import annotations

import json

import numpy as np

# OIP datatype ↔ little-endian numpy dtype, for the binary tensor data extension.
BINARY_DATATYPES = {
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "BOOL": "?",
}


def binary_v2_request(
    array: np.ndarray, name: str = "input-0", datatype: str | None = None, request_id: str | None = None
) -> tuple[bytes, int]:
    """An OIP request with one binary input tensor and every output asked back in binary.

    Returns ``(body, json_header_length)``; send the length as ``Inference-Header-Content-Length``.
    """
    array = np.asarray(array)
    if datatype is None:
        datatype = "INT64" if np.issubdtype(array.dtype, np.integer) else "FP32"
    raw = np.ascontiguousarray(array, dtype=BINARY_DATATYPES[datatype]).tobytes()
    header = {
        "inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype,
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }
    if request_id is not None:
        header["id"] = request_id
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + raw, len(encoded)


def parse_binary_v2_response(body: bytes, header_length: str | None) -> dict:
    """A v2 response dict from a (possibly) binary response: each binary output's bytes become its ``data``."""
    if header_length is None:
        return json.loads(body)
    length = int(header_length)
    response = json.loads(body[:length])
    offset = length
    for output in response.get("outputs", []):
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            continue
        dtype = np.dtype(BINARY_DATATYPES[output["datatype"]])
        output["data"] = np.frombuffer(body, dtype, count=int(size) // dtype.itemsize, offset=offset).reshape(output["shape"])
        offset += int(size)
    return response
