"""Bad images through the real data_prep step (issue 7, item 1).

A catalog holding every kind of bad image (zero bytes, a truncated JPEG, text named .jpg, CMYK,
grayscale, 16-bit PNG, PNG with alpha, an EXIF-rotated JPEG, decompression bombs in PNG and
JPEG, an id that ids.csv repeats) goes through ``run_data_prep`` from the local folder store and
from Azurite. Each image is either converted (checked pixel by pixel: colour, gray level,
16-bit depth, transparency, orientation) or skipped and counted with its reason in
``skipped.csv`` and ``stats.json``; the component entry point succeeds under
``max_skipped_fraction`` and fails over it with exit code 1 and the list.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import resource
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from azure.storage.blob import BlobServiceClient
from PIL import Image

from sslpipe.steps.data_prep import run_data_prep
from sslpipe.stores.azure_blob import CONNECTION_STRING_ENV, AzureBlobStore
from sslpipe.stores.base import BlobStore
from sslpipe.stores.local_blob import LocalFolderBlobStore

REPO = Path(__file__).resolve().parents[2]
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encoded(image: Image.Image, fmt: str, **save_args: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A 100-byte PNG that declares ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + idat + png_chunk(b"IEND", b"")


def jpeg_bomb(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to declare the given size."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), RED), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png16_gray(value: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A 16-bit grayscale PNG of one ``value`` (0 to 65535)."""
    return encoded(Image.fromarray(np.full(size[::-1], value, dtype=np.uint16)), "PNG")


