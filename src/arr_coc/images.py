"""Turning whatever a caller passes as an image into a safe RGB PIL image, or a clear error.

Accepted: PIL images, file paths, raw bytes, NumPy arrays and torch tensors (H x W x C or C x H x W,
1/3/4 channels; uint8, or floats in [0, 1]). Unusual but valid inputs are normalised: CMYK, 16-bit,
palette with transparency, LA and RGBA (composited on white), animated images (first frame), EXIF
orientation (applied). Refused with `InvalidImageError` (a `ValueError`): corrupt or truncated bytes,
files that are not images, empty (0-pixel) images, NaN/inf or wrongly typed arrays, aspect ratios over
the backbone's 200:1, and images over the pixel limit – checked from the header, before decoding.
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


def _normalise(image: Image.Image) -> Image.Image:
    """First frame, EXIF orientation applied, as 8-bit RGB (transparency composited on white)."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.nan_to_num(np.asarray(image)) * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


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
            return _normalise(opened)
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
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidImageError(f"{what} contains NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise InvalidImageError(
                f"{what} is floating point with values in [{array.min():.3g}, {array.max():.3g}]; expected [0, 1] (or pass uint8)"
            )
        array = np.round(array * 255).astype(np.uint8)
    else:
        raise InvalidImageError(f"{what} has dtype {array.dtype}; expected uint8, or floats in [0, 1]")
    return _normalise(Image.fromarray(array))


def load_image(image, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "the image") -> Image.Image:
    """Any accepted image input -> an RGB PIL image (see the module docstring)."""
    if isinstance(image, Image.Image):
        _check_size(*image.size, max_pixels, what)
        return _normalise(image)
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
