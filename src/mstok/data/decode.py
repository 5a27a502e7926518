"""Decode an image file to 8-bit RGB: the one decoding path of training, evaluation and shards.

Every reader of images (:class:`~mstok.data.images.ImageFolder`, the shard reader and writer,
``mstok eval``, the demo) goes through :func:`load_rgb`, so a file decodes to the same pixels
everywhere, and a file that cannot be decoded (corrupt, truncated, or too large) raises
:class:`CorruptImageError`, which the datasets turn into a skipped and counted sample.

Modes that PIL's own ``convert("RGB")`` gets wrong are converted here:

* 16-bit grayscale (``I;16``, ``I;16B``, ... as PIL opens 16-bit PNGs) and 32-bit integer
  (``I``) images hold values in [0, 65535]; PIL clips them at 255, which turns almost every
  pixel white. They are scaled by 255 / 65535 instead (then rounded to 8 bits, the precision
  every other image has). Values outside [0, 65535] are refused rather than clipped.
* 32-bit float (``F``) images are taken as [0, 1] when all their values lie there, else as
  16-bit values in [0, 65535]; anything else (negative, larger, NaN) is refused.
* Transparent images (``RGBA``, ``LA``, ``PA``, and palette or grayscale images with a
  transparent colour) are composited on white: dropping alpha would expose whatever colour
  the encoder left under fully transparent pixels.

Decompression bombs: an image of more than ``max_pixels`` pixels (width x height, read from the
header before anything is decoded) is refused with :class:`OversizedImageError`, a
:class:`CorruptImageError`, so it is skipped and counted like any unreadable file. The default,
:data:`DEFAULT_MAX_PIXELS`, is PIL's own warning threshold (about 89.5 megapixels, some
9459 x 9459); training sets it from ``data.max_pixels``, and the API and ``mstok eval`` /
``mstok data to-shards`` (``--max-pixels``) take it as an argument. PIL additionally refuses
images over twice its ``PIL.Image.MAX_IMAGE_PIXELS``; those are skipped too.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Pixel limit (width x height) of one image when no ``max_pixels`` is given.
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS (its warning threshold)

_SIXTEEN_BIT_MAX = 65535.0
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class CorruptImageError(ValueError):
    """An image file that exists but cannot be decoded (or is refused, see :class:`OversizedImageError`)."""


class OversizedImageError(CorruptImageError):
    """An image with more pixels than the configured limit (a possible decompression bomb)."""


def check_max_pixels(max_pixels: int | None) -> int:
    """The pixel limit to apply: ``max_pixels``, or :data:`DEFAULT_MAX_PIXELS` when None."""
    if max_pixels is None:
        return DEFAULT_MAX_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer (width x height), got {max_pixels!r}")
    return max_pixels


def _scaled_to_l(array: np.ndarray) -> Image.Image:
    """An 8-bit grayscale image from values in [0, 1]."""
    return Image.fromarray(np.round(array * 255.0).astype(np.uint8), mode="L")


def _wide_to_rgb(image: Image.Image, path: object) -> Image.Image:
    """RGB from a 16-bit, 32-bit integer or float grayscale image (see the module docstring)."""
    array = np.asarray(image).astype(np.float64)
    mode = image.mode
    if not np.isfinite(array).all():
        raise CorruptImageError(f"cannot decode image {path}: its {mode} pixel values include NaN or infinity")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if mode == "F" and low >= 0.0 and high <= 1.0:
        return _scaled_to_l(array).convert("RGB")
    if low < 0.0 or high > _SIXTEEN_BIT_MAX:
        raise CorruptImageError(
            f"cannot decode image {path}: mode {mode} values span [{low:g}, {high:g}], outside the 16-bit "
            f"range [0, 65535]{' or [0, 1]' if mode == 'F' else ''} this reader knows how to scale"
        )
    return _scaled_to_l(array / _SIXTEEN_BIT_MAX).convert("RGB")


def to_rgb(image: Image.Image, path: object = "image") -> Image.Image:
    """Convert a loaded PIL image of any mode to 8-bit RGB (see the module docstring)."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_to_rgb(image, path)
    if mode in _TRANSPARENT_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path | IO[bytes], max_pixels: int | None = None) -> Image.Image:
    """Decode an image file (or binary file object) to an 8-bit RGB PIL image.

    Args:
        path: the file, or an open binary file object whose ``repr`` names it.
        max_pixels: refuse images with more pixels than this (None: :data:`DEFAULT_MAX_PIXELS`).

    Raises:
        CorruptImageError: the file cannot be decoded; :class:`OversizedImageError` when it is
            over the pixel limit. The message names the file.
    """
    limit = check_max_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            # our own limit decides what is too large; PIL's warning would repeat it once per file
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > limit:
                    raise OversizedImageError(
                        f"cannot decode image {path}: {width}x{height} = {width * height:,} pixels is over the "
                        f"limit of {limit:,} (a possible decompression bomb; raise data.max_pixels or "
                        "--max-pixels to accept it)"
                    )
                image.load()
                return to_rgb(image, path)
    except Image.DecompressionBombError as err:
        raise OversizedImageError(
            f"cannot decode image {path}: {err} (PIL's own limit, PIL.Image.MAX_IMAGE_PIXELS)"
        ) from err
    except CorruptImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        raise CorruptImageError(f"cannot decode image {path}: {err}") from err
