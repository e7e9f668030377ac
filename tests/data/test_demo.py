"""The demo catalog (1,797 digit images, seed-schema documents) and ingesting it into stores."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from sslpipe.core.filters import ImageFilter
from sslpipe.core.metadata import validate_document
from sslpipe.data.demo import DemoImage, demo_images, taxonomy_path
from sslpipe.data.ingest import ingest_images
from sslpipe.data.labels import LabelDecision, resolve_label
from sslpipe.stores.base import UpsertReport
from sslpipe.stores.local_blob import LocalFolderBlobStore
from sslpipe.stores.sqlite import SQLiteMetadataStore


@pytest.fixture(scope="module")
def catalog() -> list[DemoImage]:
    return list(demo_images())


def labelled(catalog: list[DemoImage]) -> list[DemoImage]:
    return [image for image in catalog if image.document["labels_with_taxonomy"]]


def decision(image: DemoImage, level: int = 2) -> LabelDecision:
    document, _ = validate_document(image.document)
    assert document is not None
    return resolve_label(document.labels_with_taxonomy, level=level)


def test_the_catalog_has_1797_images_with_unique_ids(catalog: list[DemoImage]) -> None:
    assert len(catalog) == 1797
    assert len({image.document["id"] for image in catalog}) == 1797
    assert all(image.blob_name == image.document["id"] for image in catalog)
    assert all(image.blob_name.endswith(".jpeg") for image in catalog)


def test_every_document_is_valid_and_hashes_its_image(catalog: list[DemoImage]) -> None:
    for image in catalog:
        document, reason = validate_document(image.document)
        assert reason is None, (image.blob_name, reason)
        assert document is not None
        assert image.document["file_hash"] == hashlib.sha256(image.data).hexdigest()
        assert image.document["total_annotations"] == len(image.document["labels_with_taxonomy"])


def test_images_are_rgb_jpegs_of_the_requested_size(catalog: list[DemoImage]) -> None:
    for image in catalog[:50]:
        decoded = Image.open(io.BytesIO(image.data))
        assert (decoded.format, decoded.mode, decoded.size) == ("JPEG", "RGB", (64, 64))
    small = next(demo_images(size=32))
    assert Image.open(io.BytesIO(small.data)).size == (32, 32)
    assert small.document["resolution_width"] == 32


@pytest.mark.parametrize(
    ("digit", "path"), [(4, ["Even", "4"]), (7, ["Odd", "7"]), (0, ["Even", "0"])]
)
def test_taxonomy_paths_have_two_levels_by_parity(digit: int, path: list[str]) -> None:
    assert taxonomy_path(digit) == path


def test_every_annotated_path_is_two_levels_consistent_with_parity(
    catalog: list[DemoImage],
) -> None:
    paths = [
        path
        for image in labelled(catalog)
        for annotation in image.document["labels_with_taxonomy"]
        for path in annotation["taxonomy"]
    ]
    assert paths
    for first, second in paths:
        assert first == ("Even" if int(second) % 2 == 0 else "Odd")
    assert {second for _, second in paths} == {str(d) for d in range(10)}


def test_most_images_are_unlabelled(catalog: list[DemoImage]) -> None:
    share = len(labelled(catalog)) / len(catalog)
    assert 0.1 < share < 0.5


def test_labelled_images_have_one_to_three_distinct_annotators(catalog: list[DemoImage]) -> None:
    counts = Counter(len(image.document["labels_with_taxonomy"]) for image in labelled(catalog))
    assert set(counts) == {1, 2, 3}
    assert counts[2] + counts[3] > 50
    for image in labelled(catalog):
        annotators = [a["annotator_id"] for a in image.document["labels_with_taxonomy"]]
        assert len(set(annotators)) == len(annotators)


def test_annotators_sometimes_disagree(catalog: list[DemoImage]) -> None:
    disagreements = [
        image
        for image in labelled(catalog)
        if len({tuple(a["taxonomy"][0]) for a in image.document["labels_with_taxonomy"]}) > 1
    ]
    assert 10 < len(disagreements) < len(labelled(catalog)) // 4
    decisions = Counter(decision(image).reason for image in disagreements)
    assert decisions[None] > 0 and decisions["tie"] > 0


def test_classes_are_imbalanced(catalog: list[DemoImage]) -> None:
    majority = Counter(decision(image).label for image in labelled(catalog))
    assert majority["Even/0"] > 3 * majority["Odd/9"] > 0


def test_some_images_are_blurred_sorted_out_or_reviewed(catalog: list[DemoImage]) -> None:
    documents = [image.document for image in catalog]
    blurred = sum(d["is_blurred"] for d in documents)
    sorted_out = sum(d["sortout"] == "Sort Out" for d in documents)
    assert 10 < blurred < 150 and 10 < sorted_out < 150
    assert {d["sortout"] for d in documents} == {"Keep", "Sort Out"}
    reviewed = [d for d in documents if d["has_review"]]
    assert reviewed and all(d["labels_with_taxonomy"] for d in reviewed)


def test_the_catalog_is_deterministic_for_a_seed(catalog: list[DemoImage]) -> None:
    again = list(itertools.islice(demo_images(), 40))
    assert again == catalog[:40]
    other = list(itertools.islice(demo_images(seed=1), 40))
    assert [i.document for i in other] != [i.document for i in catalog[:40]]
    assert [i.blob_name for i in other] == [i.blob_name for i in catalog[:40]]


def test_ingest_uploads_blobs_and_upserts_documents(
    tmp_path: Path, catalog: list[DemoImage]
) -> None:
    images = catalog[:30]
    blobs = LocalFolderBlobStore(tmp_path / "images")
    with SQLiteMetadataStore(tmp_path / "metadata.db") as store:
        assert ingest_images(images, store, blobs, concurrency=4) == UpsertReport(created=30)
        assert store.count() == 30
        assert store.get(images[3].blob_name) == images[3].document
        assert ingest_images(images, store, blobs) == UpsertReport(unchanged=30)
        kept = {
            i.blob_name
            for i in images
            if not i.document["is_blurred"] and i.document["sortout"] == "Keep"
        }
        assert {d["id"] for d in store.select(ImageFilter())} == kept
    assert asyncio.run(blobs.read(images[7].blob_name)) == images[7].data
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        i.blob_name for i in images
    )