def png16_rgb(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG of one colour, written by hand (PIL cannot)."""
    width, height = size
    row = b"\0" + struct.pack(">HHH", *rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(row * height))
        + png_chunk(b"IEND", b"")
    )


def half_transparent_png() -> bytes:
    """Left half fully transparent (over black, as many exporters leave it), right half red."""
    image = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    image.paste((*RED, 255), (20, 0, 40, 30))
    return encoded(image, "PNG")


def exif_rotated_jpeg() -> bytes:
    """60x30 stored, left half blue and right half red, EXIF orientation 6 (turn 90° clockwise
    to display): upright it is 30x60 with blue on top."""
    image = Image.new("RGB", (60, 30), RED)
    image.paste(BLUE, (0, 0, 30, 30))
    exif = image.getexif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", exif=exif.tobytes(), quality=95)


GOOD = [f"good{i}.jpeg" for i in range(6)]
# Converted: each comes out RGB with the shorter side 24.
HANDLED = ["cmyk.jpeg", "gray.jpeg", "deep.png", "deep-rgb.png", "alpha.png", "rotated.jpeg"]
# Skipped, with the reason each must be counted under.
SKIPPED = {
    "zero.jpeg": "empty_file",
    "truncated.jpeg": "corrupt_image",
    "text.jpg": "not_an_image",
    "bomb.png": "too_large",
    "bomb.jpeg": "too_large",
}


def bad_blobs() -> dict[str, bytes]:
    full = encoded(Image.new("RGB", (400, 300), (10, 200, 30)), "JPEG")
    blobs = {name: encoded(Image.new("RGB", (40, 30), (20 * i, 90, 60)), "JPEG")
             for i, name in enumerate(GOOD)}  # fmt: skip
    blobs |= {
        "cmyk.jpeg": encoded(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95),
        "gray.jpeg": encoded(Image.new("L", (40, 30), 128), "JPEG", quality=95),
        "deep.png": png16_gray(32768),  # mid-gray in 16 bits
        "deep-rgb.png": png16_rgb((65535, 32768, 0)),
        "alpha.png": half_transparent_png(),
        "rotated.jpeg": exif_rotated_jpeg(),
        "zero.jpeg": b"",
        "truncated.jpeg": full[: len(full) // 2],
        "text.jpg": b"id,label\nnot,an image\n",
        "bomb.png": png_bomb(60_000, 60_000),  # 3.6 gigapixels: 10.8 GB decoded
        "bomb.jpeg": jpeg_bomb(65_000, 65_000),
    }
    return blobs


def ids_rows() -> list[tuple[str, str]]:
    """(id, blob_path): every blob by its name, and good0's id once more for another blob."""
    rows = [(name, name) for name in [*GOOD, *HANDLED, *SKIPPED]]
    return [*rows, ("good0.jpeg", "good1.jpeg")]


def write_ids(folder: Path, rows: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=["id", "blob_path"])
    frame["label"] = "x"
    frame.to_csv(folder / "ids.csv", index=False)
    return folder


class Container:
    """A blob container (local folder or Azurite) with its URI."""

    def __init__(self, uri: str, open_store: Callable[[], BlobStore]) -> None:
        self.uri, self.open_store = uri, open_store

    def put(self, blobs: dict[str, bytes]) -> None:
        async def scenario() -> None:
            store = self.open_store()
            try:
                for name, data in blobs.items():
                    await store.write(name, data)
            finally:
                await store.close()

        asyncio.run(scenario())


def _local(tmp_path: Path, request: pytest.FixtureRequest | None = None) -> Container:
    folder = tmp_path / "blobs"
    return Container(folder.as_uri(), lambda: LocalFolderBlobStore(folder))


def _azure(tmp_path: Path, request: pytest.FixtureRequest) -> Container:
    azurite = request.getfixturevalue("azurite")
    request.getfixturevalue("monkeypatch").setenv(
        CONNECTION_STRING_ENV, azurite["connection_string"]
    )
    name = f"bad-{uuid.uuid4().hex[:16]}"
    uri = f"{azurite['blob_endpoint']}/{name}"
    AzureBlobStore.from_uri(uri, create=True)

    def drop() -> None:
        with BlobServiceClient.from_connection_string(azurite["connection_string"]) as service:
            service.delete_container(name)

    request.addfinalizer(drop)
    return Container(uri, lambda: AzureBlobStore.from_uri(uri))


@pytest.fixture(
    params=[
        pytest.param(_local, id="local-folder"),
        pytest.param(_azure, id="azure-blob", marks=pytest.mark.servers),
    ]
)
def container(request: pytest.FixtureRequest, tmp_path: Path) -> Container:
    made: Container = request.param(tmp_path, request)
    made.put(bad_blobs())
    return made


def pixel(image_path: Path, xy: tuple[int, int]) -> tuple[int, int, int]:
    with Image.open(image_path) as image:
        assert image.mode == "RGB"
        value: tuple[int, int, int] = image.getpixel(xy)  # type: ignore[assignment]
        return value


def near(found: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(found, expected, strict=True))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_each_bad_image_is_converted_or_skipped_with_its_reason(
    container: Container, tmp_path: Path
) -> None:
    ids_dir = write_ids(tmp_path / "ids", ids_rows())
    out = tmp_path / "data"
    stats = run_data_prep(
        ids_dir=ids_dir,
        blob_uri=container.uri,
        output_dir=out,
        image_size=24,
        max_skipped_fraction=0.4,
    )
    expected_skips = {**SKIPPED, "good0.jpeg": "duplicate_id"}
    requested = len(GOOD) + len(HANDLED) + len(SKIPPED) + 1
    assert stats["requested"] == requested == 18
    assert stats["prepared"] == len(GOOD) + len(HANDLED)
    assert stats["skipped"] == {"corrupt_image": 1, "duplicate_id": 1, "empty_file": 1,
                                "not_an_image": 1, "too_large": 2}  # fmt: skip
    assert json.loads((out / "stats.json").read_text()) == stats

    skipped = pd.read_csv(out / "skipped.csv", dtype=str, keep_default_na=False)
    assert dict(zip(skipped["id"], skipped["reason"], strict=True)) == expected_skips
    assert skipped["detail"].str.len().min() > 0
    duplicate = skipped.set_index("id").loc["good0.jpeg", "detail"]
    assert "ids.csv line 19 repeats the id of line 2" in duplicate

    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert sorted(manifest["id"]) == sorted([*GOOD, *HANDLED])  # good0 once, from its first row
    rows = manifest.set_index("id")
    assert rows.loc["good0.jpeg", "blob_path"] == "good0.jpeg"
    for name in SKIPPED:
        assert not (out / "images" / name).exists()
    sizes = {i: (int(rows.loc[i, "width"]), int(rows.loc[i, "height"])) for i in rows.index}
    for name in [*GOOD, *HANDLED]:
        with Image.open(out / rows.loc[name, "path"]) as image:
            assert image.mode == "RGB" and image.size == sizes[name], name
    assert sizes["rotated.jpeg"] == (24, 48)  # upright: portrait
    for name in set(HANDLED) - {"rotated.jpeg"}:
        assert sizes[name] == (32, 24), name

    image = {name: out / rows.loc[name, "path"] for name in HANDLED}
    assert near(pixel(image["cmyk.jpeg"], (16, 12)), RED, 20)
    assert near(pixel(image["gray.jpeg"], (16, 12)), (128, 128, 128))
    assert near(pixel(image["deep.png"], (16, 12)), (128, 128, 128))  # not clipped to white
    assert near(pixel(image["deep-rgb.png"], (16, 12)), (255, 128, 0))
    assert near(pixel(image["alpha.png"], (4, 12)), WHITE)  # transparent: on white, not black
    assert near(pixel(image["alpha.png"], (28, 12)), RED)
    assert near(pixel(image["rotated.jpeg"], (12, 4)), BLUE, 40)  # the left half is on top
    assert near(pixel(image["rotated.jpeg"], (12, 43)), RED, 40)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    ("blob", "data"),
    [
        ("bomb.png", png_bomb(60_000, 60_000)),
        ("bomb.jpeg", jpeg_bomb(65_000, 65_000)),
        ("between.png", png_bomb(10_000, 10_000)),  # 100 MP: PIL by itself would only warn
    ],
)
def test_a_decompression_bomb_is_refused_quickly_without_allocating_its_pixels(
    tmp_path: Path, blob: str, data: bytes
) -> None:
    container = _local(tmp_path)
    container.put({blob: data, "good0.jpeg": bad_blobs()["good0.jpeg"]})
    ids_dir = write_ids(tmp_path / "ids", [(blob, blob), ("good0.jpeg", "good0.jpeg")])
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    stats = run_data_prep(
        ids_dir=ids_dir,
        blob_uri=container.uri,
        output_dir=tmp_path / "data",
        image_size=24,
        max_skipped_fraction=0.5,
    )
    assert time.perf_counter() - started < 5
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 100  # decoding would take 300 MB (between.png) to 12 GB
    assert stats["skipped"] == {"too_large": 1}  # not corrupt_image: refused before decoding
    detail = pd.read_csv(tmp_path / "data" / "skipped.csv")["detail"][0]
    assert "pixels" in detail


