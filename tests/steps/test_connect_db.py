"""connect_db: select documents by the filter, validate them, resolve labels, write the id list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sslpipe.core.config import LabelsConfig
from sslpipe.core.filters import ImageFilter
from sslpipe.data.labelled import LABELLED_COLUMNS, TooFewImagesError
from sslpipe.steps.connect_db import (
    ID_COLUMNS,
    EmptySelectionError,
    run_connect_db,
    select_documents,
    select_images,
)


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


# --- labelled mode -----------------------------------------------------------------------------


def add_labelled_images(catalog: Any, make_document: Any) -> None:
    """Next to the tiny catalog (a: Even, b: Odd, c: unlabelled, f: a tie at level 1):

    * e01-e09 Even/2 and p1, p2 Even/2 pinned to the test set: Even has 12 images
      (s: a path only ``["Even"]`` deep, Even at level 1, too shallow at level 2, makes 13);
    * o01-o04 Odd/3: Odd has 5 images;
    * l: Odd/3 from two annotators, Even/2 from a third (agreement 2/3).
    """
    catalog.add(
        *(make_document(f"e{i:02d}.jpeg", (701, ["Even", "2"])) for i in range(1, 10)),
        *(make_document(f"p{i}.jpeg", (702, ["Even", "2"]), sortout_testset=True) for i in (1, 2)),
        *(make_document(f"o{i:02d}.jpeg", (701, ["Odd", "3"])) for i in range(1, 5)),
        make_document("l.jpeg", (701, ["Odd", "3"]), (702, ["Odd", "3"]), (703, ["Even", "2"])),
        make_document("s.jpeg", (703, ["Even"])),
    )


@pytest.fixture
def labelled_catalog(tiny_catalog: Any, make_document: Any) -> Any:
    add_labelled_images(tiny_catalog, make_document)
    return tiny_catalog


def labelled(catalog: Any, **labels: Any) -> dict[str, Any]:
    return run(catalog, mode="labelled", labels=LabelsConfig(**labels))


def test_labelled_mode_writes_the_split_balanced_id_list_and_the_label_map(
    labelled_catalog: Any,
) -> None:
    stats = labelled(labelled_catalog, min_agreement=0.7)
    out = labelled_catalog.root / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "containers.json",
        "ids.csv",
        "labels.json",
        "selection.json",
    ]
    table = pd.read_csv(out / "ids.csv", dtype={"id": str, "label": str}, keep_default_na=False)
    assert list(table.columns) == list(LABELLED_COLUMNS)
    assert list(table["id"]) == sorted(table["id"])
    # c (unlabelled), f (tie) and l (2/3 < 0.7) are dropped; d and e are not selected.
    assert not {"c.jpeg", "d.jpeg", "e.jpeg", "f.jpeg", "l.jpeg"} & set(table["id"])
    assert table["label"].value_counts().to_dict() == {"Even": 13, "Odd": 5}
    assert set(table.loc[table["id"].isin(["p1.jpeg", "p2.jpeg"]), "split"]) == {"test"}
    assert read_json(out / "labels.json") == {
        "classes": ["Even", "Odd"],
        "index": {"Even": 0, "Odd": 1},
        "level": 1,
        "class_weights": None,
    }
    assert list(read_json(out / "containers.json")) == list(table["id"])

    selection = read_json(out / "selection.json")
    assert selection == stats
    assert selection["mode"] == "labelled"
    assert selection["selected"] == 21 and selection["labelled"] == 18
    assert selection["dropped"] == {"unlabelled": 1, "too_shallow": 0, "tie": 1, "low_agreement": 1}
    assert selection["split"] == {"train": 0.6, "val": 0.2, "test": 0.2}
    assert selection["split_seed"] == 0 and selection["pinned_to_test"] == 2
    assert selection["min_agreement"] == 0.7 and selection["balance"] == "oversample"
    # Even: 13 images, 2 pinned -> 8/3/2 (7.8/2.6/2.6); Odd: 5 -> 3/1/1.
    assert selection["counts_before_oversampling"] == {
        "train": {"Even": 8, "Odd": 3},
        "val": {"Even": 3, "Odd": 1},
        "test": {"Even": 2, "Odd": 1},
    }
    assert selection["counts_after_oversampling"] == {
        "train": {"Even": 8, "Odd": 8},
        "val": {"Even": 3, "Odd": 1},
        "test": {"Even": 2, "Odd": 1},
    }
    repeats = table.groupby(["split", "label"])["repeats"].sum().to_dict()
    assert repeats[("train", "Odd")] == 8 and repeats[("train", "Even")] == 8
    assert set(table.loc[table["split"] != "train", "repeats"]) == {1}


def test_labelled_mode_counts_invalid_documents_with_the_dropped(
    labelled_catalog: Any, make_document: Any
) -> None:
    labelled_catalog.add(
        make_document("x-bad.jpeg", (701, ["Even", ""])),
        {"id": "y-bad.jpeg", "sortout": "Keep", "sortout_testset": "yes"},
    )
    stats = labelled(labelled_catalog)
    assert stats["skipped"] == {"invalid:labels_with_taxonomy": 1, "invalid:sortout_testset": 1}
    assert stats["dropped"] == {
        "unlabelled": 1,
        "too_shallow": 0,
        "tie": 1,
        "low_agreement": 0,
        "invalid:labels_with_taxonomy": 1,
        "invalid:sortout_testset": 1,
    }
    assert stats["classes"] == {"Even": 13, "Odd": 6}  # l is Odd without an agreement threshold


def test_labelled_mode_at_level_2_drops_too_shallow_paths(labelled_catalog: Any) -> None:
    stats = labelled(labelled_catalog, level=2)
    assert stats["dropped"]["too_shallow"] == 1  # s.jpeg
    assert stats["classes"] == {"Even/2": 12, "Odd/3": 6}
    assert read_json(labelled_catalog.root / "out" / "labels.json")["classes"] == [
        "Even/2",
        "Odd/3",
    ]
    assert "s.jpeg" not in set(read_ids(labelled_catalog)["id"])


def test_labelled_mode_with_class_weights_writes_them_to_the_label_map(
    labelled_catalog: Any,
) -> None:
    stats = labelled(labelled_catalog, min_agreement=0.7, balance="class_weight")
    weights = read_json(labelled_catalog.root / "out" / "labels.json")["class_weights"]
    # train: Even 8, Odd 3 -> 11 / (2 * 8) and 11 / (2 * 3)
    assert weights == {"Even": pytest.approx(11 / 16), "Odd": pytest.approx(11 / 6)}
    assert stats["class_weights"] == weights
    assert set(read_ids(labelled_catalog)["repeats"]) == {"1"}


def test_labelled_mode_is_deterministic_and_follows_the_seed(labelled_catalog: Any) -> None:
    labelled(labelled_catalog, seed=5)
    first = (labelled_catalog.root / "out" / "ids.csv").read_text()
    labelled(labelled_catalog, seed=5)
    assert (labelled_catalog.root / "out" / "ids.csv").read_text() == first
    labelled(labelled_catalog, seed=6)
    assert (labelled_catalog.root / "out" / "ids.csv").read_text() != first


def test_labelled_mode_refuses_a_class_too_small_and_writes_nothing(
    tiny_catalog: Any, make_document: Any
) -> None:
    tiny_catalog.add(*(make_document(f"e{i}.jpeg", (701, ["Even", "2"])) for i in range(5)))
    with pytest.raises(TooFewImagesError, match=r"class 'Odd' has 1 image.*filter\.exclude_labels"):
        labelled(tiny_catalog)
    assert not (tiny_catalog.root / "out").exists()


def test_labelled_mode_without_a_decided_label_is_an_empty_selection(tiny_catalog: Any) -> None:
    with pytest.raises(EmptySelectionError, match=r"none of the 1 selected images has a label.*"):
        run(tiny_catalog, ImageFilter(labelled="unlabelled"), mode="labelled")
    assert not (tiny_catalog.root / "out").exists()


def test_an_all_mode_rerun_removes_the_label_map(labelled_catalog: Any) -> None:
    labelled(labelled_catalog)
    stats = run(labelled_catalog)
    out = labelled_catalog.root / "out"
    assert not (out / "labels.json").exists()
    assert list(read_ids(labelled_catalog).columns) == list(ID_COLUMNS)
    assert stats["mode"] == "all" and "dropped" not in stats and "split" not in stats
    assert stats["selected"] == 21 and stats["labelled"] == 19


def test_min_agreement_also_decides_the_labels_of_all_mode(labelled_catalog: Any) -> None:
    run(labelled_catalog, labels=LabelsConfig(min_agreement=0.7))
    labels = dict(read_ids(labelled_catalog)[["id", "label"]].itertuples(index=False))
    assert labels["l.jpeg"] == "" and labels["a.jpeg"] == "Even"


def test_an_unknown_mode_and_a_contradicting_label_level_are_refused(tiny_catalog: Any) -> None:
    with pytest.raises(ValueError, match=r"unknown mode 'train'; expected one of all, labelled"):
        run(tiny_catalog, mode="train")
    with pytest.raises(ValueError, match=r"label_level=1 contradicts labels.level=2"):
        run(tiny_catalog, labels=LabelsConfig(level=2), label_level=1)
    assert not (tiny_catalog.root / "out").exists()


def test_select_documents_keeps_why_a_label_was_not_decided_and_the_test_pin() -> None:
    def doc(doc_id: str, *votes: tuple[int, list[str]], **extra: Any) -> dict[str, Any]:
        return {
            "id": doc_id,
            "labels_with_taxonomy": [{"annotator_id": a, "taxonomy": [p]} for a, p in votes],
            **extra,
        }

    raw = [
        doc("majority", (1, ["X", "1"]), (2, ["X", "2"]), (3, ["Y", "1"])),
        doc("tie", (1, ["X", "1"]), (2, ["Y", "1"]), sortout_testset=True),
        doc("shallow", (1, ["X"])),
        doc("none", sortout_testset=None),
    ]
    table, _ = select_documents(raw, label_level=1, min_agreement=0.6)
    assert table[["id", "label", "label_reason", "sortout_testset"]].to_dict("records") == [
        {"id": "majority", "label": "X", "label_reason": "", "sortout_testset": False},
        {"id": "tie", "label": "", "label_reason": "tie", "sortout_testset": True},
        {"id": "shallow", "label": "X", "label_reason": "", "sortout_testset": False},
        {"id": "none", "label": "", "label_reason": "unlabelled", "sortout_testset": False},
    ]
    table, _ = select_documents(raw, label_level=1, min_agreement=0.7)  # X has 2 of 3
    assert table.loc[0, "label_reason"] == "low_agreement"
    table, _ = select_documents(raw, label_level=2)
    assert list(table["label_reason"]) == ["tie", "tie", "too_shallow", "unlabelled"]
