"""wire/oip.py, the Open Inference Protocol codec, against tritonclient (an independent implementation of the
same protocol): its datatype mapping, its BYTES framing, the request bodies ``tritonclient.http`` builds and
the response bodies it parses. Also the client's wrappers (client/oip.py) over the codec."""
from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import (
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from client.oip import binary_v2_request, parse_binary_v2_response
from paths import REPO_ROOT
from wire import oip

# Every datatype of the KServe v2 protocol (its "Tensor Data Types" table).
PROTOCOL_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                      "FP16", "FP32", "FP64", "BF16", "BYTES"]
FIXED = [d for d in PROTOCOL_DATATYPES if d not in ("BF16", "BYTES")]
ParseBody = triton.InferenceServerClient.parse_response_body
BuildBody = triton.InferenceServerClient.generate_request_body


def reference_dtype(datatype: str) -> np.dtype:
    """tritonclient's numpy dtype for ``datatype``, little-endian as the wire carries it."""
    return np.dtype(triton_to_np_dtype(datatype)).newbyteorder("<")


def sample(datatype: str, shape=(2, 3), seed: int = 0) -> np.ndarray:
    """Values over the datatype's whole range (its extremes included)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(triton_to_np_dtype(datatype))
    count = int(np.prod(shape))
    if dtype == np.bool_:
        values = rng.integers(0, 2, count).astype(bool)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)
        values[:2] = [info.min, info.max]
    else:
        values = rng.normal(scale=1e3, size=count).astype(dtype)
        values[:2] = [np.finfo(dtype).min, np.finfo(dtype).max]
    return values.reshape(shape)


def triton_input(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


# ------------------------------------------------------------------------------------------ datatypes


def test_the_codec_knows_every_protocol_datatype():
    assert sorted(oip.DATATYPES) == sorted(PROTOCOL_DATATYPES)
    assert all(triton_to_np_dtype(d) is not None for d in PROTOCOL_DATATYPES)


@pytest.mark.parametrize("datatype", FIXED)
def test_numpy_dtypes_match_tritonclient(datatype):
    dtype = oip.NUMPY_DTYPES[datatype]
    assert dtype == reference_dtype(datatype)
    assert dtype.byteorder in "<|" or (dtype.byteorder == "=" and sys.byteorder == "little")
    assert np_to_triton_dtype(dtype) == datatype
    assert oip.numpy_dtype(datatype) == dtype


@pytest.mark.parametrize("datatype", [d for d in PROTOCOL_DATATYPES if d != "BYTES"])
def test_element_sizes_match_tritonclient(datatype):
    assert oip.ELEMENT_SIZES[datatype] == np.dtype(triton_to_np_dtype(datatype)).itemsize
    assert oip.byte_size(datatype, [3, 5]) == 15 * oip.ELEMENT_SIZES[datatype]


def test_bf16_is_raw_only_and_bytes_has_no_element_size():
    assert triton_to_np_dtype("BF16") is ml_dtypes.bfloat16 and oip.ELEMENT_SIZES["BF16"] == 2
    assert "BF16" not in oip.NUMPY_DTYPES and "BYTES" not in oip.ELEMENT_SIZES
    for datatype, fragment in [("BF16", "raw bytes only"), ("BYTES", "no fixed size"), ("FP99", "unknown datatype")]:
        with pytest.raises(oip.WireError, match=fragment):
            oip.numpy_dtype(datatype)
    with pytest.raises(oip.WireError, match="no fixed element size"):
        oip.byte_size("BYTES", [2])


@pytest.mark.parametrize("datatype", [d for d in FIXED if d.startswith(("INT", "UINT"))])
def test_integer_ranges_match_tritonclient_dtypes(datatype):
    info = np.iinfo(triton_to_np_dtype(datatype))
    assert oip.INTEGER_RANGES[datatype] == (info.min, info.max)


# ------------------------------------------------------------------------------------- BYTES elements


BYTES_CASES = [[b"ab", b"", b"\xff\x00", "héllo".encode()], [b""], [b"x" * 300], []]


@pytest.mark.parametrize("values", BYTES_CASES)
def test_bytes_framing_matches_tritonclient(values):
    array = np.array(values, dtype=np.object_)
    reference = serialize_byte_tensor(array)
    expected = reference.item() if reference.size else b""
    assert oip.serialize_bytes(values) == expected
    assert oip.deserialize_bytes(expected) == list(deserialize_bytes_tensor(expected))
    assert oip.deserialize_bytes(expected, len(values)) == values


def test_bytes_str_elements_are_utf8_like_tritonclient():
    values = ["héllo", "", "✓"]
    assert oip.serialize_bytes(values) == serialize_byte_tensor(np.array(values, dtype=np.object_)).item()


@pytest.mark.parametrize("data, count, message", [
    (b"\x03\x00\x00\x00abc", 2, "BYTES data ends after 1 of 2 elements"),
    (b"\x05\x00\x00\x00abc", 1, "BYTES element 0 runs past the data"),
    (b"\x01\x00\x00\x00ab", 1, "1 bytes left after the 1 BYTES elements of its shape"),
    (b"\x01\x00", None, "ends inside the length of element 0"),
    (b"\x01\x00\x00\x00a\x09\x00\x00\x00", None, "BYTES element 1 runs past the data"),
])
def test_malformed_bytes_data_is_named(data, count, message):
    with pytest.raises(oip.WireError) as caught:
        oip.deserialize_bytes(data, count)
    assert message in str(caught.value)


def test_bytes_elements_must_be_bytes_or_str():
    with pytest.raises(oip.WireError, match="element 1 is int"):
        oip.serialize_bytes([b"a", 5])


# ------------------------------------------------------------------------- bodies built by tritonclient


def test_a_body_tritonclient_builds_splits_into_its_tensors():
    arrays = {d: sample(d, seed=i) for i, d in enumerate(FIXED)}
    words = np.array([[b"one", b""], [b"three", "✓".encode()]], dtype=np.object_)
    bf16 = np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16)
    inputs = [triton_input(d.lower(), a, d) for d, a in arrays.items()]
    inputs += [triton_input("words", words, "BYTES"), triton_input("bf16", bf16, "BF16"),
               triton_input("as_json", np.arange(4, dtype=np.int32), "INT32", binary=False)]
    body, length = BuildBody(inputs, request_id="r1")
    assert length is not None

    header, binary = oip.split_body(body, str(length))
    assert header == json.loads(body[:length]) and bytes(binary) == body[length:]
    parts = oip.binary_tensors(header["inputs"], binary)
    assert parts[-1] is None and header["inputs"][-1]["data"] == [0, 1, 2, 3]
    for tensor, part, datatype in zip(header["inputs"], parts, [*arrays, "BYTES"]):
        array = oip.tensor_from_bytes(part, tensor["datatype"], tensor["shape"])
        expected = arrays[datatype] if datatype in arrays else words
        assert tensor["datatype"] == datatype and array.shape == expected.shape
        np.testing.assert_array_equal(array, expected)
    assert bytes(parts[-2]) == bf16.tobytes()  # BF16: raw bytes, 2 per element
    with pytest.raises(oip.WireError, match="raw bytes only"):
        oip.tensor_from_bytes(parts[-2], "BF16", [3])


def test_a_json_only_tritonclient_body_has_no_binary_section():
    body, length = BuildBody([triton_input("x", np.ones((1, 2), np.float32), "FP32", binary=False)])
    assert length is None
    header, binary = oip.split_body(body, None)
    assert header == json.loads(body) and len(binary) == 0
    assert oip.binary_tensors(header["inputs"], binary) == [None]


def test_client_request_equals_what_tritonclient_sends():
    images = np.random.default_rng(1).random((3, 784), dtype=np.float32)
    body, length = binary_v2_request(images, name="input", request_id="7")
    reference, ref_length = BuildBody([triton_input("input", images, "FP32")], request_id="7")
    assert json.loads(body[:length]) == json.loads(reference[:ref_length])
    assert body[length:] == reference[ref_length:]
    ints, int_length = binary_v2_request(np.array([[1, -2]]))
    ref_ints, ref_int_length = BuildBody([triton_input("input-0", np.array([[1, -2]], np.int64), "INT64")])
    assert json.loads(ints[:int_length]) == json.loads(ref_ints[:ref_int_length])
    assert ints[int_length:] == ref_ints[ref_int_length:]


# --------------------------------------------------------------------------- bodies tritonclient parses


def response_header(outputs: dict[str, tuple[str, np.ndarray, bool]]) -> tuple[dict, list[bytes]]:
    """A response's JSON header and binary blobs for ``{name: (datatype, array, binary?)}``."""
    entries, blobs = [], []
    for name, (datatype, array, binary) in outputs.items():
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = oip.tensor_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    return {"model_name": "m", "model_version": "1", "id": "5", "outputs": entries}, blobs


