"""Turning whatever a caller passes as an image into a safe RGB PIL image, or a clear error.

Accepted: PIL images, file paths, raw bytes, NumPy arrays and torch tensors (H x W, H x W x C or C x H x W
with 1, 3 or 4 channels). One rule reads the values of every PIL mode and array dtype (`to_uint8`, the
table in docs/reliability.md): integers by their bit depth (8-bit as 0-255, 16-bit / 257, 32-bit only
when the values fit 16 bits), floats in [0, 1] times 255 and floats in (1, 255] as 0-255 (PIL's mode F),
booleans as black and white; anything else is refused, never clipped. Then: transparency composited on
white, palettes and other colour spaces through PIL's conversion to RGB, animated images' first frame,
EXIF orientation applied. Refused with `InvalidImageError` (a `ValueError`): corrupt or truncated bytes,
files that are not images, empty (0-pixel) images, values outside the rule, aspect ratios over the
backbone's 200:1, and images over the pixel limit – checked from the header, before decoding.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 8192 * 8192
MAX_ASPECT_RATIO = 200  # Qwen2-VL's image processor refuses more


class InvalidImageError(ValueError):
    """An image input that cannot be used, with what was wrong and what to do."""


def _check_size(width: int, height: int, max_pixels: int, what: str) -> None:
    if width < 1 or height < 1:
        raise InvalidImageError(f"{what} is empty ({width}x{height} pixels); pass an image with at least one pixel")
    if width * height > max_pixels:
        raise InvalidImageError(
            f"{what} has {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(a decompression-bomb guard); resize it first or raise max_pixels"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidImageError(
            f"{what} is {width}x{height}: an aspect ratio over {MAX_ASPECT_RATIO}:1, which Qwen-VL backbones cannot "
            "process; crop or pad it"
        )


UNPREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}  # PIL's premultiplied-alpha modes -> their straight-alpha forms
TO_CAST = "cast it, e.g. array.astype(np.uint8) for values 0-255 or np.uint16 for 0-65535"


def to_uint8(values: np.ndarray, what: str = "the image") -> np.ndarray:
    """Image values of any dtype -> uint8 by one rule (docs/reliability.md), same shape.

    bool: 0 / 255. uint8: as it is. uint16: / 257. int32 / uint32 (PIL's mode I): / 257 when every value is
    in [0, 65535]. Floats: finite; in [0, 1] times 255, else in [0, 255] as they are (PIL's mode F), rounded.
    Raises `InvalidImageError` for anything else (negative or too large values, NaN/inf, other dtypes).
    """
    kind, bits = values.dtype.kind, values.dtype.itemsize * 8
    if kind == "b":
        return values.astype(np.uint8) * 255
    if kind == "u" and bits == 8:
        return values
    if kind == "f":
        if not np.isfinite(values).all():
            raise InvalidImageError(f"{what} contains NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low >= 0 and high <= 255:
            return np.round(values.astype(np.float64) * (255 if high <= 1 else 1)).astype(np.uint8)
        raise InvalidImageError(
            f"{what} is floating point with values in [{low:.3g}, {high:.3g}]; expected [0, 1] (scaled by 255) or "
            "[0, 255]; rescale it"
        )
    if (kind == "u" and bits == 16) or (kind in "iu" and bits == 32):
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise InvalidImageError(
                f"{what} has {values.dtype} values in [{low}, {high}]; {bits}-bit integers are read as 16-bit "
                f"values (0-65535, divided by 257); {TO_CAST}"
            )
        return np.round(values.astype(np.float64) / 257).astype(np.uint8)
    raise InvalidImageError(
        f"{what} has dtype {values.dtype}; expected uint8, uint16, 32-bit integers holding 0-65535, bool, or floats "
        f"in [0, 1] or [0, 255]; {TO_CAST}"
    )


def _normalise(image: Image.Image, what: str) -> Image.Image:
    """First frame, EXIF orientation applied, as 8-bit RGB (transparency composited on white)."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = Image.fromarray(to_uint8(np.asarray(image), what))
    if image.mode in UNPREMULTIPLIED:
        image = image.convert(UNPREMULTIPLIED[image.mode])
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise InvalidImageError(
            f"{what} is in PIL mode {image.mode}, which PIL cannot convert to RGB ({error})"
        ) from None


def _from_file(source, max_pixels: int, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(source)  # reads the header only
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as error:
        raise InvalidImageError(f"{what} is over PIL's decompression-bomb limit: {error}") from None
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for non-images
        raise InvalidImageError(
            f"{what} is not an image this library can read ({type(error).__name__}: {error})"
        ) from None
    with opened:
        _check_size(*opened.size, max_pixels, what)
        try:
            opened.load()
            return _normalise(opened, what)
        except InvalidImageError:
            raise
        except Exception as error:
            raise InvalidImageError(f"{what} is corrupt or truncated ({type(error).__name__}: {error})") from None


def _from_array(array, max_pixels: int, what: str) -> Image.Image:
    if torch.is_tensor(array):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        array = array.numpy()
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.transpose(array, (1, 2, 0))  # C x H x W -> H x W x C
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InvalidImageError(
            f"{what} has shape {array.shape}; expected H x W, H x W x C or C x H x W with 1, 3 or 4 channels"
        )
    height, width = array.shape[:2]
    _check_size(width, height, max_pixels, what)
    return _normalise(Image.fromarray(to_uint8(array, what)), what)


def load_image(image, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "the image") -> Image.Image:
    """Any accepted image input -> an RGB PIL image (see the module docstring)."""
    if isinstance(image, Image.Image):
        _check_size(*image.size, max_pixels, what)
        return _normalise(image, what)
    if isinstance(image, (str, os.PathLike)):
        if not os.path.exists(image):
            raise FileNotFoundError(f"{what}: {image} does not exist")
        if os.path.isdir(image):
            raise InvalidImageError(f"{what}: {image} is a folder, not an image file")
        return _from_file(str(image), max_pixels, f"{what} ({image})")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _from_file(io.BytesIO(bytes(image)), max_pixels, what)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return _from_array(image, max_pixels, what)
    raise InvalidImageError(f"{what} is a {type(image).__name__}; pass a PIL image, a file path, bytes, or an array")
