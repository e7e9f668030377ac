"""data_prep: fetch the selected images, resize them, skip and count the unusable ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sslpipe.data.packed_images import open_packed
from sslpipe.steps.data_prep import MANIFEST_COLUMNS, TooManySkippedError, run_data_prep
from sslpipe.stores import StoreError


def write_ids(folder: Path, rows: list[tuple[str, str]], *, selection: bool = True) -> Path:
    """ids.csv with ``(id, label)`` rows whose blob is named by the id."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(
        [(i, i, f"hash-{i}", label) for i, label in rows],
        columns=["id", "blob_path", "file_hash", "label"],
    )
    frame.to_csv(folder / "ids.csv", index=False)
    if selection:
        (folder / "selection.json").write_text(f'{{"selected": {len(rows)}}}\n', encoding="utf-8")
    return folder


def prep(catalog: Any, ids_dir: Path, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("image_size", 24)
    return run_data_prep(
        ids_dir=ids_dir, blob_uri=catalog.blob_uri, output_dir=catalog.root / "data", **kwargs
    )


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(
        path, dtype={"id": str, "label": str, "path": str, "etag": str}, keep_default_na=False
    )


@pytest.fixture
def broken_catalog(tiny_catalog: Any, make_image: Any) -> Any:
    """The tiny catalog with a non-image blob (text) and an empty blob added."""
    (tiny_catalog.blob_dir / "text.jpeg").write_bytes(b"this is not an image\n")
    (tiny_catalog.blob_dir / "empty.jpeg").write_bytes(b"")
    (tiny_catalog.blob_dir / "wide.jpeg").write_bytes(make_image(size=(90, 30)))
    return tiny_catalog


GOOD = [("a.jpeg", "Even"), ("b.jpeg", "Odd"), ("c.jpeg", "")]


def test_good_images_are_resized_into_the_manifest(tiny_catalog: Any) -> None:
    ids_dir = write_ids(tiny_catalog.root / "ids", GOOD)
    stats = prep(tiny_catalog, ids_dir, image_size=24)
    manifest = read_csv(tiny_catalog.root / "data" / "manifest.csv")
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert manifest.drop(columns="etag").to_dict("records") == [
        {"id": i, "path": f"images/{i}", "label": label, "width": 32, "height": 24,
         "blob_path": i, "image_size": 24}
        for i, label in GOOD
    ]  # fmt: skip
    assert manifest["etag"].str.len().min() > 0
    for path in manifest["path"]:
        with Image.open(tiny_catalog.root / "data" / path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 24)
    assert stats["requested"] == 3 and stats["prepared"] == 3 and stats["skipped"] == {}
    assert stats["downloaded"] == 3 and stats["reused"] == 0
    assert read_csv(tiny_catalog.root / "data" / "skipped.csv").empty


def test_the_images_are_also_packed_for_training_in_the_manifest_order(
    broken_catalog: Any,
) -> None:
    ids_dir = write_ids(broken_catalog.root / "ids", [("wide.jpeg", ""), *GOOD])
    prep(broken_catalog, ids_dir, image_size=12)
    out = broken_catalog.root / "data"
    manifest = read_csv(out / "manifest.csv")
    packed = open_packed(out, list(manifest["path"]))
    assert not isinstance(packed, str), packed
    assert len(packed) == 4
    for index, path in enumerate(manifest["path"]):
        with Image.open(out / path) as image:
            assert (packed.image(index) == np.asarray(image.convert("RGB"))).all()


def test_the_shorter_side_is_the_image_size_for_any_aspect(broken_catalog: Any) -> None:
    ids_dir = write_ids(broken_catalog.root / "ids", [("wide.jpeg", "")])
    prep(broken_catalog, ids_dir, image_size=10)
    manifest = read_csv(broken_catalog.root / "data" / "manifest.csv")
    assert (manifest.loc[0, "width"], manifest.loc[0, "height"]) == (30, 10)


def test_stats_and_selection_are_written_next_to_the_manifest(tiny_catalog: Any) -> None:
    ids_dir = write_ids(tiny_catalog.root / "ids", GOOD)
    stats = prep(tiny_catalog, ids_dir)
    out = tiny_catalog.root / "data"
    assert json.loads((out / "stats.json").read_text()) == stats
    assert json.loads((out / "selection.json").read_text()) == {"selected": 3}
    assert stats["seconds"] >= 0


def test_missing_and_unusable_blobs_are_skipped_and_counted(broken_catalog: Any) -> None:
    rows = [*GOOD, ("d.jpeg", ""), ("e.jpeg", ""), ("f.jpeg", "")]
    rows += [("missing.jpeg", "Odd"), ("text.jpeg", ""), ("empty.jpeg", "")]
    ids_dir = write_ids(broken_catalog.root / "ids", rows)
    stats = prep(broken_catalog, ids_dir, max_skipped_fraction=0.5)
    out = broken_catalog.root / "data"
    assert stats["requested"] == 9 and stats["prepared"] == 6
    assert stats["skipped"] == {"empty_file": 1, "missing_blob": 1, "not_an_image": 1}
    skipped = read_csv(out / "skipped.csv")
    assert list(skipped.columns) == ["id", "reason", "detail"]
    assert dict(skipped[["id", "reason"]].itertuples(index=False)) == {
        "empty.jpeg": "empty_file",
        "missing.jpeg": "missing_blob",
        "text.jpeg": "not_an_image",
    }
    assert all(skipped["detail"])
    manifest = read_csv(out / "manifest.csv")
    assert sorted(manifest["id"]) == ["a.jpeg", "b.jpeg", "c.jpeg", "d.jpeg", "e.jpeg", "f.jpeg"]
    assert not (out / "images" / "text.jpeg").exists()


def test_too_many_skipped_raises_naming_the_ids_and_writes_no_manifest(broken_catalog: Any) -> None:
    rows = [*GOOD, ("missing.jpeg", ""), ("text.jpeg", "")]
    ids_dir = write_ids(broken_catalog.root / "ids", rows)
    with pytest.raises(TooManySkippedError, match=r"2 of 5 images \(40\.0%\)") as err:
        prep(broken_catalog, ids_dir, max_skipped_fraction=0.05)
    message = str(err.value)
    assert "missing.jpeg: missing_blob" in message and "text.jpeg: not_an_image" in message
    assert "data_prep.max_skipped_fraction" in message
    out = broken_catalog.root / "data"
    assert not (out / "manifest.csv").exists()
    assert len(read_csv(out / "skipped.csv")) == 2  # kept for inspection
    assert json.loads((out / "stats.json").read_text())["skipped"] == {
        "missing_blob": 1,
        "not_an_image": 1,
    }


def test_a_skipped_share_at_the_limit_is_allowed(broken_catalog: Any) -> None:
    ids_dir = write_ids(broken_catalog.root / "ids", [*GOOD, ("missing.jpeg", "")])
    stats = prep(broken_catalog, ids_dir, max_skipped_fraction=0.25)
    assert stats["prepared"] == 3
    assert (broken_catalog.root / "data" / "manifest.csv").exists()


def test_nothing_usable_fails_even_when_every_skip_is_allowed(broken_catalog: Any) -> None:
    ids_dir = write_ids(broken_catalog.root / "ids", [("missing.jpeg", ""), ("text.jpeg", "")])
    with pytest.raises(TooManySkippedError, match="2 of 2 images"):
        prep(broken_catalog, ids_dir, max_skipped_fraction=1.0)
    assert not (broken_catalog.root / "data" / "manifest.csv").exists()


def test_an_unsafe_blob_path_is_skipped_and_nothing_is_written_outside(tiny_catalog: Any) -> None:
    ids_dir = tiny_catalog.root / "ids"
    ids_dir.mkdir()
    pd.DataFrame(
        [("a.jpeg", "a.jpeg", ""), ("evil", "../../evil.jpeg", "")],
        columns=["id", "blob_path", "label"],
    ).to_csv(ids_dir / "ids.csv", index=False)
    stats = prep(tiny_catalog, ids_dir, max_skipped_fraction=0.5)
    assert stats["skipped"] == {"unsafe_name": 1}
    assert not (tiny_catalog.root / "evil.jpeg").exists()
    assert not (tiny_catalog.root.parent / "evil.jpeg").exists()


def test_ids_without_a_label_column_get_empty_labels(tiny_catalog: Any) -> None:
    ids_dir = tiny_catalog.root / "ids"
    ids_dir.mkdir()
    pd.DataFrame([("a.jpeg", "a.jpeg")], columns=["id", "blob_path"]).to_csv(
        ids_dir / "ids.csv", index=False
    )
    prep(tiny_catalog, ids_dir)
    assert read_csv(tiny_catalog.root / "data" / "manifest.csv").loc[0, "label"] == ""


@pytest.mark.parametrize(
    ("concurrency", "processes"), [(1, None), (3, 1), (3, 2), (64, 3), (64, 16)]
)
def test_the_result_does_not_depend_on_concurrency_or_processes(
    broken_catalog: Any, concurrency: int, processes: int | None
) -> None:
    rows = [*GOOD, ("d.jpeg", "x"), ("e.jpeg", "y"), ("f.jpeg", "z"), ("wide.jpeg", "w")]
    ids_dir = write_ids(broken_catalog.root / "ids", rows)
    stats = prep(broken_catalog, ids_dir, concurrency=concurrency, processes=processes)
    manifest = read_csv(broken_catalog.root / "data" / "manifest.csv")
    assert stats["prepared"] == 7
    assert list(manifest["id"]) == sorted(i for i, _ in rows)
    assert dict(manifest[["id", "label"]].itertuples(index=False)) == dict(rows)


def test_a_missing_ids_csv_is_reported(tiny_catalog: Any) -> None:
    with pytest.raises(FileNotFoundError, match=r"ids\.csv: expected a CSV file"):
        prep(tiny_catalog, tiny_catalog.root / "nothing")


def test_ids_csv_without_required_columns_is_reported(tiny_catalog: Any) -> None:
    ids_dir = tiny_catalog.root / "ids"
    ids_dir.mkdir()
    (ids_dir / "ids.csv").write_text("image,label\na.jpeg,Even\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['id', 'blob_path'\]"):
        prep(tiny_catalog, ids_dir)


def test_a_missing_blob_container_is_a_store_error(tiny_catalog: Any) -> None:
    ids_dir = write_ids(tiny_catalog.root / "ids", GOOD)
    with pytest.raises(StoreError, match="data_prep cannot open the blob store"):
        run_data_prep(
            ids_dir=ids_dir,
            blob_uri=(tiny_catalog.root / "absent").as_uri(),
            output_dir=tiny_catalog.root / "data",
            image_size=24,
        )


def test_a_labelled_selection_carries_split_repeats_and_the_label_map_through(
    broken_catalog: Any,
) -> None:
    ids_dir = broken_catalog.root / "ids"
    ids_dir.mkdir()
    pd.DataFrame(
        [
            ("a.jpeg", "a.jpeg", "hash-a", "Even", "train", 1, "x"),
            ("b.jpeg", "b.jpeg", "hash-b", "Odd", "train", 3, ""),
            ("c.jpeg", "c.jpeg", "hash-c", "Odd", "val", 1, "y"),
            ("missing.jpeg", "missing.jpeg", "", "Even", "test", 1, ""),
            ("d.jpeg", "d.jpeg", "hash-d", "Even", "test", 1, "z"),
        ],
        columns=["id", "blob_path", "file_hash", "label", "split", "repeats", "note"],
    ).to_csv(ids_dir / "ids.csv", index=False)
    label_map = {"classes": ["Even", "Odd"], "index": {"Even": 0, "Odd": 1}, "level": 1,
                 "class_weights": None}  # fmt: skip
    (ids_dir / "labels.json").write_text(json.dumps(label_map), encoding="utf-8")
    (ids_dir / "selection.json").write_text('{"mode": "labelled"}', encoding="utf-8")
    prep(broken_catalog, ids_dir, max_skipped_fraction=0.5)
    out = broken_catalog.root / "data"
    manifest = pd.read_csv(out / "manifest.csv", dtype={"note": str}, keep_default_na=False)
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, "split", "repeats", "note"]
    assert manifest[["id", "label", "split", "repeats", "note"]].to_dict("records") == [
        {"id": "a.jpeg", "label": "Even", "split": "train", "repeats": 1, "note": "x"},
        {"id": "b.jpeg", "label": "Odd", "split": "train", "repeats": 3, "note": ""},
        {"id": "c.jpeg", "label": "Odd", "split": "val", "repeats": 1, "note": "y"},
        {"id": "d.jpeg", "label": "Even", "split": "test", "repeats": 1, "note": "z"},
    ]
    assert json.loads((out / "labels.json").read_text()) == label_map
    assert json.loads((out / "selection.json").read_text()) == {"mode": "labelled"}


