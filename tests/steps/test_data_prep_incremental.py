"""data_prep re-run into the same folder: only new or changed blobs are downloaded.

Every scenario runs against the local folder store and against Azurite (conditional GETs).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sslpipe.steps.data_prep import MANIFEST_COLUMNS, TooManySkippedError, run_data_prep
from sslpipe.stores.base import BlobStore
from tests.steps.blob_containers import CONTAINERS, BlobContainer

IDS = [f"img{i}.jpeg" for i in range(6)]


class Catalog(BlobContainer):
    """A blob container (local folder or Azurite) and an output folder for data_prep."""

    def __init__(self, root: Path, blob_uri: str, open_store: Callable[[], BlobStore]) -> None:
        super().__init__(root, blob_uri, open_store)
        self.out = root / "data"

    def prep(self, ids: list[str], **kwargs: Any) -> dict[str, Any]:
        ids_dir = self.root / "ids"
        ids_dir.mkdir(exist_ok=True)
        pd.DataFrame({"id": ids, "blob_path": ids, "label": "x"}).to_csv(
            ids_dir / "ids.csv", index=False
        )
        kwargs.setdefault("image_size", 24)
        return run_data_prep(ids_dir=ids_dir, blob_uri=self.blob_uri, output_dir=self.out, **kwargs)

    def manifest(self) -> pd.DataFrame:
        return pd.read_csv(self.out / "manifest.csv", dtype=str, keep_default_na=False)

    def image_times(self) -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (self.out / "images").iterdir()}


@pytest.fixture(params=CONTAINERS)
def catalog(
    request: pytest.FixtureRequest, tmp_path: Path, make_image: Callable[..., bytes]
) -> Iterator[Catalog]:
    """Six 40x30 images (resized to 32x24 at image_size 24), prepared once."""
    made: Catalog = request.param(Catalog, tmp_path, request)
    made.put({name: make_image(color=(20 * i, 100, 50)) for i, name in enumerate(IDS)})
    stats = made.prep(IDS)
    assert (stats["downloaded"], stats["reused"], stats["prepared"]) == (6, 0, 6)
    yield made


def test_the_manifest_records_each_blobs_etag(catalog: Catalog) -> None:
    manifest = catalog.manifest()
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    etags = catalog.etags()
    assert dict(zip(manifest["id"], manifest["etag"], strict=True)) == {i: etags[i] for i in IDS}
    assert set(manifest["image_size"]) == {"24"} and list(manifest["blob_path"]) == IDS


def test_a_rerun_downloads_nothing_and_keeps_every_file(catalog: Catalog) -> None:
    manifest_before = (catalog.out / "manifest.csv").read_bytes()
    times = catalog.image_times()
    stats = catalog.prep(IDS)
    assert (stats["downloaded"], stats["reused"], stats["prepared"]) == (0, 6, 6)
    assert json.loads((catalog.out / "stats.json").read_text()) == stats
    assert catalog.image_times() == times  # not even rewritten
    assert (catalog.out / "manifest.csv").read_bytes() == manifest_before  # same fingerprint


def test_only_changed_and_new_blobs_are_downloaded(
    catalog: Catalog, make_image: Callable[..., bytes]
) -> None:
    old_etags = catalog.etags()
    times = catalog.image_times()
    wide = make_image(size=(60, 30), color=(0, 0, 255))
    catalog.put({"img1.jpeg": wide, "img4.jpeg": wide, "new.jpeg": make_image(size=(30, 60))})
    stats = catalog.prep([*IDS, "new.jpeg"])
    assert (stats["downloaded"], stats["reused"], stats["prepared"]) == (3, 4, 7)
    manifest = catalog.manifest().set_index("id")
    sizes = {i: (manifest.loc[i, "width"], manifest.loc[i, "height"]) for i in manifest.index}
    assert sizes["img1.jpeg"] == sizes["img4.jpeg"] == ("48", "24")
    assert sizes["new.jpeg"] == ("24", "48") and sizes["img0.jpeg"] == ("32", "24")
    new_etags = catalog.etags()
    assert manifest["etag"].to_dict() == {i: new_etags[i] for i in manifest.index}
    assert new_etags["img1.jpeg"] != old_etags["img1.jpeg"]
    changed = {name for name, t in catalog.image_times().items() if times.get(name) != t}
    assert changed == {"img1.jpeg", "img4.jpeg", "new.jpeg"}
    assert catalog.prep([*IDS, "new.jpeg"])["downloaded"] == 0


def test_a_new_image_size_refetches_everything(catalog: Catalog) -> None:
    stats = catalog.prep(IDS, image_size=12)
    assert (stats["downloaded"], stats["reused"]) == (6, 0)
    manifest = catalog.manifest()
    assert set(manifest["height"]) == {"12"} and set(manifest["image_size"]) == {"12"}
    assert catalog.prep(IDS, image_size=12)["reused"] == 6


def test_a_failed_run_leaves_the_earlier_result_reusable(catalog: Catalog) -> None:
    manifest_before = (catalog.out / "manifest.csv").read_bytes()
    with pytest.raises(TooManySkippedError):  # at another size: every image is rewritten
        catalog.prep([*IDS, "missing1.jpeg", "missing2.jpeg"], image_size=12)
    assert (catalog.out / "manifest.csv").read_bytes() == manifest_before
    # The images now have the failed run's size, newer than the manifest: fetched again.
    stats = catalog.prep(IDS)
    assert (stats["downloaded"], stats["reused"]) == (6, 0)
    assert set(catalog.manifest()["height"]) == {"24"}


def test_after_a_failed_run_only_the_images_it_touched_are_fetched_again(
    catalog: Catalog, make_image: Callable[..., bytes]
) -> None:
    catalog.put({"img2.jpeg": make_image(size=(60, 30))})
    with pytest.raises(TooManySkippedError):
        catalog.prep([*IDS, "missing1.jpeg", "missing2.jpeg"])
    stats = catalog.prep(IDS)
    assert (stats["downloaded"], stats["reused"]) == (1, 5)
    assert catalog.manifest().set_index("id").loc["img2.jpeg", "width"] == "48"


def test_a_deleted_image_or_a_moved_blob_is_fetched_again(
    catalog: Catalog, make_image: Callable[..., bytes]
) -> None:
    (catalog.out / "images" / "img0.jpeg").unlink()
    catalog.put({"moved/img3.jpeg": make_image(size=(60, 30))})
    ids_dir = catalog.root / "ids"
    frame = pd.read_csv(ids_dir / "ids.csv", dtype=str)
    frame.loc[frame["id"] == "img3.jpeg", "blob_path"] = "moved/img3.jpeg"
    frame.to_csv(ids_dir / "ids.csv", index=False)
    stats = run_data_prep(
        ids_dir=ids_dir, blob_uri=catalog.blob_uri, output_dir=catalog.out, image_size=24
    )
    assert (stats["downloaded"], stats["reused"]) == (2, 4)
    manifest = catalog.manifest().set_index("id")
    assert manifest.loc["img3.jpeg", "path"] == "images/moved/img3.jpeg"
    assert manifest.loc["img3.jpeg", "width"] == "48"
    assert (catalog.out / "images" / "img0.jpeg").is_file()


def test_a_missing_blob_is_skipped_each_run_until_it_appears(
    catalog: Catalog, make_image: Callable[..., bytes]
) -> None:
    ids = [*IDS, "late.jpeg"]
    stats = catalog.prep(ids, max_skipped_fraction=0.5)
    assert (stats["downloaded"], stats["reused"], stats["skipped"]) == (0, 6, {"missing_blob": 1})
    catalog.put({"late.jpeg": make_image()})
    stats = catalog.prep(ids)
    assert (stats["downloaded"], stats["reused"], stats["prepared"]) == (1, 6, 7)


def test_a_manifest_without_etags_means_everything_is_fetched(catalog: Catalog) -> None:
    manifest = catalog.manifest().drop(columns=["etag", "blob_path", "image_size"])
    manifest.to_csv(catalog.out / "manifest.csv", index=False)  # as written before ETags
    stats = catalog.prep(IDS)
    assert (stats["downloaded"], stats["reused"]) == (6, 0)
    assert list(catalog.manifest().columns) == list(MANIFEST_COLUMNS)
