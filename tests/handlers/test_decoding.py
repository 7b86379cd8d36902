"""handlers/decoding.py (native forms) and the OIP JSON decoding of handlers/protocols.py: every accepted
input form, and every kind of bad input with its message."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from handlers.decoding import MAX_SAMPLES, InputError, _shrink, decode_image_bytes
from handlers.protocols import decode_payload as decode_body
from handlers.protocols import is_v2_request, request_payload
from models.registry import MNIST_STD, get_spec
from train.data import mnist_arrays, normalize_images

MNIST = get_spec("mnistnet")
REG10 = get_spec("regressionnet")
LINEAR = get_spec("linearregression")
MLP = get_spec("mlp")
ONE_LEVEL = 1 / 255 / MNIST_STD  # one grey level, in normalised units


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The first 8 real MNIST test digits, uint8 (8, 28, 28)."""
    images, _ = mnist_arrays("test")
    return np.array(images[:8])


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def expected(images_uint8: np.ndarray) -> np.ndarray:
    """What training feeds the network for these pixels: train.data.normalize_images, flattened."""
    return normalize_images(images_uint8).reshape(len(images_uint8), 784).numpy()


def decode_payload(payload, spec):
    """``(samples, is_list, OIP request or None)`` of a body sent without protocol headers."""
    decoded = decode_body(payload, spec)
    return decoded.samples, decoded.is_list, decoded.oip


def decode(payload, spec=MNIST):
    return decode_payload(payload, spec)


def error_of(payload, spec=MNIST) -> InputError:
    with pytest.raises(InputError) as info:
        decode_payload(payload, spec)
    return info.value


# ----------------------------------------------------------------------------------- image JSON


def test_one_image_matches_training_normalisation(digits):
    pixels = (digits[0] / 255.0).tolist()
    x, is_list, v2 = decode({"data": pixels})
    assert x.dtype == np.float32 and x.shape == (1, 784)
    assert not is_list and v2 is None
    np.testing.assert_allclose(x, expected(digits[:1]), atol=1e-6)


@pytest.mark.parametrize(
    "make, is_list",
    [
        (lambda d: (d[0] / 255).reshape(784).tolist(), False),  # one flat vector
        (lambda d: {"data": (d[0] / 255).tolist()}, False),  # one 28x28 image under "data"
        (lambda d: (d[:3] / 255).tolist(), True),  # bare list of 28x28 images
        (lambda d: {"data": (d[:3] / 255).reshape(3, 784).tolist()}, True),  # list of flat vectors
        (lambda d: (d[:3] / 255).reshape(3, 1, 28, 28).tolist(), True),  # torchvision-style N,1,28,28
        (lambda d: [(d[0] / 255).tolist()], True),  # a list of ONE image is still a list
    ],
)
def test_image_json_forms(digits, make, is_list):
    x, got_list, _ = decode(make(digits))
    n = len(x)
    assert got_list is is_list
    np.testing.assert_allclose(x, expected(digits[:n]), atol=1e-6)


def test_raw_json_text_bytes_and_bytearray_decode_alike(digits):
    body = {"data": (digits[:2] / 255).tolist()}
    text = json.dumps(body)
    reference, _, _ = decode(body)
    for payload in (text, text.encode(), bytearray(text.encode()), "\ufeff" + text):
        x, is_list, _ = decode(payload)
        assert is_list
        np.testing.assert_array_equal(x, reference)


def test_small_overshoot_is_clipped_not_refused():
    x, _, _ = decode([1.005] * 392 + [-0.005] * 392)
    np.testing.assert_allclose(x[0, :392], (1 - 0.1307) / 0.3081, atol=1e-6)
    np.testing.assert_allclose(x[0, 392:], (0 - 0.1307) / 0.3081, atol=1e-6)


# ------------------------------------------------------------------------------------ images


def test_png_digits_round_trip_to_the_json_tensor(digits):
    for digit in digits:
        from_png, is_list, _ = decode(png_bytes(digit))
        from_json, _, _ = decode((digit / 255.0).tolist())
        assert not is_list
        assert np.abs(from_png - from_json).max() <= ONE_LEVEL


def test_png_as_multipart_field_data(digits):
    # TorchServe hands a form upload over as {"data": <file bytes>} (other fields alongside).
    request = {"data": bytearray(png_bytes(digits[1])), "note": "ignored"}
    x, _, _ = decode(request_payload(request))
    np.testing.assert_allclose(x, expected(digits[1:2]), atol=1e-6)


def test_rgb_rgba_and_16_bit_pngs_decode_to_the_same_digit(digits):
    digit = digits[2]
    rgb = np.repeat(digit[:, :, None], 3, axis=2)
    # White ink whose opacity is the digit, over a transparent background: composited on black.
    rgba = np.dstack([np.full((28, 28, 3), 255, np.uint8), digit])
    sixteen = digit.astype(np.uint16) * 257
    reference = expected(digits[2:3])
    for body in (png_bytes(rgb), png_bytes(rgba, "RGBA"), png_bytes(sixteen)):
        x, _, _ = decode(body)
        assert np.abs(x - reference).max() <= ONE_LEVEL