def test_an_all_mode_selection_has_no_label_map_and_the_manifest_columns_only(
    tiny_catalog: Any,
) -> None:
    out = tiny_catalog.root / "data"
    out.mkdir()
    (out / "labels.json").write_text("{}", encoding="utf-8")  # from an earlier labelled run
    ids_dir = write_ids(tiny_catalog.root / "ids", GOOD)
    prep(tiny_catalog, ids_dir)
    assert list(read_csv(out / "manifest.csv").columns) == list(MANIFEST_COLUMNS)
    assert not (out / "labels.json").exists()


def test_id_list_columns_named_like_manifest_columns_are_not_passed_through(
    tiny_catalog: Any,
) -> None:
    ids_dir = tiny_catalog.root / "ids"
    ids_dir.mkdir()
    pd.DataFrame(
        [("a.jpeg", "a.jpeg", "Even", "elsewhere.jpeg", 1, "train")],
        columns=["id", "blob_path", "label", "path", "width", "split"],
    ).to_csv(ids_dir / "ids.csv", index=False)
    prep(tiny_catalog, ids_dir)
    manifest = read_csv(tiny_catalog.root / "data" / "manifest.csv")
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, "split"]
    assert manifest.loc[0, "path"] == "images/a.jpeg" and manifest.loc[0, "width"] == 32
