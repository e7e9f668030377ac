"""Decoding and resizing of catalog images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sslpipe.core.io import write_atomically

# Refuse decompression bombs loudly instead of letting PIL only warn about them.
Image.MAX_IMAGE_PIXELS = 64_000_000
# Modes whose samples are wider than 8 bits (16-bit PNG and TIFF grayscale).
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# What transparent pixels become: product photos are shown on white.
_BACKGROUND = (255, 255, 255, 255)


class UnusableImageError(ValueError):
    """The bytes are not an image this pipeline can use; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode_resized(data: bytes, shorter_side: int) -> Image.Image:
    """Decode image bytes to RGB with the shorter side resized to ``shorter_side`` px.

    JPEGs are decoded in draft mode at the smallest DCT scale that still covers the target
    size, which skips most of the decoding work for large photos.
    """
    if not data:
        raise UnusableImageError("empty_file", "the blob has zero bytes")
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        # PIL itself raises only above twice MAX_IMAGE_PIXELS and merely warns in between.
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and image.size[0] * image.size[1] > limit:
            width, height = image.size
            raise UnusableImageError("too_large", f"{width}x{height} pixels, over {limit}")
        if image.format == "JPEG":
            scale = shorter_side / min(image.size)
            image.draft(
                "RGB", (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
            )
        image = to_rgb(ImageOps.exif_transpose(image))
    except UnusableImageError:
        raise
    except Image.DecompressionBombError as err:
        raise UnusableImageError("too_large", str(err)) from None
    except UnidentifiedImageError:
        raise UnusableImageError("not_an_image", "the bytes are not a known image format") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UnusableImageError("corrupt_image", str(err)) from None
    return resize_shorter_side(image, shorter_side)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: 16-bit samples scaled down (PIL's own conversion clips every
    value above 255 to white), transparent pixels composited on white (rather than showing
    whatever colour they hide), every other mode converted by PIL (CMYK, palette, gray)."""
    if image.mode in _WIDE_MODES:
        pixels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(pixels.astype(np.uint8))  # 2-D uint8: mode L
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _BACKGROUND), rgba).convert("RGB")
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if target == image.size:
        return image
    return image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)


def encode_jpeg(image: Image.Image, *, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_resized(data: bytes, target: Path, shorter_side: int) -> tuple[int, int]:
    """Decode ``data``, resize its shorter side to ``shorter_side`` and write it to ``target``
    as a JPEG (atomically); returns the written image's (width, height).

    Raises:
        UnusableImageError: the bytes are not a usable image.
    """
    image = decode_resized(data, shorter_side)
    write_atomically(target, encode_jpeg(image))
    return image.size
