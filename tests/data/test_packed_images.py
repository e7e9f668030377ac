"""The packed image array: a faithful, checked cache of data_prep's JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslpipe.data.packed_images import PACKED_DIR, PackedImages, open_packed, write_packed


def _folder(root: Path, sizes: list[tuple[int, int]]) -> list[str]:
    """JPEGs of the given (width, height) under ``root/images``; their relative paths."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = f"images/{i}.jpeg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / path)
        paths.append(path)
    return paths


def test_every_image_is_stored_in_manifest_order_with_its_own_size(tmp_path: Path) -> None:
    paths = _folder(tmp_path, [(40, 30), (30, 40), (17, 17)])
    write_packed(tmp_path, paths)
    packed = open_packed(tmp_path, paths)
    assert isinstance(packed, PackedImages) and len(packed) == 3
    for i, path in enumerate(paths):
        with Image.open(tmp_path / path) as image:
            np.testing.assert_array_equal(packed.image(i), np.asarray(image.convert("RGB")))
    assert packed.nbytes == (40 * 30 + 30 * 40 + 17 * 17) * 3  # no padding


def test_an_image_changed_after_packing_makes_the_array_unusable(tmp_path: Path) -> None:
    paths = _folder(tmp_path, [(20, 20), (20, 20)])
    write_packed(tmp_path, paths)
    Image.new("RGB", (20, 20), "red").save(tmp_path / paths[1])
    reason = open_packed(tmp_path, paths)
    assert isinstance(reason, str) and "other images than the manifest" in reason


def test_another_image_list_or_order_makes_the_array_unusable(tmp_path: Path) -> None:
    paths = _folder(tmp_path, [(20, 20), (24, 20), (20, 24)])
    write_packed(tmp_path, paths)
    assert isinstance(open_packed(tmp_path, paths[:2]), str)
    assert isinstance(open_packed(tmp_path, list(reversed(paths))), str)


def test_missing_or_truncated_arrays_say_why(tmp_path: Path) -> None:
    paths = _folder(tmp_path, [(20, 20)])
    assert "has no packed images" in str(open_packed(tmp_path, paths))
    write_packed(tmp_path, paths)
    pixels = tmp_path / PACKED_DIR / "pixels.u8"
    pixels.write_bytes(pixels.read_bytes()[:-3])
    assert "does not have the" in str(open_packed(tmp_path, paths))


def test_an_unreadable_image_fails_the_packing_with_its_path(tmp_path: Path) -> None:
    paths = _folder(tmp_path, [(20, 20)])
    (tmp_path / paths[0]).write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"0\.jpeg"):
        write_packed(tmp_path, paths)
