"""Property-based tests of handlers/decoding.py and handlers/protocols.py: whatever arrives, the decoder
either returns a valid float32 batch for the model or raises InputError (400/413) — never any other
exception."""
from __future__ import annotations

import io
import json

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from handlers.decoding import MAX_SAMPLES, InputError
from handlers.protocols import INPUT_DATATYPES, Decoded, OipRequest, decode_payload, decode_request
from models.registry import REGISTRY, get_spec

SPECS = st.sampled_from(sorted(REGISTRY.values(), key=lambda s: s.name))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=40,
)


def check(payload, spec, headers=None):
    """Decode ``payload``; assert the result is valid or the error is an InputError. Returns the batch or None."""
    try:
        decoded = decode_payload(payload, spec) if headers is None else decode_request({"body": payload}, spec, headers)
    except InputError as err:
        assert err.status in (400, 413) and err.message
        return None
    x = decoded.samples
    assert isinstance(decoded, Decoded) and decoded.kind in ("native", "oip", "v1")
    assert headers is None or decoded.kind == "oip"
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    assert x.shape[1:] == tuple(spec.input_shape) and 1 <= len(x) <= MAX_SAMPLES
    assert np.all(np.isfinite(x))
    assert isinstance(decoded.is_list, bool) and (decoded.oip is None or isinstance(decoded.oip, OipRequest))
    if spec.normalize is not None:  # image intensities were checked and clipped to [0, 1] first
        mean, std = spec.normalize
        assert x.min() >= (0 - mean) / std - 1e-5 and x.max() <= (1 - mean) / std + 1e-5
    return x


@FAST
@given(payload=st.binary(max_size=300), spec=SPECS)
def test_any_bytes(payload, spec):
    check(payload, spec)


@FAST
@given(value=JSON_VALUES, spec=SPECS)
def test_any_json_value_parsed_or_as_text(value, spec):
    parsed = check(value, spec)  # as TorchServe hands over an application/json body
    as_text = check(json.dumps(value).encode(), spec)  # as raw bytes (other content types)
    assert (parsed is None) == (as_text is None)
    if parsed is not None:
        np.testing.assert_array_equal(parsed, as_text)


@FAST
@given(value=JSON_VALUES, spec=SPECS)
def test_any_json_value_under_data_or_inputs(value, spec):
    check({"data": value}, spec)
    check({"inputs": value}, spec)
    check({"inputs": [{"name": "x", "shape": value, "datatype": "FP32", "data": value}]}, spec)


def near_valid_shapes(spec):
    """Shapes around the ones the model accepts, so the success path is exercised too."""
    if spec.is_image_model:
        shapes = [(28, 28), (784,), (1, 784), (3, 784), (2, 28, 28), (2, 1, 28, 28), (27, 28), (783,), (2, 2)]
    else:
        w = spec.input_width
        shapes = [(w,), (1, w), (4, w), (4, w + 1), (w + 1,), (), (2, 1, w)]
    return st.sampled_from(shapes)


@st.composite
def near_valid_arrays(draw):
    spec = draw(SPECS)
    shape = draw(near_valid_shapes(spec))
    elements = st.floats(-0.005, 1.005) if spec.is_image_model else st.floats(-1e6, 1e6)
    array = draw(arrays(np.float64, shape, elements=elements))
    # Now and then one NaN, infinity, out-of-range pixel or number too large for float32 sneaks in.
    poison = draw(st.none() | st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e39, 255.0, -0.5]))
    if poison is not None and array.size:
        array.flat[draw(st.integers(0, array.size - 1))] = poison
    return spec, array


@FAST
@given(case=near_valid_arrays(), wrap=st.sampled_from(["bare", "data", "v2"]),
       datatype=st.sampled_from(["FP32", "FP64"]) | st.sampled_from(sorted(INPUT_DATATYPES)),
       drop=st.sampled_from([0, 0, 0, 1]))
def test_near_valid_arrays(case, wrap, datatype, drop):
    spec, array = case
    if wrap == "bare":
        payload = array.tolist()
    elif wrap == "data":
        payload = {"data": array.tolist()}
    else:
        flat = array.reshape(-1).tolist()
        payload = {"inputs": [{"name": "x", "shape": list(array.shape), "datatype": datatype,
                               "data": flat[: len(flat) - drop]}]}
    x = check(payload, spec)
    event(f"{wrap}: {'accepted' if x is not None else 'refused'}")
    if x is not None and wrap != "v2":  # what is accepted is exactly the sent numbers, normalised
        values = np.clip(array, 0, 1) if spec.is_image_model else array
        values = values.astype(np.float32).reshape(x.shape)
        if spec.normalize is not None:
            mean, std = spec.normalize
            values = (values - np.float32(mean)) / np.float32(std)
        np.testing.assert_allclose(x, values, rtol=1e-6, atol=1e-6)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png(0)


@FAST
@given(cut=st.integers(0, len(PNG)), flips=st.lists(st.tuples(st.integers(0, len(PNG) - 1), st.integers(0, 255)),
                                                    max_size=4))
def test_corrupted_png(cut, flips):
    data = bytearray(PNG)
    for position, value in flips:
        data[position] = value
    check(bytes(data[:cut] if cut > 8 else data), get_spec("mnistnet"))


@st.composite
def binary_requests(draw):
    """OIP binary-extension bodies around valid ones: shapes, datatypes, sizes and header lengths a bit off."""
    spec = draw(SPECS)
    n = draw(st.integers(0, 3))
    width = spec.input_width
    shape = draw(st.sampled_from([[n, width], [n], [n, width + 1], [width], [n, 1, width], [-1, width]]))
    datatype = draw(st.sampled_from(sorted(INPUT_DATATYPES) + ["BOOL", "BYTES", "FP32"]))
    itemsize = int(datatype[-2:]) // 8 if datatype[-2:].isdigit() else 1
    true_size = max(0, int(np.prod(shape))) * itemsize
    size = draw(st.sampled_from([true_size, true_size]) | st.integers(-2, true_size + 8) | st.just("1") | st.none())
    data = draw(st.binary(min_size=true_size, max_size=true_size)) + draw(st.binary(max_size=3))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    tensor = {"name": "x", "shape": shape, "datatype": datatype}
    if size is not None:
        tensor["parameters"] = {"binary_data_size": size}
    header = json.dumps({"inputs": [tensor], **draw(st.sampled_from([{}, {"outputs": [{"name": "predictions"}]},
                                                                       {"parameters": {"binary_data_output": True}}]))})
    length = draw(st.sampled_from([len(header)] * 3 + [len(header) - 1, len(header) + 1, -1, 0]))
    length = draw(st.sampled_from([str(length), str(length), "x", " 7 "]))
    return spec, header.encode() + data, {"oip-request": "v2", "inference-header-content-length": length}


@FAST
@given(case=binary_requests())
def test_binary_extension_bodies(case):
    spec, body, headers = case
    x = check(body, spec, headers)
    event("accepted" if x is not None else "refused")
