"""handlers/jsoncodec.py: orjson with the standard library as the reference, and the numbers-only fast path.

A body that is only numbers and brackets is parsed into a ``NumberList``; ``numeric_array`` converts it in one
call and must give exactly what the general path gives, and the same error for anything it refuses.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from handlers import decoding, jsoncodec
from handlers.decoding import InputError, numeric_array
from handlers.jsoncodec import NumberList, encode_json, json_loads


@pytest.mark.parametrize("text, marked", [
    ("[[0.0, 0.5], [1, 2e-3]]", True),
    (" [ 1 ,\n\t-2.5E+2 ]\r\n", True),
    ('{"data": [[0.1, 0.2]]}', True),
    ('{ "data" : [1, 2] }', True),
    ("[1, true]", False),  # a boolean
    ('[1, "2"]', False),  # a string
    ("[1, null]", False),
    ('{"data": [1], "extra": 2}', False),
    ('{"inputs": [1]}', False),
    ('{"data": 1}', False),
    ('["\u00e9"]', False),  # not ASCII
])
def test_number_lists_are_marked_only_for_numbers_only_text(text, marked):
    value = json_loads(text)
    array = value.get("data") if isinstance(value, dict) else value
    assert (type(array) is NumberList) is marked
    assert value == json.loads(text)  # the same value either way
    assert json_loads(text.encode()) == value


@pytest.mark.parametrize("text", [
    "[[0.0, 0.5], [1, 0.25]]", "[0.5]", "[[[1, 2]], [[3, 4]]]", "[12345678901234567890123456789]",
    "[[1, 2], [3]]", "[[]]", "[]", "[1e999]", "[-1e999, 1]", "[[[[[[1]]]]]]", "[1e400, 1]",
    "[" + ",".join(["0.1"] * 784) + "]",
])
def test_numeric_array_fast_path_matches_the_general_path(text):
    marked = json_loads(text)
    assert type(marked) is NumberList
    plain = json.loads(text)
    try:
        expected = numeric_array(plain)
    except InputError as err:
        with pytest.raises(InputError) as refused:
            numeric_array(marked)
        assert refused.value.message == err.message
    else:
        got = numeric_array(marked)
        assert got.dtype == expected.dtype == np.float64 and np.array_equal(got, expected)


def test_decode_native_takes_the_fast_path_for_a_json_image():
    from models.registry import get_spec

    spec = get_spec("mnistnet")
    pixels = np.random.default_rng(0).random((28, 28)).round(4)
    text = json.dumps({"data": pixels.tolist()})
    fast, _ = decoding.decode_native(json_loads(text), spec)
    slow, _ = decoding.decode_native(json.loads(text), spec)
    assert np.array_equal(fast, slow) and fast.dtype == np.float32 and fast.shape == (1, 784)


def test_encode_json_is_compact_and_falls_back_to_the_stdlib():
    assert jsoncodec.orjson is not None, "orjson is pinned (requirements-serve.txt): it must be installed"
    assert encode_json({"a": [1, 0.5], "b": "é"}) == '{"a":[1,0.5],"b":"é"}'.encode()
    big = {"n": 2 ** 70}  # orjson refuses integers over 64 bits
    assert json.loads(encode_json(big)) == big
    assert encode_json([float("nan")]) == b"[null]"  # valid JSON, unlike the stdlib's NaN
