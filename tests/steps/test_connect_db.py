"""connect_db: select documents by the filter, validate them, resolve labels, write the id list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sslpipe.filters import ImageFilter
from sslpipe.steps.connect_db import ID_COLUMNS, EmptySelectionError, run_connect_db, select_images


def run(catalog: Any, image_filter: ImageFilter | None = None, **kwargs: Any) -> dict[str, Any]:
    return run_connect_db(
        metadata_uri=catalog.metadata_uri,
        blob_uri=catalog.blob_uri,
        image_filter=image_filter or ImageFilter(),
        output_dir=catalog.root / "out",
        **kwargs,
    )


def read_ids(catalog: Any) -> pd.DataFrame:
    return pd.read_csv(catalog.root / "out" / "ids.csv", dtype=str, keep_default_na=False)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_default_filter_writes_the_sharp_kept_images_with_their_labels(
    tiny_catalog: Any,
) -> None:
    run(tiny_catalog)
    table = read_ids(tiny_catalog)
    assert list(table.columns) == list(ID_COLUMNS)
    assert table.to_dict("records") == [
        {"id": "a.jpeg", "blob_path": "a.jpeg", "file_hash": "hash-a.jpeg", "label": "Even"},
        {"id": "b.jpeg", "blob_path": "b.jpeg", "file_hash": "hash-b.jpeg", "label": "Odd"},
        {"id": "c.jpeg", "blob_path": "c.jpeg", "file_hash": "hash-c.jpeg", "label": ""},
        {"id": "f.jpeg", "blob_path": "f.jpeg", "file_hash": "hash-f.jpeg", "label": ""},  # a tie
    ]


def test_containers_map_every_selected_id_to_the_blob_container(tiny_catalog: Any) -> None:
    run(tiny_catalog)
    containers = read_json(tiny_catalog.root / "out" / "containers.json")
    assert containers == dict.fromkeys(["a.jpeg", "b.jpeg", "c.jpeg", "f.jpeg"], "images")


def test_selection_json_records_filter_stores_counts_and_classes(tiny_catalog: Any) -> None:
    image_filter = ImageFilter(labelled="labelled")
    stats = run(tiny_catalog, image_filter)
    selection = read_json(tiny_catalog.root / "out" / "selection.json")
    assert selection == stats
    assert ImageFilter.model_validate(selection["filter"]) == image_filter
    assert selection["metadata_store"] == tiny_catalog.metadata_uri
    assert selection["blob_store"] == tiny_catalog.blob_uri
    assert selection["documents_in_store"] == 6
    assert selection["selected"] == 3 and selection["labelled"] == 2
    assert selection["classes"] == {"Even": 1, "Odd": 1}
    assert selection["label_level"] == 1
    assert selection["skipped"] == {}


def test_labels_are_resolved_at_the_requested_level(tiny_catalog: Any) -> None:
    stats = run(tiny_catalog, ImageFilter(sortout=None, exclude_blurred=False), label_level=2)
    labels = dict(read_ids(tiny_catalog)[["id", "label"]].itertuples(index=False))
    assert labels == {
        "a.jpeg": "Even/2",
        "b.jpeg": "Odd/3",
        "c.jpeg": "",
        "d.jpeg": "Odd/5",
        "e.jpeg": "Even/4",
        "f.jpeg": "",
    }
    assert stats["classes"] == {"Even/2": 1, "Even/4": 1, "Odd/3": 1, "Odd/5": 1}


def test_label_filters_and_limit_reach_the_store(tiny_catalog: Any) -> None:
    run(tiny_catalog, ImageFilter(include_labels=[["Even"]], exclude_labels=[["Odd", "5"]]))
    assert list(read_ids(tiny_catalog)["id"]) == ["a.jpeg"]
    run(tiny_catalog, ImageFilter(limit=2))
    assert list(read_ids(tiny_catalog)["id"]) == ["a.jpeg", "b.jpeg"]


def test_invalid_documents_are_skipped_and_counted_per_reason(
    tiny_catalog: Any, make_document: Any
) -> None:
    tiny_catalog.add(
        make_document("g-wrong-type.jpeg", is_blurred="maybe"),
        make_document("g-number-bool.jpeg", is_blurred=1),  # not selected as a sharp image
        make_document("h-empty-path.jpeg", (701, [])),
        make_document("i-empty-level.jpeg", (701, ["Even", ""])),
        {"id": "j-labels-text.jpeg", "sortout": "Keep", "labels_with_taxonomy": "Even/2"},
        {"id": "k-hash-number.jpeg", "sortout": "Keep", "file_hash": 1234},
    )
    stats = run(tiny_catalog)
    assert stats["skipped"] == {
        "invalid:file_hash": 1,
        "invalid:is_blurred": 2,
        "invalid:labels_with_taxonomy": 3,
    }
    assert list(read_ids(tiny_catalog)["id"]) == ["a.jpeg", "b.jpeg", "c.jpeg", "f.jpeg"]
    assert read_json(tiny_catalog.root / "out" / "selection.json")["skipped"] == stats["skipped"]
    assert stats["documents_in_store"] == 12 and stats["selected"] == 4


def test_select_images_counts_missing_ids_duplicates_and_non_objects() -> None:
    raw = [
        {"id": "b", "labels_with_taxonomy": [{"annotator_id": 1, "taxonomy": [["X", "Y"]]}]},
        {"file_hash": "no id"},
        {"id": 42},
        "not a document",
        {"id": "a"},
        {"id": "b"},
    ]
    table, skipped = select_images(raw, label_level=2)
    assert table.to_dict("records") == [
        {"id": "b", "blob_path": "b", "file_hash": "", "label": "X/Y"},
        {"id": "a", "blob_path": "a", "file_hash": "", "label": ""},
    ]
    assert skipped == {"invalid:id": 2, "invalid:not_an_object": 1, "duplicate_id": 1}


def test_select_images_of_nothing_is_an_empty_table_with_the_columns() -> None:
    table, skipped = select_images([])
    assert table.empty and list(table.columns) == list(ID_COLUMNS)
    assert not skipped


def test_an_empty_selection_raises_and_writes_nothing(tiny_catalog: Any) -> None:
    with pytest.raises(
        EmptySelectionError, match=r"selected no usable image out of 6 documents"
    ) as err:
        run(tiny_catalog, ImageFilter(include_labels=[["Nothing"]]))
    assert '"include_labels":[["Nothing"]]' in str(err.value)
    assert not (tiny_catalog.root / "out").exists()


def test_a_selection_of_only_invalid_documents_is_empty_and_says_why(
    tiny_catalog: Any, make_document: Any
) -> None:
    tiny_catalog.add(make_document("z.jpeg", (701, ["Only", ""])))
    with pytest.raises(EmptySelectionError, match="'invalid:labels_with_taxonomy': 1"):
        run(tiny_catalog, ImageFilter(include_labels=[["Only"]]))
    assert not (tiny_catalog.root / "out").exists()


def test_a_missing_blob_container_is_a_store_error(tiny_catalog: Any) -> None:
    from sslpipe.stores import StoreError

    with pytest.raises(StoreError, match="does not exist"):
        run_connect_db(
            metadata_uri=tiny_catalog.metadata_uri,
            blob_uri=(tiny_catalog.root / "absent").as_uri(),
            image_filter=ImageFilter(),
            output_dir=tiny_catalog.root / "out",
        )
    assert not (tiny_catalog.root / "out").exists()


def test_a_rerun_replaces_the_outputs(tiny_catalog: Any) -> None:
    run(tiny_catalog)
    run(tiny_catalog, ImageFilter(labelled="unlabelled"))
    assert list(read_ids(tiny_catalog)["id"]) == ["c.jpeg"]
    assert list(read_json(tiny_catalog.root / "out" / "containers.json")) == ["c.jpeg"]
    assert sorted(p.name for p in (tiny_catalog.root / "out").iterdir()) == [
        "containers.json",
        "ids.csv",
        "selection.json",
    ]
