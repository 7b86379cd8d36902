"""Native inputs, images and number arrays → float32 samples; shared by every handler (no TorchServe import).

handlers/protocols.py reads each request, tells its protocol apart and calls this module for the native
forms (``decode_native``), image files (``decode_image_bytes``) and arrays of numbers (``numeric_array``,
``finish``). Accepted native inputs:

* Image models (``spec.image_size`` set, e.g. mnistnet): ``{"data": X}`` or a bare JSON array X, where X is
  one 28x28 image, one flat 784-vector, or a list of N of either (also ``[N, 1, 28, 28]``). Values are
  pixel intensities in [0, 1] (white digit on black, as in MNIST). Or a PNG/JPEG file as the raw body or
  as multipart field ``data``: decoded to grayscale, transparent pixels composited on black, padded to a
  square with black and resized to 28x28 with a Lanczos filter. Images are NOT auto-inverted.
* Tabular models (input width W): ``{"data": rows}`` or bare ``rows``, with one row of W numbers or a list
  of N rows. For W == 1 a flat list of N numbers means N rows and a bare number means one row.

Every accepted input becomes a float32 array of shape ``(N, *spec.input_shape)``, normalised exactly as
training does (``(x - mean) / std`` in float32 when ``spec.normalize`` is set). Anything else raises
:class:`InputError` with a message naming what was wrong.
"""
from __future__ import annotations

import io
from itertools import chain
from typing import Any

import numpy as np
from PIL import Image

from handlers.jsoncodec import NumberList
from wire.values import fmt_shape, is_int, what