def test_jpeg_is_lossy_but_close(digits):
    buffer = io.BytesIO()
    Image.fromarray(digits[3]).save(buffer, format="JPEG", quality=95)
    x, is_list, _ = decode(buffer.getvalue())
    assert not is_list
    assert np.abs(x - expected(digits[3:4])).max() * MNIST_STD < 0.1  # within 0.1 intensity


def test_larger_image_is_resized_to_28x28(digits):
    big = np.kron(digits[4], np.ones((4, 4), np.uint8))  # 112x112, each pixel a 4x4 block
    pixels = decode_image_bytes(png_bytes(big))
    assert pixels.shape == (28, 28) and 0 <= pixels.min() and pixels.max() <= 1
    assert np.abs(pixels - digits[4] / 255).mean() < 0.02


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_huge_images_are_box_reduced_first_and_still_decode_the_digit(digits, mode):
    """A 2800x2800 upload (100x the digit) goes through the cheap integer reduction before the float
    resize; every mode it may arrive in still decodes to the digit."""
    big = Image.fromarray(np.kron(digits[4], np.ones((100, 100), np.uint8)), mode="L")
    if mode == "I;16":
        big = Image.fromarray(np.asarray(big).astype(np.uint16) * 257)  # 16-bit, full scale
    elif mode != "L":
        big = big.convert(mode)
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    pixels = decode_image_bytes(buffer.getvalue())
    assert pixels.shape == (28, 28)
    assert np.abs(pixels - digits[4] / 255).mean() < 0.03


@pytest.mark.parametrize("side, reduced", [(4096, 114), (2800, 112), (200, 200), (28, 28)])
def test_shrink_keeps_at_least_four_times_the_target_side(side, reduced):
    image = Image.new("P", (side, side))
    assert _shrink(image, (28, 28)).size == (reduced, reduced)


def test_huge_jpeg_is_decoded_at_reduced_scale(digits):
    big = Image.fromarray(np.kron(digits[4], np.ones((100, 100), np.uint8)), mode="L")
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=95)
    pixels = decode_image_bytes(buffer.getvalue())
    assert np.abs(pixels - digits[4] / 255).mean() < 0.03


def test_integer_literal_with_too_many_digits_is_malformed_json_not_python_advice():
    message = error_of(b'{"data": [' + b"9" * 5000 + b"]}").message
    assert message.startswith("malformed JSON") and "digits" in message
    assert "sys." not in message


def test_non_square_image_is_padded_with_black_not_stretched():
    wide = np.full((20, 40), 255, np.uint8)  # all white, twice as wide as tall
    pixels = decode_image_bytes(png_bytes(wide))
    assert pixels[:5].max() < 0.05 and pixels[-5:].max() < 0.05  # black bands above and below
    assert pixels[10:18].min() > 0.95


