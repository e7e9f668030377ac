"""The prepared images as one packed ``uint8`` array, so that training need not decode JPEGs.

data_prep writes, beside its resized JPEGs, ``packed/pixels.u8``: every image of the manifest,
in the manifest's order, decoded to RGB and stored row by row (height x width x 3 bytes each,
no padding, so images of any size and aspect fit without waste), and ``packed/index.json``
with each image's offset, height and width and a fingerprint of the JPEGs it was made from.
moco_train maps the array into memory (or copies it to the GPU) and cuts its crops from it in
batches (:mod:`sslpipe.models.moco.batch_crop`).

The array is a cache of the JPEGs, never a source of truth: :func:`open_packed` checks that it
was made from exactly the files the manifest lists now (their paths and contents) and otherwise
says why it cannot be used, so that training falls back to decoding the JPEGs instead of
training on stale pixels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sslpipe.core.io import atomic_path, read_json, write_json

PACKED_DIR = "packed"
PIXELS_FILE = "pixels.u8"
INDEX_FILE = "index.json"
FORMAT = "sslpipe.packed_images/1"


@dataclass(frozen=True)
class PackedImages:
    """``pixels[offsets[i]:offsets[i] + heights[i] * widths[i] * 3]`` is image ``i`` (HWC)."""

    pixels: np.ndarray  # flat uint8, usually a read-only memory map
    offsets: np.ndarray  # int64, one per image
    heights: np.ndarray  # int64
    widths: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` as an (H, W, 3) array."""
        h, w, start = int(self.heights[index]), int(self.widths[index]), int(self.offsets[index])
        return self.pixels[start : start + h * w * 3].reshape(h, w, 3)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_fingerprint(data_dir: Path, paths: Sequence[str], *, threads: int = 8) -> str:
    """A digest of the listed image files, in order: their paths and contents."""
    with ThreadPoolExecutor(threads) as pool:
        digests = list(pool.map(_file_digest, (data_dir / p for p in paths)))
    joined = "\n".join(f"{p}\t{d}" for p, d in zip(paths, digests, strict=True))
    return hashlib.sha256(joined.encode()).hexdigest()


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def write_packed(data_dir: Path, paths: Sequence[str], *, threads: int = 8) -> Path:
    """Decode the listed images (relative to ``data_dir``) into ``data_dir/packed``; returns
    that folder. Both files are written atomically, the index last, so a reader never pairs a
    new array with an old index."""
    folder = data_dir / PACKED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    offsets, heights, widths = [], [], []
    position = 0
    # PIL decodes without holding the GIL, so threads decode in parallel.
    with (
        atomic_path(folder / PIXELS_FILE) as tmp,
        tmp.open("wb") as out,
        ThreadPoolExecutor(threads) as pool,
    ):
        for array in pool.map(_decode, (data_dir / p for p in paths)):
            offsets.append(position)
            heights.append(array.shape[0])
            widths.append(array.shape[1])
            out.write(array.tobytes())
            position += array.nbytes
    write_json(
        folder / INDEX_FILE,
        {
            "format": FORMAT,
            "count": len(paths),
            "nbytes": position,
            "offsets": offsets,
            "heights": heights,
            "widths": widths,
            "source": source_fingerprint(data_dir, paths, threads=threads),
        },
    )
    return folder


def open_packed(data_dir: Path, paths: Sequence[str]) -> PackedImages | str:
    """The packed images of ``paths`` (the manifest's, in order), memory-mapped; or, when
    there are none that match those files now, the reason why."""
    folder = data_dir / PACKED_DIR
    if not (folder / INDEX_FILE).is_file() or not (folder / PIXELS_FILE).is_file():
        return f"{folder} has no packed images (data_prep writes them)"
    index = read_json(folder / INDEX_FILE)
    if index.get("format") != FORMAT:
        return f"{folder / INDEX_FILE} has format {index.get('format')!r}, not {FORMAT!r}"
    if index["count"] != len(paths) or index["source"] != source_fingerprint(data_dir, paths):
        return f"{folder} was made from other images than the manifest lists now"
    if (folder / PIXELS_FILE).stat().st_size != index["nbytes"]:
        return f"{folder / PIXELS_FILE} does not have the {index['nbytes']} bytes its index says"
    pixels = (
        np.memmap(folder / PIXELS_FILE, dtype=np.uint8, mode="r")
        if index["nbytes"]
        else np.zeros(0, np.uint8)
    )
    return PackedImages(
        pixels=pixels,
        offsets=np.asarray(index["offsets"], dtype=np.int64),
        heights=np.asarray(index["heights"], dtype=np.int64),
        widths=np.asarray(index["widths"], dtype=np.int64),
    )


__all__ = ["PACKED_DIR", "PackedImages", "open_packed", "source_fingerprint", "write_packed"]
