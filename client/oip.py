"""The Open Inference Protocol's binary tensor data extension, client side, over the codec in wire/oip.py:
numpy and the standard library only, so that scripts without ``requests`` (scripts/gpu_check.py on a bare GPU
box) share it with client/api.py.
"""
from __future__ import annotations

import numpy as np

from wire import oip


def binary_v2_request(
    array: np.ndarray, name: str = "input-0", datatype: str | None = None, request_id: str | None = None
) -> tuple[bytes, int]:
    """An OIP request with one binary input tensor and every output asked back in binary.

    Returns ``(body, json_header_length)``; send the length as ``Inference-Header-Content-Length``.
    """
    array = np.asarray(array)
    if datatype is None:
        datatype = "INT64" if np.issubdtype(array.dtype, np.integer) else "FP32"
    raw = oip.tensor_bytes(array, datatype)
    header = {
        "inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype,
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }
    if request_id is not None:
        header["id"] = request_id
    return oip.join_body(header, [raw])


def parse_binary_v2_response(body: bytes, header_length: str | None) -> dict:
    """A v2 response dict from a (possibly) binary response: each binary output's bytes become its ``data``
    (a numpy array of its shape). Raises ``wire.oip.WireError`` (a ValueError) for a malformed body."""
    response, binary = oip.split_body(body, header_length)
    outputs = response.get("outputs", []) if isinstance(response, dict) else []
    for output, data in zip(outputs, oip.binary_tensors(outputs, binary, "outputs")):
        if data is not None:
            output["data"] = oip.tensor_from_bytes(data, output["datatype"], output["shape"])
    return response
