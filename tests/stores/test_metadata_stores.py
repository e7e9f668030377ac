"""One suite for every metadata store implementation, checked against a reference filter.

To add an implementation, append one ``pytest.param(factory, id=...)`` to
``METADATA_STORE_FACTORIES``: a factory takes an empty folder and the test's request (to ask
for a server fixture such as ``cosmos_server``) and returns an empty store.
"""

from __future__ import annotations

import random
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sslpipe.core.filters import ImageFilter
from sslpipe.stores import StoreError, open_metadata_store
from sslpipe.stores.base import MetadataStore, UpsertReport
from sslpipe.stores.sqlite import SQLiteMetadataStore, compile_filter

MetadataStoreFactory = Callable[[Path, pytest.FixtureRequest], MetadataStore]


def _sqlite_store(folder: Path, request: pytest.FixtureRequest) -> MetadataStore:
    return SQLiteMetadataStore(folder / "metadata.db")


def _cosmos_store(
    folder: Path, request: pytest.FixtureRequest, *, udf: bool = False
) -> MetadataStore:
    """An empty container of its own on the local Cosmos-compatible server."""
    from sslpipe.stores.cosmos import CosmosMetadataStore, install_udf

    server = request.getfixturevalue("cosmos_server")
    database = request.getfixturevalue("cosmos_suite_database")
    store = CosmosMetadataStore(
        server["endpoint"], database, f"c-{uuid.uuid4().hex[:10]}", credential=server["key"],
        use_udf=udf,
    )  # fmt: skip
    if udf:
        install_udf(store)
    return store


def _cosmos_udf_store(folder: Path, request: pytest.FixtureRequest) -> MetadataStore:
    return _cosmos_store(folder, request, udf=True)


# The local server's certificate is self-signed; unverified TLS to loopback is intended.
_LOCAL_SERVER = [
    pytest.mark.servers,
    pytest.mark.filterwarnings("ignore:Unverified HTTPS request is being made to host"),
]

METADATA_STORE_FACTORIES = [
    pytest.param(_sqlite_store, id="sqlite"),
    pytest.param(_cosmos_store, id="cosmos", marks=_LOCAL_SERVER),
    pytest.param(_cosmos_udf_store, id="cosmos-udf", marks=_LOCAL_SERVER),
]


@pytest.fixture(scope="module")
def cosmos_suite_database(cosmos_server: dict[str, str]) -> Iterator[str]:
    """A Cosmos database for this module's containers, deleted at its end."""
    from azure.cosmos import CosmosClient

    name = f"test-suite-{uuid.uuid4().hex[:8]}"
    yield name
    with CosmosClient(cosmos_server["endpoint"], cosmos_server["key"]) as client:
        client.delete_database(name)


@pytest.fixture(params=METADATA_STORE_FACTORIES)
def metadata_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetadataStore]:
    store = request.param(tmp_path, request)
    yield store
    store.close()


# --- the reference: the filter semantics in plain Python ---------------------------------------


def _annotations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in doc.get("labels_with_taxonomy") or [] if isinstance(a, dict)]


