"""A demo catalog from scikit-learn's bundled handwritten digits (1,797 real 8x8 images).

Shaped like the seed's product catalog (REFERENCE §2): one JPEG blob per image, one metadata
document per image with a two-level taxonomy (``["Even", "4"]``), 1-3 annotators on the
labelled images with some disagreement, reviews, a few blurred and sorted-out images, and most
images unlabelled. The labelled share differs per digit so that classes are imbalanced.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

_NAMESPACE = uuid.UUID("6f1c1f4e-52a5-4a55-9d0e-6b1f3c2d9a10")
# Share of each digit's images that carry annotations: imbalanced on purpose, like the seed's
# 414 / 203 / 113 / 54 level-1 classes.
_LABELLED_SHARE = (0.45, 0.40, 0.35, 0.30, 0.25, 0.20, 0.15, 0.12, 0.10, 0.08)
_ANNOTATORS = (701, 702, 703, 704, 705, 706)


@dataclass(frozen=True)
class DemoImage:
    blob_name: str
    data: bytes
    document: dict[str, Any]


def taxonomy_path(digit: int) -> list[str]:
    return ["Even" if digit % 2 == 0 else "Odd", str(digit)]


def _encode_jpeg(pixels: np.ndarray, size: int) -> bytes:
    gray = Image.fromarray(np.uint8(255 - pixels * (255.0 / 16.0)))  # dark ink on white paper
    rgb = gray.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _annotations(digit: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    annotators = rng.choice(_ANNOTATORS, size=int(rng.integers(1, 4)), replace=False)
    result = []
    for annotator in sorted(int(a) for a in annotators):
        # About one annotation in eight disagrees, as people do on ambiguous handwriting.
        given = int(rng.integers(0, 10)) if rng.random() < 0.12 else digit
        result.append({"annotator_id": annotator, "taxonomy": [taxonomy_path(given)]})
    return result


def _document(
    index: int, digit: int, data: bytes, size: int, rng: np.random.Generator
) -> dict[str, Any]:
    labelled = rng.random() < _LABELLED_SHARE[digit]
    annotations = _annotations(digit, rng) if labelled else []
    blob_name = f"{uuid.uuid5(_NAMESPACE, str(index))}.jpeg"
    return {
        "id": blob_name,
        "uri_orig": f"digits-{index:04d}.jpeg",
        "file_hash": hashlib.sha256(data).hexdigest(),
        "text": None,
        "artnr_ocr": None,
        "pii_entities": None,
        "face_rects": None,
        "is_blurred": bool(rng.random() < 0.03),
        "resolution_width": size,
        "resolution_height": size,
        "servicereport_artnr": [],
        "servicereport_filename": None,
        "sortout": "Sort Out" if rng.random() < 0.03 else "Keep",
        "sortout_testset": bool(labelled and rng.random() < 0.1),
        "has_imagerecognition_labels": labelled,
        "labels_with_taxonomy": annotations,
        "total_annotations": len(annotations),
        "has_review": bool(labelled and rng.random() < 0.3),
    }


def demo_images(*, size: int = 64, seed: int = 0) -> Iterator[DemoImage]:
    """Yield the 1,797 demo images with their metadata documents, deterministically."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        data = _encode_jpeg(pixels, size)
        document = _document(index, int(target), data, size, rng)
        yield DemoImage(blob_name=document["id"], data=data, document=document)