def run_component(ids_dir: Path, blob_uri: str, out: Path, max_skipped: float) -> Any:
    argv = [sys.executable, "-m", "components.data_prep.main", "--selection", str(ids_dir)]
    argv += ["--blob_uri", blob_uri, "--data", str(out), "--image_size", "24"]
    argv += ["--max_skipped_fraction", str(max_skipped)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_the_component_succeeds_under_the_limit_and_fails_over_it_with_the_list(
    tmp_path: Path,
) -> None:
    container = _local(tmp_path)
    container.put(bad_blobs())
    ids_dir = write_ids(tmp_path / "ids", ids_rows())  # 6 of 18 unusable: 33.3%

    done = run_component(ids_dir, container.uri, tmp_path / "under", 0.34)
    assert done.returncode == 0, done.stderr
    stats = json.loads((tmp_path / "under" / "stats.json").read_text())
    assert (stats["requested"], stats["prepared"], sum(stats["skipped"].values())) == (18, 12, 6)
    assert (tmp_path / "under" / "manifest.csv").is_file()

    done = run_component(ids_dir, container.uri, tmp_path / "over", 0.3)
    assert done.returncode == 1
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, done.stderr
    assert "6 of 18 images (33.3%) could not be used" in error[0]
    assert "data_prep.max_skipped_fraction" in error[0]
    for name, reason in {**SKIPPED, "good0.jpeg": "duplicate_id"}.items():
        assert f"{name}: {reason}" in error[0]
    assert not (tmp_path / "over" / "manifest.csv").exists()  # nothing for a next step to trust
    skipped = pd.read_csv(tmp_path / "over" / "skipped.csv", dtype=str)
    assert len(skipped) == 6