def test_a_body_the_codec_joins_is_parsed_by_tritonclient():
    outputs = {d.lower(): (d, sample(d, seed=i), True) for i, d in enumerate(FIXED)}
    outputs["words"] = ("BYTES", np.array([[b"a", b""], [b"\x00\xff", "✓".encode()]], dtype=np.object_), True)
    outputs["as_json"] = ("FP32", np.array([[0.5, -1.0]], np.float32), False)
    header, blobs = response_header(outputs)
    body, length = oip.join_body(header, blobs)
    assert length == len(oip.encode_header(header)) and body[:length] == oip.encode_header(header)

    result = ParseBody(body, header_length=length)
    assert result.get_response()["id"] == "5"
    for name, (datatype, array, _) in outputs.items():
        got = result.as_numpy(name)
        assert got.shape == array.shape and result.get_output(name)["datatype"] == datatype
        np.testing.assert_array_equal(got, array)
    mine = parse_binary_v2_response(body, str(length))  # the client reads it the same way
    for output, (_, array, _) in zip(mine["outputs"], outputs.values()):
        np.testing.assert_array_equal(np.reshape(output["data"], array.shape), array)


def test_without_blobs_the_body_is_plain_json():
    header, blobs = response_header({"y": ("FP32", np.array([1.0], np.float32), False)})
    body, length = oip.join_body(header)
    assert length is None and json.loads(body) == header
    assert ParseBody(body).as_numpy("y").tolist() == [1.0]
    assert parse_binary_v2_response(body, None) == header


