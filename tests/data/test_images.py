"""Decoding catalog images: RGB, upright, shorter side resized; unusable bytes get a reason."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import pytest
from PIL import Image

from sslpipe.data.images import UnusableImageError, decode_resized, encode_jpeg, resize_shorter_side


def encoded(mode: str, size: tuple[int, int], color: Any, fmt: str, **save_args: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` (1 bit gray) without the pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def reason_of(data: bytes, size: int = 32) -> str:
    with pytest.raises(UnusableImageError) as err:
        decode_resized(data, size)
    assert str(err.value).startswith(f"{err.value.reason}: ")
    return err.value.reason


def test_zero_bytes_are_an_empty_file() -> None:
    assert reason_of(b"") == "empty_file"


@pytest.mark.parametrize(
    "data", [b"hello, this is a text file\n", b"%PDF-1.7\n...", b"\xff\xd8\xff"]
)
def test_bytes_of_no_image_format_are_not_an_image(data: bytes) -> None:
    assert reason_of(data) == "not_an_image"


def test_a_truncated_jpeg_is_a_corrupt_image() -> None:
    data = encoded("RGB", (400, 300), (10, 200, 30), "JPEG")
    assert reason_of(data[: len(data) // 2]) == "corrupt_image"


def test_a_png_with_missing_pixel_data_is_a_corrupt_image() -> None:
    assert reason_of(png_header(64, 64)) == "corrupt_image"


@pytest.mark.parametrize("side", [9_000, 20_000])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit_is_too_large_before_it_is_decoded(side: int) -> None:
    # 81 and 400 megapixels: both above the 64 MP limit (PIL by itself only warns below 2x).
    assert reason_of(png_header(side, side)) == "too_large"


@pytest.mark.parametrize(
    ("mode", "color", "fmt"),
    [
        ("RGB", (200, 40, 10), "JPEG"),
        ("L", 128, "JPEG"),
        ("CMYK", (0, 200, 200, 0), "JPEG"),
        ("RGBA", (200, 40, 10, 128), "PNG"),
        ("LA", (90, 255), "PNG"),
        ("P", 3, "PNG"),
        ("1", 1, "PNG"),
        ("I;16", 300, "PNG"),
        ("RGB", (200, 40, 10), "WEBP"),
        ("RGB", (200, 40, 10), "BMP"),
        ("RGB", (200, 40, 10), "GIF"),
    ],
)
def test_every_mode_becomes_rgb_with_the_shorter_side_resized(
    mode: str, color: Any, fmt: str
) -> None:
    image = decode_resized(encoded(mode, (120, 90), color, fmt), 36)
    assert image.mode == "RGB"
    assert image.size == (48, 36)


def test_grayscale_becomes_gray_rgb() -> None:
    r, g, b = decode_resized(encoded("L", (40, 40), 128, "PNG"), 20).getpixel((10, 10))
    assert r == g == b == 128


@pytest.mark.parametrize(
    ("size", "target", "expected"),
    [
        ((400, 300), 72, (96, 72)),
        ((300, 400), 72, (72, 96)),
        ((100, 100), 72, (72, 72)),
        ((20, 10), 72, (144, 72)),  # small images are enlarged
        ((3000, 2000), 64, (96, 64)),  # large JPEGs go through draft mode
        ((1001, 7), 8, (1144, 8)),
    ],
)
def test_the_shorter_side_equals_the_requested_size(
    size: tuple[int, int], target: int, expected: tuple[int, int]
) -> None:
    image = decode_resized(encoded("RGB", size, (30, 60, 90), "JPEG"), target)
    assert image.size == expected


def test_an_exif_rotated_photo_is_turned_upright() -> None:
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 30, 30))  # left half blue, right half red
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = decode_resized(buffer.getvalue(), 30)
    assert upright.size == (30, 60)  # portrait after rotation
    top, bottom = upright.getpixel((15, 5)), upright.getpixel((15, 55))
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top
    assert bottom[0] > 200 and bottom[2] < 60


def test_resize_keeps_an_image_that_already_has_the_size() -> None:
    image = Image.new("RGB", (72, 100))
    assert resize_shorter_side(image, 72) is image


def test_encode_jpeg_round_trips_through_decode() -> None:
    image = decode_resized(encode_jpeg(Image.new("RGB", (50, 40), (0, 128, 255))), 20)
    assert image.size == (25, 20)
    r, g, b = image.getpixel((10, 10))
    assert r < 20 and abs(g - 128) < 10 and b > 235