MAX_SAMPLES = 1024  # samples per request; more → 413 (split the request)
MAX_IMAGE_SIDE = 4096  # an uploaded image may declare at most 4096 x 4096 pixels (checked before decoding)
PIXEL_TOLERANCE = 0.01  # intensities in [-0.01, 1.01] are accepted and clipped to [0, 1]
MAX_DEPTH = 5  # nested list depth; the deepest valid input, [N][1][28][28], has depth 4

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# Other image formats, recognised only to say clearly that they are not accepted.
OTHER_IMAGE_MAGIC = {b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


class InputError(ValueError):
    """A request input the service refuses; ``status`` is the HTTP code (400 default, 413 oversize)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


# ------------------------------------------------------------------------------------------- formats


def is_image(raw: bytes) -> bool:
    """True when ``raw`` starts like a PNG or JPEG file (the image formats accepted)."""
    return raw.startswith(PNG_MAGIC) or raw.startswith(JPEG_MAGIC)


def other_image_format(raw: bytes) -> str | None:
    """The name of an image format that is NOT accepted (GIF, BMP, TIFF, WebP) when ``raw`` starts like one."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in OTHER_IMAGE_MAGIC.items() if raw.startswith(magic)), None)


# ------------------------------------------------------------------------------------ native requests


def decode_native(body: Any, spec) -> tuple[np.ndarray, bool]:
    """Decode a native body (a parsed JSON value, or PNG/JPEG bytes) into ``(samples, is_list)``; see module doc."""
    if isinstance(body, bytes):
        if not spec.is_image_model:
            raise InputError(f"model {spec.name!r} takes rows of numbers as JSON, not an image")
        pixels = decode_image_bytes(body, spec.image_size)
        return finish(pixels.reshape(1, -1), spec), False
    if isinstance(body, dict):
        if "data" not in body:
            keys = ", ".join(repr(k) for k in sorted(map(str, body))) or "none"
            raise InputError(
                "expected key 'data' (or 'inputs' for an Open Inference Protocol v2 request); "
                f"got keys: {keys}"
            )
        body = body["data"]
    if not isinstance(body, (list, int, float)) or isinstance(body, bool):
        raise InputError(f"'data' must be an array of numbers; got {what(body)}")
    values = numeric_array(body, "data")
    if spec.is_image_model:
        samples, is_list = _image_rows(values, spec.image_size)
    else:
        samples, is_list = _tabular_rows(values, spec.input_width)
    check_count(len(samples))
    return finish(samples, spec), is_list


def _image_rows(values: np.ndarray, image_size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    h, w = image_size
    width, shape = h * w, values.shape
    if shape in ((h, w), (width,)):
        return values.reshape(1, width), False
    if shape[1:] in ((width,), (h, w), (1, h, w)):
        return values.reshape(shape[0], width), True
    raise InputError(
        f"expected one {h}x{w} image, a flat {width}-vector, or a list of N of either; got {_describe(shape)}"
    )


def _tabular_rows(values: np.ndarray, width: int) -> tuple[np.ndarray, bool]:
    shape = values.shape
    if shape == (width,):
        return values.reshape(1, width), False
    if len(shape) == 2 and shape[1] == width:
        return values, True
    if width == 1 and len(shape) <= 1:  # a bare number is one row, a flat list is N rows
        return values.reshape(-1, 1), len(shape) == 1
    raise InputError(f"expected rows of {width} value(s) (one row or a list of rows); got {_describe(shape)}")


# ------------------------------------------------------------------------------------------- images


def decode_image_bytes(data: bytes, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    """Decode PNG/JPEG bytes to a float64 ``size`` (height, width) array of intensities in [0, 1].

    Grayscale conversion with transparency composited on black; non-square images are padded to a
    square with black (keeps the aspect ratio) and resized with Lanczos. Images wider or taller than
    MAX_IMAGE_SIDE are refused with 413 from their header, before any pixel is decoded; truncated or
    corrupt files raise InputError (400).
    """
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
    except Image.DecompressionBombError as err:
        raise InputError(f"image refused as a decompression bomb: {err}", status=413) from None
    except Image.UnidentifiedImageError:
        raise InputError("body starts like a PNG/JPEG file but is not a readable image") from None
    except Exception as err:  # Pillow signals unreadable headers with many exception types
        raise InputError(f"could not read the image: {err}") from None
    width, height = image.size
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise InputError(
            f"image is {width}x{height} pixels; at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} is accepted",
            status=413,
        )
    if image.format == "JPEG":
        image.draft(image.mode, _working_size(image.size, size))  # libjpeg decodes at 1/2..1/8 scale
    try:
        image.load()
        gray = _grayscale(_shrink(image, size))
    except Image.DecompressionBombError as err:
        raise InputError(f"image refused as a decompression bomb: {err}", status=413) from None
    except Exception as err:  # truncated data, bad CRC, broken chunks, ...
        raise InputError(f"could not decode the {image.format} image (truncated or corrupt?): {err}") from None
    return _fit(gray, size)


def _working_size(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Smallest (width, height) worth keeping before the final resize: 4x the target side."""
    side = 4 * max(size)
    return side, side


def _shrink(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Box-reduce a large image by an integer factor so it stays >= 4x the target side.

    Why: a small PNG may declare 4096x4096 pixels; converting and Lanczos-resizing all of them in
    float costs a worker over a second, while an integer box reduction in C costs milliseconds and
    changes nothing a 28x28 resize could still see.
    """
    factor = max(image.size) // (4 * max(size))
    if factor < 2:
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # reduce() takes 32-bit "I" but not the 16-bit PNG modes
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):
        image = image.convert("RGBA")  # palette and other modes: reduce() does not take them
    return image.reduce(factor)


def _grayscale(image: Image.Image) -> np.ndarray:
    """Intensities in [0, 1]; 16-bit images are scaled by 65535 (Pillow's own L conversion would clip)."""
    if image.mode.startswith("I"):
        return np.clip(np.asarray(image, dtype=np.float64) / 65535.0, 0.0, 1.0)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def _fit(gray: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pad to a square with black, then resize to ``size`` (height, width) with Lanczos."""
    if gray.shape == tuple(size):
        return gray
    h, w = gray.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.zeros((side, side), dtype=np.float32)
    square[top : top + h, left : left + w] = gray
    resized = Image.fromarray(square, mode="F").resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)  # Lanczos overshoots slightly


# ------------------------------------------------------------------------------------ numeric arrays


def numeric_array(value: Any, where: str = "data") -> np.ndarray:
    """A float64 array from a JSON number or rectangular nested list of numbers.

    Refuses (InputError naming the position) strings, booleans, nulls, objects, empty or ragged lists,
    nesting deeper than MAX_DEPTH, NaN, +-inf and numbers too large for float64.
    """
    if type(value) is NumberList:  # numbers only: one conversion; numpy refuses a ragged list
        try:
            array = np.array(value, dtype=np.float64)
        except (ValueError, OverflowError):
            array = None  # the general path below names what is wrong
        if array is not None and 0 < array.ndim <= MAX_DEPTH and array.size and np.all(np.isfinite(array)):
            return array
    regular = _regular_numbers(value)
    if regular is None:  # not a plain rectangular list of numbers: find and name the offending spot
        _nested_shape(value, where, 0)
    try:
        array = np.array(value, dtype=np.float64) if regular is None else \
            np.array(regular[1], dtype=np.float64).reshape(regular[0])
    except OverflowError:
        raise InputError(f"{where} holds an integer too large for a float") from None
    if not np.all(np.isfinite(array)):
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        at = where + "".join(f"[{i}]" for i in index)
        raise InputError(f"{at} is {array[index]}; NaN and infinite values are not allowed")
    return array


def _regular_numbers(value: Any) -> tuple[tuple[int, ...], list] | None:
    """``(shape, flat values)`` of a rectangular nested list of ints/floats, one level at a time; None for
    anything else (then :func:`_nested_shape` says what is wrong). The served fast path: no per-row calls."""
    shape: list[int] = []
    level = [value]
    while True:
        types = set(map(type, level))
        if types <= _NUMBER_TYPES:
            return tuple(shape), level
        if types != {list} or len(shape) == MAX_DEPTH:
            return None
        lengths = set(map(len, level))
        if len(lengths) != 1 or 0 in lengths:
            return None
        shape.append(lengths.pop())
        level = list(chain.from_iterable(level))


def _nested_shape(value: Any, where: str, depth: int) -> tuple[int, ...]:
    """Shape of a rectangular nested list of numbers; raises InputError at the first offending spot."""
    if not isinstance(value, list):
        _check_number(value, where)
        return ()
    if depth >= MAX_DEPTH:
        raise InputError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels of lists)")
    if not value:
        raise InputError(f"{where} is an empty list")
    if not isinstance(value[0], list):  # a flat list of numbers
        if set(map(type, value)) <= _NUMBER_TYPES:  # fast path (bool is its own type, not int)
            return (len(value),)
        for i, item in enumerate(value):
            if isinstance(item, list):
                raise InputError(f"{where} is ragged: {where}[{i}] is a list but {where}[0] is a number")
            _check_number(item, f"{where}[{i}]")
        return (len(value),)
    first = _nested_shape(value[0], f"{where}[0]", depth + 1)
    for i in range(1, len(value)):
        item = value[i]
        if not isinstance(item, list):
            _check_number(item, f"{where}[{i}]")
            raise InputError(f"{where} is ragged: {where}[{i}] is a number but {where}[0] is a list")
        shape = _nested_shape(item, f"{where}[{i}]", depth + 1)
        if shape != first:
            raise InputError(
                f"{where} is ragged: {where}[{i}] has shape {fmt_shape(shape)} "
                f"but {where}[0] has shape {fmt_shape(first)}"
            )
    return (len(value),) + first


_NUMBER_TYPES = {int, float}


def _check_number(value: Any, where: str) -> None:
    if not (is_int(value) or isinstance(value, float)):
        raise InputError(f"{where} must be a number; got {what(value)}")


# ---------------------------------------------------------------------------------------- finishing


def finish(samples: np.ndarray, spec, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Range-check image intensities, normalise like training, cast to float32 ``(N, *input_shape)``.

    ``samples`` may be a read-only view of the request's bytes: it is never written to. The result is one new
    float32 array: the cast and the subtraction of the mean are one pass (``np.subtract`` into float32 casts
    first, so the values are those of ``astype(float32)`` then ``-= mean``), the division a second, in place.
    ``bounds``: ``(min, max)`` of ``samples`` when the caller has computed them already."""
    if spec.is_image_model:
        x = _float32(_check_intensities(samples, bounds), spec.normalize)  # within [0, 1]: no float32 overflow
    else:
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            x = samples.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise InputError("data holds a value outside the float32 range (about +-3.4e38)")
        if spec.normalize is not None:  # in place: x is astype's own copy
            mean, std = spec.normalize
            x -= np.float32(mean)
            x /= np.float32(std)
    return x.reshape((len(x),) + tuple(spec.input_shape))


def _float32(samples: np.ndarray, normalize: tuple[float, float] | None) -> np.ndarray:
    """A new float32 array of ``samples``, normalised ``(x - mean) / std`` in float32 when ``normalize`` is set."""
    if normalize is None:
        return samples.astype(np.float32)
    mean, std = normalize
    x = np.subtract(samples, np.float32(mean), dtype=np.float32)
    x /= np.float32(std)
    return x


def _check_intensities(pixels: np.ndarray, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """``pixels`` clipped to [0, 1]; InputError unless all lie within PIXEL_TOLERANCE of it (NaN never does)."""
    lo, hi = bounds if bounds is not None else (float(pixels.min()), float(pixels.max()))
    if not (lo >= -PIXEL_TOLERANCE and hi <= 1 + PIXEL_TOLERANCE):
        hint = ""
        if hi > 1 + PIXEL_TOLERANCE and hi <= 255 and lo >= -PIXEL_TOLERANCE:
            hint = " (these look like 0-255 pixel values: divide by 255)"
        raise InputError(f"pixel values must be intensities in [0, 1]; got values in [{lo:g}, {hi:g}]{hint}")
    return pixels if lo >= 0.0 and hi <= 1.0 else np.clip(pixels, 0.0, 1.0)


def check_count(n: int) -> None:
    """InputError (413) when a request carries more than MAX_SAMPLES samples."""
    if n > MAX_SAMPLES:
        raise InputError(f"too many samples: {n} > {MAX_SAMPLES} per request; split the request", status=413)


def _describe(shape: tuple[int, ...]) -> str:
    if len(shape) == 0:
        return "a single number"
    if len(shape) == 1:
        return f"one row of {shape[0]} values"
    if len(shape) == 2:
        return f"{shape[0]} row{'s' if shape[0] != 1 else ''} of {shape[1]} values"
    return f"an array of shape {fmt_shape(shape)}"