def _paths(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    return [tuple(p) for a in _annotations(doc) for p in a.get("taxonomy") or []]


def _matches_any(doc: dict[str, Any], prefixes: list[tuple[str, ...]]) -> bool:
    return any(path[: len(prefix)] == prefix for path in _paths(doc) for prefix in prefixes)


def _reference_select(docs: list[dict[str, Any]], f: ImageFilter) -> list[str]:
    """The ids the filter selects, by the documented semantics, in id order."""
    selected = []
    for doc in sorted(docs, key=lambda d: d["id"]):
        n_annotators = len({str(a.get("annotator_id")) for a in _annotations(doc)})
        if f.exclude_blurred and doc.get("is_blurred") is True:
            continue
        if f.sortout is not None and doc.get("sortout") not in f.sortout:
            continue
        if f.labelled == "labelled" and n_annotators == 0:
            continue
        if f.labelled == "unlabelled" and n_annotators > 0:
            continue
        if f.include_labels and not _matches_any(doc, f.include_labels):
            continue
        if f.exclude_labels and _matches_any(doc, f.exclude_labels):
            continue
        if n_annotators < f.min_annotators:
            continue
        if f.require_review and doc.get("has_review") is not True:
            continue
        selected.append(doc["id"])
    return selected if f.limit is None else selected[: f.limit]


def ids(store: MetadataStore, image_filter: ImageFilter) -> list[str]:
    return [doc["id"] for doc in store.select(image_filter)]


def doc(
    doc_id: str,
    *labels: tuple[Any, tuple[str, ...]],
    blurred: bool | None = False,
    sortout: str | None = "Keep",
    review: bool | None = False,
) -> dict[str, Any]:
    annotations: dict[Any, list[list[str]]] = {}
    for annotator, path in labels:
        annotations.setdefault(annotator, []).append(list(path))
    return {
        "id": doc_id,
        "is_blurred": blurred,
        "sortout": sortout,
        "has_review": review,
        "labels_with_taxonomy": [
            {"annotator_id": a, "taxonomy": t} for a, t in annotations.items()
        ],
    }


# A small catalog where every filter field makes a difference.
CATALOG = [
    doc("01", (1, ("A", "B")), (2, ("A", "B")), review=True),
    doc("02", (1, ("AB",))),
    doc("03", (1, ("A",)), (2, ("C", "D")), (3, ("C",))),
    doc("04"),
    doc("05", (1, ("A", "X")), blurred=True),
    doc("06", (1, ("C", "D")), sortout="Sort Out"),
    doc("07", (1, ("A", "B", "C")), sortout=None, review=True),
    doc("08", blurred=None, review=None),
    doc("09", (2, ("C", "D", "E")), (2, ("A",)), review=True),
    {"id": "10", "sortout": "Keep"},  # fields missing entirely
]

FIELD_CASES = [
    ({}, ["01", "02", "03", "04", "08", "09", "10"]),
    ({"exclude_blurred": False}, ["01", "02", "03", "04", "05", "08", "09", "10"]),
    ({"sortout": None}, ["01", "02", "03", "04", "06", "07", "08", "09", "10"]),
    ({"sortout": ["Sort Out"]}, ["06"]),
    ({"sortout": []}, []),
    ({"labelled": "labelled"}, ["01", "02", "03", "09"]),
    ({"labelled": "unlabelled"}, ["04", "08", "10"]),
    ({"include_labels": [["A"]]}, ["01", "03", "09"]),
    ({"include_labels": [["A", "B"]]}, ["01"]),
    ({"include_labels": [["AB"]]}, ["02"]),
    ({"include_labels": [["C", "D"], ["AB"]]}, ["02", "03", "09"]),
    ({"exclude_labels": [["C"]]}, ["01", "02", "04", "08", "10"]),
    ({"min_annotators": 2}, ["01", "03"]),
    ({"min_annotators": 3}, ["03"]),
    ({"require_review": True}, ["01", "09"]),
    ({"limit": 3}, ["01", "02", "03"]),
    ({"include_labels": [["A"]], "exclude_labels": [["A"]]}, []),  # exclude wins
    ({"include_labels": [["A"]], "exclude_labels": [["C", "D"]]}, ["01"]),
    (
        {"sortout": None, "exclude_blurred": False, "include_labels": [["A"]], "limit": 3},
        ["01", "03", "05"],
    ),
    ({"sortout": None, "require_review": True, "min_annotators": 1}, ["01", "07", "09"]),
    ({"labelled": "labelled", "min_annotators": 2, "exclude_labels": [["A", "B"]]}, ["03"]),
]


# --- upsert, get, count ------------------------------------------------------------------------


def test_a_new_store_is_empty(metadata_store: MetadataStore) -> None:
    assert metadata_store.count() == 0
    assert metadata_store.get("nothing") is None
    assert ids(metadata_store, ImageFilter(sortout=None, exclude_blurred=False)) == []


def test_upsert_counts_created_updated_and_unchanged_documents(
    metadata_store: MetadataStore,
) -> None:
    assert metadata_store.upsert([doc("a"), doc("b")]) == UpsertReport(created=2)
    assert metadata_store.upsert([doc("a"), doc("b", review=True), doc("c")]) == UpsertReport(
        created=1, updated=1, unchanged=1
    )
    assert metadata_store.count() == 3


def test_the_same_document_with_its_keys_in_another_order_is_unchanged(
    metadata_store: MetadataStore,
) -> None:
    original = doc("a", (1, ("A",)))
    metadata_store.upsert([original])
    reordered = dict(reversed(list(original.items())))
    assert metadata_store.upsert([reordered]) == UpsertReport(unchanged=1)


def test_upsert_accepts_a_generator(metadata_store: MetadataStore) -> None:
    report = metadata_store.upsert(doc(f"{i:02d}") for i in range(5))
    assert report.created == 5 and metadata_store.count() == 5


def test_get_returns_the_stored_document_with_every_field(metadata_store: MetadataStore) -> None:
    original = {**doc("Bad Wäsche 日本.jpeg", (701, ("Bäder", "Wanne"))), "extra": {"n": [1, None]}}
    metadata_store.upsert([original])
    assert metadata_store.get("Bad Wäsche 日本.jpeg") == original
    assert metadata_store.get("bad wäsche 日本.jpeg") is None


def test_an_update_replaces_the_document_and_its_labels(metadata_store: MetadataStore) -> None:
    metadata_store.upsert([doc("a", (1, ("A",)))])
    metadata_store.upsert([doc("a", (1, ("B",)))])
    assert metadata_store.count() == 1
    assert ids(metadata_store, ImageFilter(include_labels=[["A"]])) == []
    assert ids(metadata_store, ImageFilter(include_labels=[["B"]])) == ["a"]
    stored = metadata_store.get("a")
    assert stored is not None
    assert stored["labels_with_taxonomy"][0]["taxonomy"] == [["B"]]


@pytest.mark.parametrize("bad", [{"name": "no id"}, {"id": ""}, {"id": 7}])
def test_a_document_without_a_text_id_is_refused(metadata_store: MetadataStore, bad: Any) -> None:
    with pytest.raises(ValueError, match="'id'"):
        metadata_store.upsert([bad])


def test_documents_with_mistyped_fields_are_stored_without_crashing(
    metadata_store: MetadataStore,
) -> None:
    mistyped: list[dict[str, Any]] = [
        {"id": "m1", "sortout": "Keep", "is_blurred": "yes", "has_review": 1},
        {"id": "m2", "sortout": "Keep", "labels_with_taxonomy": "Even/2"},
        {"id": "m3", "sortout": "Keep", "labels_with_taxonomy": [5, {"annotator_id": 1}]},
        {
            "id": "m4",
            "sortout": "Keep",
            "labels_with_taxonomy": [{"annotator_id": 1, "taxonomy": 5}],
        },
        {
            "id": "m5",
            "sortout": 3,
            "labels_with_taxonomy": [{"annotator_id": 1, "taxonomy": [[1]]}],
        },
    ]
    assert metadata_store.upsert(mistyped).created == 5
    # Not known to be blurred, so they pass the default filter (validation happens later) ...
    assert ids(metadata_store, ImageFilter()) == ["m1", "m2", "m3", "m4"]
    # ... but a mistyped review flag is not a review, and a sortout that is not text is no value.
    assert ids(metadata_store, ImageFilter(require_review=True, sortout=None)) == []
    assert ids(metadata_store, ImageFilter(include_labels=[["Even"]])) == []


def test_taxonomy_paths_given_as_tuples_are_selected_like_lists(
    metadata_store: MetadataStore,
) -> None:
    metadata_store.upsert(
        [
            {
                "id": "t",
                "sortout": "Keep",
                "labels_with_taxonomy": [{"annotator_id": 1, "taxonomy": [("Even", "4")]}],
            }
        ]
    )
    assert ids(metadata_store, ImageFilter(include_labels=[["Even"]])) == ["t"]
    assert ids(metadata_store, ImageFilter(exclude_labels=[["Even", "4"]])) == []


# --- every filter field, alone and combined ----------------------------------------------------


@pytest.fixture
def catalog_store(metadata_store: MetadataStore) -> MetadataStore:
    metadata_store.upsert(CATALOG)
    return metadata_store


@pytest.mark.parametrize(("fields", "expected"), FIELD_CASES, ids=[str(c[0]) for c in FIELD_CASES])
def test_each_filter_field_selects_the_documented_documents(
    catalog_store: MetadataStore, fields: dict[str, Any], expected: list[str]
) -> None:
    image_filter = ImageFilter.model_validate(fields)
    assert _reference_select(CATALOG, image_filter) == expected  # the reference agrees ...
    assert ids(catalog_store, image_filter) == expected  # ... and so does the store


def test_select_returns_whole_documents_in_id_order(metadata_store: MetadataStore) -> None:
    metadata_store.upsert([doc("b"), doc("c"), doc("a"), doc("B"), doc("ä"), doc("a1")])
    selected = list(metadata_store.select(ImageFilter()))
    assert [d["id"] for d in selected] == ["B", "a", "a1", "b", "c", "ä"]
    assert selected[0] == doc("B")


def test_limit_applies_after_ordering_by_id(metadata_store: MetadataStore) -> None:
    metadata_store.upsert([doc(f"{i:03d}", blurred=i % 2 == 0) for i in reversed(range(20))])
    assert ids(metadata_store, ImageFilter(limit=3)) == ["001", "003", "005"]


def _random_path(rng: random.Random, levels: list[str]) -> tuple[str, ...]:
    return tuple(rng.choice(levels) for _ in range(rng.randint(1, 3)))


LEVELS = ["A", "AB", "A ", "B", "C", "a", "Ä", "it's", "_", "%", "A\tB"]


def _random_document(rng: random.Random, index: int) -> dict[str, Any]:
    document: dict[str, Any] = {"id": f"{rng.choice(['img', 'Img', 'ïmg'])}-{index:04d}"}
    for key, values in (
        ("is_blurred", [True, False, None]),
        ("has_review", [True, False, None]),
        ("sortout", ["Keep", "Sort Out", "keep", None]),
    ):
        if rng.random() < 0.85:
            document[key] = rng.choice(values)
    if rng.random() < 0.6:
        document["labels_with_taxonomy"] = [
            {
                "annotator_id": rng.choice([701, "701", 702, "anna@example.com", 703]),
                "taxonomy": [list(_random_path(rng, LEVELS)) for _ in range(rng.randint(0, 2))],
            }
            for _ in range(rng.randint(0, 4))
        ]
    return document


def _random_filter(rng: random.Random) -> ImageFilter:
    return ImageFilter(
        exclude_blurred=rng.random() < 0.5,
        sortout=rng.choice([None, ["Keep"], ["Keep", "Sort Out"], ["keep"], []]),
        labelled=rng.choice(["any", "any", "labelled", "unlabelled"]),
        include_labels=[_random_path(rng, LEVELS[:6]) for _ in range(rng.choice([0, 0, 1, 2]))],
        exclude_labels=[_random_path(rng, LEVELS[:6]) for _ in range(rng.choice([0, 0, 1, 2]))],
        min_annotators=rng.choice([0, 0, 1, 2, 3]),
        require_review=rng.random() < 0.25,
        limit=rng.choice([None, None, 1, 5, 40]),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_filters_on_random_documents_select_what_the_reference_selects(
    metadata_store: MetadataStore, seed: int
) -> None:
    rng = random.Random(seed)
    documents = [_random_document(rng, i) for i in range(200)]
    metadata_store.upsert(documents)
    nonempty = 0
    for _ in range(50):
        image_filter = _random_filter(rng)
        expected = _reference_select(documents, image_filter)
        assert ids(metadata_store, image_filter) == expected, image_filter
        nonempty += bool(expected)
    assert nonempty >= 15  # the filters are not trivially empty


# --- label text never alters the query ---------------------------------------------------------

TRICKY_LABELS = [
    "it's",
    "'; DROP TABLE documents; --",
    '" OR 1=1 --',
    "100%",
    "%",
    "a_b",
    "_",
    "Bäder & Wannen",
    "日本語",
    "emoji 🛁",
    "back\\slash",
    "A",
]


@pytest.fixture
def tricky_store(metadata_store: MetadataStore) -> MetadataStore:
    documents = [doc(f"d{i:02d}", (1, (label, "child"))) for i, label in enumerate(TRICKY_LABELS)]
    documents += [doc(f"s{i:02d}", sortout=label) for i, label in enumerate(TRICKY_LABELS)]
    documents.append(doc("zz-other", (1, ("Other",))))
    metadata_store.upsert(documents)
    return metadata_store


@pytest.mark.parametrize("label", TRICKY_LABELS)
def test_tricky_label_text_selects_exactly_its_document(
    tricky_store: MetadataStore, label: str
) -> None:
    index = TRICKY_LABELS.index(label)
    count = tricky_store.count()
    assert ids(tricky_store, ImageFilter(include_labels=[[label]])) == [f"d{index:02d}"]
    assert ids(tricky_store, ImageFilter(include_labels=[[label, "child"]])) == [f"d{index:02d}"]
    excluded = ids(tricky_store, ImageFilter(exclude_labels=[[label]], labelled="labelled"))
    assert f"d{index:02d}" not in excluded and len(excluded) == len(TRICKY_LABELS)
    assert ids(tricky_store, ImageFilter(sortout=[label])) == [f"s{index:02d}"]
    assert tricky_store.count() == count  # the table is still there, untouched


def test_wildcards_in_labels_match_only_themselves(tricky_store: MetadataStore) -> None:
    assert ids(tricky_store, ImageFilter(include_labels=[["%"]])) == [
        f"d{TRICKY_LABELS.index('%'):02d}"
    ]
    assert ids(tricky_store, ImageFilter(sortout=["_"])) == [f"s{TRICKY_LABELS.index('_'):02d}"]


# --- opening stores by URI ---------------------------------------------------------------------


def test_open_metadata_store_picks_sqlite_by_scheme_and_persists(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'sub' / 'metadata.db'}"
    with open_metadata_store(uri) as store:
        assert isinstance(store, SQLiteMetadataStore)
        store.upsert([doc("a")])
    with open_metadata_store(uri) as store:
        assert store.count() == 1 and store.get("a") == doc("a")


def test_an_unsupported_metadata_scheme_is_refused_without_leaking_secrets() -> None:
    with pytest.raises(StoreError, match="scheme 'mongodb' is not one of") as err:
        open_metadata_store("mongodb://admin:hunter2@db.example.com/x?key=s3cret")
    assert "hunter2" not in str(err.value) and "s3cret" not in str(err.value)


def test_a_store_that_cannot_be_opened_raises_store_error(tmp_path: Path) -> None:
    (tmp_path / "folder.db").mkdir()
    with pytest.raises(StoreError, match="cannot open the SQLite metadata store"):
        SQLiteMetadataStore(tmp_path / "folder.db")


# --- SQLite specifics: compile_filter ----------------------------------------------------------


def test_compile_filter_keeps_every_value_out_of_the_sql_text() -> None:
    image_filter = ImageFilter(
        include_labels=[["'; DROP TABLE documents; --", "x"], ["it's"]],
        exclude_labels=[["100%"]],
        sortout=["O'Neil", "Keep"],
        min_annotators=4,
        limit=17,
    )
    sql, params = compile_filter(image_filter)
    for value in ("DROP", "it's", "100%", "O'Neil", "Keep", "17", "4"):
        assert value not in sql
    assert sql.count("?") == len(params)
    assert "'" not in sql
    assert params[-1] == 17 and "O'Neil" in params and 4 in params


def test_compile_filter_of_the_default_filter() -> None:
    sql, params = compile_filter(ImageFilter())
    assert params == ["Keep"]
    assert sql.startswith("SELECT d.doc FROM documents d WHERE ")
    assert sql.endswith("ORDER BY d.id")


def test_the_sqlite_tables_survive_an_injection_attempt(tmp_path: Path) -> None:
    with SQLiteMetadataStore(tmp_path / "m.db") as store:
        store.upsert([doc("a", (1, ("'; DROP TABLE documents; --",)))])
        ids(store, ImageFilter(include_labels=[["'; DROP TABLE documents; --"]]))
        ids(store, ImageFilter(sortout=["'); DROP TABLE label_paths; --"]))
    with sqlite3.connect(tmp_path / "m.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"documents", "label_paths"} <= tables