def test_image_errors_name_the_problem(digits):
    png = png_bytes(digits[0])
    assert "truncated or corrupt" in error_of(png[: len(png) // 2]).message
    assert "not a readable image" in error_of(png[:9]).message
    assert "PNG and JPEG" in error_of(b"GIF89a" + b"\0" * 20).message
    assert "rows of numbers" in error_of(png, REG10).message


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries no pixel data: the decompression-bomb shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [5000, 100_000])
def test_oversized_images_are_refused_with_413_before_decoding(side):
    err = error_of(png_header_only(side, side))
    assert err.status == 413
    assert "4096" in err.message or "decompression bomb" in err.message


# ---------------------------------------------------------------------------------- tabular


@pytest.mark.parametrize(
    "spec, payload, rows, is_list",
    [
        (REG10, {"data": list(range(10))}, [list(range(10))], False),
        (REG10, {"data": [[0.5] * 10, [-1e30] * 10]}, [[0.5] * 10, [-1e30] * 10], True),
        (REG10, [[1] * 10], [[1] * 10], True),
        (MLP, [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], True),
        (LINEAR, 2.5, [[2.5]], False),
        (LINEAR, {"data": -1}, [[-1]], False),
        (LINEAR, {"data": [1, 2, 3]}, [[1], [2], [3]], True),
        (LINEAR, [[4], [5]], [[4], [5]], True),
        (LINEAR, b"[7]", [[7]], False),  # one row of W=1 values
    ],
)
def test_tabular_forms(spec, payload, rows, is_list):
    x, got_list, v2 = decode(payload, spec)
    assert x.dtype == np.float32 and v2 is None
    assert got_list is is_list
    np.testing.assert_array_equal(x, np.array(rows, np.float32))  # no normalisation for tabular specs


# --------------------------------------------------------------------------------- bad JSON


RAGGED = [[0.0] * 28] * 27 + [[0.0] * 27]


@pytest.mark.parametrize(
    "payload, spec, status, fragments",
    [
        (b"", MNIST, 400, ["empty request body"]),
        ("  \n", MNIST, 400, ["empty request body"]),
        (b'{"data": [1, 2', MNIST, 400, ["malformed JSON"]),
        (b"\xff\xfe\x00garbage", MNIST, 400, ["neither UTF-8 JSON nor a PNG/JPEG"]),
        ("1" * 5000, LINEAR, 400, ["malformed JSON"]),  # more digits than Python will parse
        ("[" * 100_000 + "]" * 100_000, MNIST, 400, ["malformed JSON", "deeply"]),
        ({"images": [0.0] * 784}, MNIST, 400, ["expected key 'data'", "'images'", "'inputs'"]),
        (None, MNIST, 400, ["'data' must be an array of numbers", "null"]),
        ({"data": "0.5"}, MNIST, 400, ["'data' must be an array of numbers", "string"]),
        (True, LINEAR, 400, ["must be an array of numbers", "boolean"]),
        ([], MNIST, 400, ["data is an empty list"]),
        ([[0.0] * 28] * 27, MNIST, 400, ["expected one 28x28 image", "27 rows of 28 values"]),
        ([0.0] * 783, MNIST, 400, ["flat 784-vector", "one row of 783 values"]),
        (0.5, MNIST, 400, ["got a single number"]),
        (RAGGED, MNIST, 400, ["ragged", "data[27]", "[27]", "[28]"]),
        ([[0.0, [0.0]]], MNIST, 400, ["ragged", "data[0][1]"]),
        ([[0.0], 0.0], MNIST, 400, ["ragged", "data[1] is a number"]),
        ([0.0] * 3 + ["0.5"] + [0.0] * 780, MNIST, 400, ["data[3] must be a number", 'string "0.5"']),
        ([0.0, True], MLP, 400, ["data[1] must be a number", "boolean"]),
        ([[0.0, None]], MLP, 400, ["data[0][1] must be a number", "null"]),
        ([[0.0, {"x": 1}]], MLP, 400, ["data[0][1] must be a number", "object"]),
        ([[0.0, float("nan")]], MLP, 400, ["data[0][1] is nan", "NaN and infinite"]),
        (b"[[0.0, Infinity]]", MLP, 400, ["data[0][1] is inf"]),
        ([10**400], LINEAR, 400, ["too large"]),
        ([1e300], LINEAR, 400, ["float32 range"]),
        ([[[[[[0.0]]]]]], LINEAR, 400, ["nested too deeply"]),
        ([[1.0] * 3], REG10, 400, ["expected rows of 10 value(s)", "1 row of 3 values"]),
        ([1.0] * 3, REG10, 400, ["expected rows of 10", "one row of 3 values"]),
        ({"data": 3}, REG10, 400, ["got a single number"]),
        ([[1.0]] * (MAX_SAMPLES + 1), LINEAR, 413, ["too many samples", str(MAX_SAMPLES)]),
        ([[0.0] * 784] * (MAX_SAMPLES + 1), MNIST, 413, ["too many samples"]),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(payload, spec, status, fragments):
    err = error_of(payload, spec)
    assert err.status == status
    for fragment in fragments:
        assert fragment in err.message


def test_pixel_range_errors_explain_the_0_255_mistake(digits):
    err = error_of({"data": digits[0].astype(float).tolist()})
    assert "intensities in [0, 1]" in err.message and "divide by 255" in err.message
    err = error_of([-0.5] * 784)
    assert "[-0.5, -0.5]" in err.message and "divide by 255" not in err.message


def test_request_payload_picks_the_form_field_then_the_body():
    assert request_payload({"body": b"x"}) == b"x"
    assert request_payload({"data": b"img", "body": b"x"}) == b"img"
    assert request_payload({"body": None}) is None  # a JSON `null` body, refused later
    with pytest.raises(InputError, match="no request body.*form fields: .a., .b..*application/json"):
        request_payload({"a": "1", "b": "2"})
    with pytest.raises(InputError, match="malformed request"):
        request_payload([1])


# ------------------------------------------------------------------------------ KServe v2


def v2(shape, data, datatype="FP32") -> dict:
    return {"id": "req-1", "inputs": [{"name": "input-0", "shape": shape, "datatype": datatype, "data": data}]}


def test_is_v2_request():
    assert is_v2_request(v2([1, 1], [0.0]))
    assert not is_v2_request({"data": [0.0]})
    assert not is_v2_request([{"inputs": []}])
    assert not is_v2_request(b'{"inputs": []}')


def test_v2_image_shapes_and_datatypes_match_the_native_path(digits):
    native, _, _ = decode((digits[:2] / 255).tolist())
    flat = (digits[:2] / 255).reshape(-1).tolist()
    bodies = [
        v2([2, 784], flat),
        v2([2, 28, 28], flat, "FP64"),
        v2([2, 1, 28, 28], (digits[:2] / 255).reshape(2, 1, 28, 28).tolist()),  # nested data
        v2([2, 784], digits[:2].reshape(-1).tolist(), "UINT8"),  # 0..255 bytes, divided by 255
    ]
    for body in bodies:
        x, is_list, request = decode(body)
        assert is_list and request.id == body.get("id")
        np.testing.assert_allclose(x, native, atol=1e-6)
    x, _, _ = decode(json.dumps(bodies[0]).encode())  # v2 arriving as raw bytes
    np.testing.assert_allclose(x, native, atol=1e-6)


def test_v2_tabular():
    x, _, _ = decode(v2([2, 10], list(range(20)), "INT64"), REG10)
    np.testing.assert_array_equal(x, np.arange(20, dtype=np.float32).reshape(2, 10))
    x, _, _ = decode(v2([3], [1.0, 2.0, 3.0]), LINEAR)
    assert x.shape == (3, 1)
    x, _, _ = decode(v2([2, 1], [[1.0], [2.0]]), LINEAR)
    assert x.shape == (2, 1)
    x, _, _ = decode(v2([1, 2], [200, 255], "UINT8"), MLP)  # UINT8 is scaled for images only
    np.testing.assert_array_equal(x, [[200.0, 255.0]])


@pytest.mark.parametrize(
    "body, spec, status, fragments",
    [
        ({"inputs": {}}, MNIST, 400, ["exactly one input tensor", "object"]),
        ({"inputs": []}, MNIST, 400, ["exactly one input tensor", "0 inputs"]),
        ({"inputs": [v2([1, 2], [0, 0])["inputs"][0]] * 2}, MLP, 400, ["2 inputs"]),
        ({"inputs": [[0.0]]}, MLP, 400, ["inputs[0] must be an object"]),
        ({"inputs": [{"name": "x", "data": [0.0, 0.0]}]}, MLP, 400, ["missing 'shape', 'datatype'"]),
        (v2([1, 2], [0, 0], "BYTES"), MLP, 400, ["datatype must be one of", "FP32", '"BYTES"']),
        (v2([1, 2], [0, 0], "BOOL"), MLP, 400, ["datatype must be one of"]),
        (v2([1, 2], [0, 0], 32), MLP, 400, ["datatype must be one of", "32"]),
        (v2("1,2", [0, 0]), MLP, 400, ["shape must be a list of non-negative integers"]),
        (v2([1, -2], [0, 0]), MLP, 400, ["non-negative integers", "[1, -2]"]),
        (v2([True, 2], [0, 0]), MLP, 400, ["non-negative integers"]),
        (v2([], [0, 0]), MLP, 400, ["non-negative integers"]),
        (v2([1, 10], [0.0] * 10), MNIST, 400, ["[N, 784], [N, 28, 28] or [N, 1, 28, 28]", "[1, 10]"]),
        (v2([784], [0.0] * 784), MNIST, 400, ["[N, 784]", "got [784]"]),
        (v2([2], [0.0, 0.0]), REG10, 400, ["must be [N, 10]", "got [2]"]),
        (v2([0, 2], []), MLP, 400, ["N = 0"]),
        (v2([MAX_SAMPLES + 1, 2], [0.0] * 2), MLP, 413, ["too many samples"]),
        (v2([2, 2], [0.0] * 3), MLP, 400, ["shape [2, 2] holds 4 values but data has 3"]),
        (v2([2, 2], [[0.0, 0.0, 0.0, 0.0]]), MLP, 400, ["nested with shape [1, 4]", "[2, 2]"]),
        (v2([1, 2], [0.5, 1], "INT32"), MLP, 400, ["INT32 needs integer values"]),
        (v2([1, 784], [256] * 784, "UINT8"), MNIST, 400, ["UINT8 allows values in [0, 255]", "256"]),
        (v2([1, 2], [-1, 0], "UINT16"), MLP, 400, ["UINT16 allows values in [0, 65535]"]),
        (v2([1, 2], [0.0, "a"]), MLP, 400, ["inputs[0].data[1] must be a number"]),
        (v2([1, 2], [0.0, float("inf")]), MLP, 400, ["inputs[0].data[1] is inf"]),
        (v2([1, 784], [255.0] * 784), MNIST, 400, ["intensities in [0, 1]", "divide by 255"]),
    ],
)
def test_bad_v2_requests_are_refused_with_a_clear_message(body, spec, status, fragments):
    err = error_of(body, spec)
    assert err.status == status
    for fragment in fragments:
        assert fragment in err.message