# ------------------------------------------------------------------------------------- malformed bodies


BODY = b'{"inputs":[{"name":"x","shape":[2],"datatype":"UINT8","parameters":{"binary_data_size":2}}]}' + b"\x01\x02"
HEADER = BODY.index(b"\x01\x02")


@pytest.mark.parametrize("body, length, message", [
    (BODY, "12x", 'Inference-Header-Content-Length must be an integer; got "12x"'),
    (BODY, "1_0", "must be an integer"),
    (BODY, "-3", "must not be negative; got -3"),
    (BODY, str(10**40), f"is {10**40} but the body has only {len(BODY)} bytes"),
    (BODY, "0", "is 0: the body has no JSON inference header"),
    (BODY, "20", "the JSON inference header (20 bytes) is not valid JSON"),
    (b"\xff\xfe" + BODY, "2", "the first 2 bytes of the body (Inference-Header-Content-Length) are not UTF-8 JSON"),
    (b"[" * 100_000 + b"]" * 100_000, None, "the body is not valid JSON"),
    (b"\xff", None, "the body is not UTF-8 JSON"),
])
def test_malformed_bodies_are_named(body, length, message):
    with pytest.raises(oip.WireError) as caught:
        oip.split_body(body, length)
    assert message in str(caught.value)


def test_a_good_body_splits_with_padding_around_the_length():
    header, binary = oip.split_body(bytearray(BODY), f" {HEADER} ")
    assert header["inputs"][0]["name"] == "x" and bytes(binary) == b"\x01\x02"
    assert isinstance(binary, memoryview)  # a view of the body, not a copy


@pytest.mark.parametrize("tensors, binary, message", [
    ([{"parameters": [1]}], b"", "inputs[0].parameters must be an object; got list [1]"),
    ([{"parameters": {"binary_data_size": "2"}}], b"ab",
     'inputs[0].parameters.binary_data_size must be a non-negative integer; got string "2"'),
    ([{"parameters": {"binary_data_size": True}}], b"ab", "got boolean true"),
    ([{"parameters": {"binary_data_size": -1}}], b"ab", "non-negative"),
    ([{"parameters": {"binary_data_size": 3}}], b"ab",
     "inputs declare 3 bytes of binary data but the body holds only 2"),
    ([{"parameters": {"binary_data_size": 1}}], b"ab", "but inputs declare only 1: 1 trailing bytes"),
    ([{"parameters": {"binary_data_size": 1}}], None,
     "inputs declare binary_data_size but the request has no Inference-Header-Content-Length header"),
])
def test_binary_sizes_must_add_up(tensors, binary, message):
    with pytest.raises(oip.WireError) as caught:
        oip.binary_tensors(tensors, None if binary is None else memoryview(binary))
    assert message in str(caught.value)


def test_tensor_size_must_match_its_shape():
    with pytest.raises(oip.WireError, match="3 bytes of FP32 for shape \\[1\\], which needs 4"):
        oip.tensor_from_bytes(b"abc", "FP32", [1])


def test_the_codec_imports_on_a_bare_box():
    """numpy and the standard library only: no tritonclient, requests, torch or handlers."""
    code = ("import sys; import wire.oip, client.oip; "
            "bad = {'tritonclient', 'requests', 'torch', 'handlers', 'grpc', 'PIL'} & set(sys.modules); "
            "sys.exit(f'imported {sorted(bad)}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout
