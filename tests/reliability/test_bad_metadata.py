"""Bad metadata (issue 7, item 2): documents with missing fields, wrong types, empty taxonomy
paths, non-UTF-8 text, repeated ids, and label strings with quotes, SQL keywords, control
characters and Unicode.

Ingest names the file, the line and the reason of every bad document instead of crashing, and
stores nothing of a file it refuses. Filters built from hostile label strings select exactly what
a plain-Python evaluation of the filter selects, on SQLite and on the Cosmos DB-compatible
server, and their values never become part of the query text.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sslpipe.core.filters import ImageFilter, TaxonomyPath
from sslpipe.core.metadata import validate_document
from sslpipe.data.ingest import IngestError, ingest_folder
from sslpipe.stores import cosmos, sqlite
from sslpipe.stores.local_blob import LocalFolderBlobStore
from sslpipe.stores.sqlite import SQLiteMetadataStore
from tests.conftest import DocumentMaker, ImageMaker

ROOT = Path(__file__).resolve().parents[2]

# The local Cosmos DB-compatible server's certificate is self-signed; loopback only (by design).
pytestmark = pytest.mark.filterwarnings("ignore:Unverified HTTPS request is being made to host")

# Label text a person, another tool or an attacker may put in a document.
HOSTILE = [
    "it's",
    'say "hi"',
    "' OR '1'='1",
    '" OR 1=1 --',
    "A'); DROP TABLE documents; --",
    "SELECT VALUE c FROM c",
    "@prefixes",
    "%",
    "_",
    "back\\slash",
    "A\x1fB",  # the SQLite store's level terminator
    "A\x1e",  # and its escape character
    "tab\there",
    "Ä",
    "ä",
    "日本",
    "🛁",
    "e\u0301",  # e + combining acute: not the same text as é
    "é",
]
COMMON = ["A", "B", "A\x1fB", "it's", "日本"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sslpipe", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=False,
        timeout=120,
    )


def _folder(tmp_path: Path, make_image: ImageMaker, *names: str) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    for name in names:
        (photos / name).write_bytes(make_image())
    return photos


# --- ingest: bad lines refuse the file, naming the line ---------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"id": "b.jpeg", "sortout": "K\xe4ep"}', r"docs\.jsonl:2: not valid UTF-8 \(byte 0xe4"),
        (b'{"id": "b.jpeg", "sortout": "\xff\xfe"}', r"docs\.jsonl:2: not valid UTF-8 \(byte 0xff"),
        (b'{"id": "b.jpeg", "sortout": "\\ud800"}', r"docs\.jsonl:2: .*unpaired surrogate"),
        (b'{"id": "\\udfff.jpeg"}', r"docs\.jsonl:2: .*unpaired surrogate"),
        (b'{"id": "b.jpeg", "score": NaN}', r"docs\.jsonl:2: not valid JSON \(NaN"),
        (b'{"id": "b.jpeg", "score": -Infinity}', r"docs\.jsonl:2: not valid JSON"),
        (b'{"id": "b.jpeg", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", r"docs\.jsonl:2:"),
        (b'{"id": ""}', r"docs\.jsonl:2: the document has no string 'id'"),
        (b'{"id": ["b.jpeg"]}', r"docs\.jsonl:2: the document has no string 'id'"),
        (b'{"id": "a.jpeg"}', r"docs\.jsonl:2: the id 'a\.jpeg' occurs more than once \(.*:1\)"),
        (
            b'{"id": "./a.jpeg"}',
            r"docs\.jsonl:2: the id '\./a\.jpeg' names the same blob 'a\.jpeg'",
        ),
        (b'{"id": "a.jpeg/"}', r"docs\.jsonl:2: the id 'a\.jpeg/' names the same blob"),
    ],
)
def test_a_bad_line_refuses_the_file_with_its_line_and_reason_and_writes_nothing(
    tmp_path: Path, make_image: ImageMaker, line: bytes, message: str
) -> None:
    photos = _folder(tmp_path, make_image, "a.jpeg", "b.jpeg")
    (tmp_path / "docs.jsonl").write_bytes(b'{"id": "a.jpeg"}\n' + line + b"\n")
    done = _cli(
        "ingest", "--images", "photos", "--documents", "docs.jsonl",
        "--set", "workspace=ws", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    with SQLiteMetadataStore(tmp_path / "ws" / "metadata.db") as store:
        assert store.count() == 0
    container = tmp_path / "ws" / "blobs" / "images"
    assert not container.exists() or not any(container.iterdir())
    assert sorted(p.name for p in photos.iterdir()) == ["a.jpeg", "b.jpeg"]


def test_a_byte_order_mark_at_the_start_is_accepted(
    tmp_path: Path, make_image: ImageMaker, make_document: DocumentMaker
) -> None:
    photos = _folder(tmp_path, make_image, "a.jpeg")
    documents = tmp_path / "docs.jsonl"
    documents.write_bytes(b"\xef\xbb\xbf" + json.dumps(make_document("a.jpeg")).encode() + b"\n")
    with SQLiteMetadataStore(tmp_path / "metadata.db") as store:
        report = ingest_folder(photos, documents, store, LocalFolderBlobStore(tmp_path / "c"))
        assert report.created == 1 and store.get("a.jpeg") == make_document("a.jpeg")


def test_a_bom_after_the_first_line_is_not_valid_json(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    documents = tmp_path / "docs.jsonl"
    documents.write_bytes(b'{"id": "a.jpeg"}\n\xef\xbb\xbf{"id": "b.jpeg"}\n')
    with (
        SQLiteMetadataStore(tmp_path / "metadata.db") as store,
        pytest.raises(IngestError, match=r"docs\.jsonl:2: not valid JSON"),
    ):
        ingest_folder(tmp_path / "photos", documents, store, LocalFolderBlobStore(tmp_path))


# --- ingest: documents with wrong fields are skipped and reported, the others stored ---------

INVALID = {
    # id: (document fields, expected reason)
    "blurred-string.jpeg": ({"is_blurred": "yes"}, "invalid:is_blurred"),
    "blurred-int.jpeg": ({"is_blurred": 1}, "invalid:is_blurred"),
    "review-string.jpeg": ({"has_review": "true"}, "invalid:has_review"),
    "sortout-number.jpeg": ({"sortout": 3}, "invalid:sortout"),
    "labels-string.jpeg": ({"labels_with_taxonomy": "Even/2"}, "invalid:labels_with_taxonomy"),
    "labels-number.jpeg": ({"labels_with_taxonomy": [5]}, "invalid:labels_with_taxonomy"),
    "empty-path.jpeg": (
        {"labels_with_taxonomy": [{"annotator_id": 701, "taxonomy": [[]]}]},
        "invalid:labels_with_taxonomy",
    ),
    "empty-level.jpeg": (
        {"labels_with_taxonomy": [{"annotator_id": 701, "taxonomy": [["Even", ""]]}]},
        "invalid:labels_with_taxonomy",
    ),
    "level-number.jpeg": (
        {"labels_with_taxonomy": [{"annotator_id": 701, "taxonomy": [["Even", 2]]}]},
        "invalid:labels_with_taxonomy",
    ),
    "no-annotator.jpeg": (
        {"labels_with_taxonomy": [{"taxonomy": [["Even", "2"]]}]},
        "invalid:labels_with_taxonomy",
    ),
    "total-text.jpeg": ({"total_annotations": "two"}, "invalid:total_annotations"),
}
VALID = {
    "only-id.jpeg": {},  # every other field is optional
    "nulls.jpeg": {"is_blurred": None, "sortout": None, "labels_with_taxonomy": None},
    "unknown-label.jpeg": {  # a label no taxonomy knows is just a label
        "sortout": "Keep",
        "labels_with_taxonomy": [{"annotator_id": "x@example.com", "taxonomy": [["Nowhere", "?"]]}],
    },
    "extra-fields.jpeg": {"sortout": "Keep", "camera": {"model": "X"}, "tags": [1, "a", None]},
    **{
        f"hostile-{index}.jpeg": {
            "sortout": "Keep",
            "labels_with_taxonomy": [{"annotator_id": text, "taxonomy": [[text, text]]}],
            "note": text,
        }
        for index, text in enumerate(HOSTILE)
    },
}


def test_documents_with_wrong_fields_are_reported_by_line_and_the_rest_is_stored(
    tmp_path: Path, make_image: ImageMaker
) -> None:
    documents = [{"id": k, **v[0]} for k, v in INVALID.items()] + [
        {"id": k, **v} for k, v in VALID.items()
    ]
    _folder(tmp_path, make_image, *(d["id"] for d in documents))
    lines = {d["id"]: number for number, d in enumerate(documents, start=1)}
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents), encoding="utf-8"
    )
    done = _cli(
        "ingest", "--images", "photos", "--documents", "docs.jsonl",
        "--set", "workspace=ws", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]  # some documents were skipped
    assert "Traceback" not in done.stderr
    summary = json.loads(done.stdout)
    assert summary["documents"]["created"] == len(VALID)
    reported = {item["item"]: item for item in summary["skipped_items"]}
    assert set(reported) == set(INVALID)
    for doc_id, (_, reason) in INVALID.items():
        assert reported[doc_id]["reason"] == reason
        assert reported[doc_id]["detail"].startswith(f"docs.jsonl:{lines[doc_id]}: document "), (
            reported[doc_id]
        )
    assert sum(summary["skipped"].values()) == len(INVALID)
    with SQLiteMetadataStore(tmp_path / "ws" / "metadata.db") as store:
        assert store.count() == len(VALID)
        for doc_id, fields in VALID.items():
            assert store.get(doc_id) == {"id": doc_id, **fields}  # stored verbatim
        for doc_id in INVALID:
            assert store.get(doc_id) is None
    stored_blobs = {p.name for p in (tmp_path / "ws" / "blobs" / "images").iterdir()}
    assert stored_blobs == set(VALID)
    # What ingest reports invalid is what connect_db would have dropped.
    assert all(validate_document({"id": k, **v[0]})[1] == v[1] for k, v in INVALID.items())


# --- filters with hostile label strings: the right selection, never a changed query ----------


def _paths(document: dict[str, Any]) -> list[TaxonomyPath]:
    annotations = document.get("labels_with_taxonomy")
    found: list[TaxonomyPath] = []
    for annotation in annotations if isinstance(annotations, list) else []:
        taxonomy = annotation.get("taxonomy") if isinstance(annotation, dict) else None
        for path in taxonomy if isinstance(taxonomy, list) else []:
            if isinstance(path, list) and path and all(isinstance(p, str) for p in path):
                found.append(tuple(path))
    return found


def _annotators(document: dict[str, Any]) -> set[str]:
    annotations = document.get("labels_with_taxonomy")
    items = annotations if isinstance(annotations, list) else []
    return {str(a.get("annotator_id")) for a in items if isinstance(a, dict)}


def expected_ids(documents: list[dict[str, Any]], image_filter: ImageFilter) -> list[str]:
    """The filter evaluated in plain Python, by its documented meaning (sslpipe/core/filters.py):
    only true JSON booleans and strings count, a prefix matches a path's first levels."""

    def starts(path: TaxonomyPath, prefixes: list[TaxonomyPath]) -> bool:
        return any(path[: len(prefix)] == prefix for prefix in prefixes)

    selected = []
    for doc in sorted(documents, key=lambda d: d["id"]):
        paths, annotators = _paths(doc), _annotators(doc)
        sortout = doc.get("sortout")
        if image_filter.exclude_blurred and doc.get("is_blurred") is True:
            continue
        if image_filter.sortout is not None and not (
            isinstance(sortout, str) and sortout in image_filter.sortout
        ):
            continue
        if image_filter.labelled == "labelled" and not annotators:
            continue
        if image_filter.labelled == "unlabelled" and annotators:
            continue
        if len(annotators) < image_filter.min_annotators:
            continue
        if image_filter.require_review and doc.get("has_review") is not True:
            continue
        if image_filter.include_labels and not any(
            starts(p, image_filter.include_labels) for p in paths
        ):
            continue
        if any(starts(p, image_filter.exclude_labels) for p in paths):
            continue
        selected.append(doc["id"])
    return selected[: image_filter.limit]


levels = st.one_of(st.sampled_from(COMMON), st.sampled_from(HOSTILE))
paths = st.lists(levels, min_size=1, max_size=3)
annotations = st.fixed_dictionaries(
    {
        "annotator_id": st.sampled_from([701, "701", "anna@example.com", "O'Brien", "' OR 1=1"]),
        "taxonomy": st.lists(paths, max_size=3),
    }
)
SORTOUTS = ["Keep", "Sort Out", "' OR '1'='1", "Keep' --", "日本"]
bodies = st.fixed_dictionaries(
    {
        "id_prefix": st.sampled_from(["a", "B", "'", '"', "ä", "日", "🛁", "x; DROP"]),
        "is_blurred": st.sampled_from([False, False, True, None]),
        "has_review": st.sampled_from([False, True, None]),
        "sortout": st.sampled_from([*SORTOUTS, "Keep", "Keep", None]),
        "labels_with_taxonomy": st.lists(annotations, max_size=3),
    }
)
filters = st.builds(
    ImageFilter,
    exclude_blurred=st.booleans(),
    sortout=st.sampled_from([None, ["Keep"], ["' OR '1'='1"], ["Keep' --", "日本"], SORTOUTS]),
    labelled=st.sampled_from(["any", "any", "labelled", "unlabelled"]),
    include_labels=st.lists(st.lists(levels, min_size=1, max_size=2), max_size=2),
    exclude_labels=st.lists(st.lists(levels, min_size=1, max_size=2), max_size=2),
    min_annotators=st.sampled_from([0, 0, 1, 2]),
    require_review=st.sampled_from([False, False, True]),
    limit=st.one_of(st.none(), st.integers(min_value=1, max_value=6)),
)


def _documents(drawn: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{body['id_prefix']}-{index:02d}",
            **{k: v for k, v in body.items() if k != "id_prefix"},
        }
        for index, body in enumerate(drawn)
    ]


def test_a_label_with_the_level_terminator_is_not_two_levels(tmp_path: Path) -> None:
    """["A\\x1fB"] is one level: the prefix ["A"] or the path ["A", "B"] must not select it."""
    annotation = {"annotator_id": 1, "taxonomy": [["A\x1fB"]]}
    document = {"id": "x", "sortout": "Keep", "labels_with_taxonomy": [annotation]}
    with SQLiteMetadataStore(tmp_path / "m.db") as store:
        store.upsert([document])
        for prefix, hit in ((["A"], False), (["A", "B"], False), (["A\x1fB"], True)):
            selected = [d["id"] for d in store.select(ImageFilter(include_labels=[prefix]))]
            assert selected == (["x"] if hit else []), prefix


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=st.lists(bodies, min_size=1, max_size=15), image_filters=st.lists(filters, max_size=4))
def test_sqlite_selects_what_the_filter_means(
    drawn: list[dict[str, Any]], image_filters: list[ImageFilter]
) -> None:
    documents = _documents(drawn)
    with SQLiteMetadataStore(Path(":memory:")) as store:
        store.upsert(documents)
        assert store.count() == len(documents)
        for image_filter in image_filters:
            selected = [d["id"] for d in store.select(image_filter)]
            assert selected == expected_ids(documents, image_filter), image_filter
        for document in documents:  # stored verbatim, quotes and all
            assert store.get(document["id"]) == document


def _shape(image_filter: ImageFilter, text: str) -> ImageFilter:
    """The same filter with every label level and sortout value replaced by ``text``."""
    return image_filter.model_copy(
        update={
            "include_labels": [tuple(text for _ in p) for p in image_filter.include_labels],
            "exclude_labels": [tuple(text for _ in p) for p in image_filter.exclude_labels],
            "sortout": None if image_filter.sortout is None else [text] * len(image_filter.sortout),
        }
    )


@settings(max_examples=60, deadline=None)
@given(image_filter=filters, text=st.sampled_from(HOSTILE))
def test_label_values_never_change_the_query_text(image_filter: ImageFilter, text: str) -> None:
    plain = _shape(image_filter, "plain")
    hostile = _shape(image_filter, text)
    sql_plain, params_plain = sqlite.compile_filter(plain)
    sql_hostile, params_hostile = sqlite.compile_filter(hostile)
    assert sql_hostile == sql_plain and len(params_hostile) == len(params_plain)
    for use_udf in (False, True):
        cosmos_plain, values_plain = cosmos.compile_filter(plain, use_udf=use_udf)
        cosmos_hostile, values_hostile = cosmos.compile_filter(hostile, use_udf=use_udf)
        assert cosmos_hostile == cosmos_plain
        assert [v["name"] for v in values_hostile] == [v["name"] for v in values_plain]
        if text not in ("%", "_", "A", "B"):  # short texts occur in SQL keywords by chance
            assert text not in cosmos_hostile


# --- the same on the Cosmos DB-compatible server ----------------------------------------------


@pytest.fixture(scope="module")
def cosmos_stores(cosmos_server: dict[str, str]) -> Iterator[dict[str, cosmos.CosmosMetadataStore]]:
    database = f"test-bad-metadata-{uuid.uuid4().hex[:8]}"
    endpoint, key = cosmos_server["endpoint"], cosmos_server["key"]
    sql = cosmos.CosmosMetadataStore(endpoint, database, "documents", credential=key)
    udf = cosmos.CosmosMetadataStore(endpoint, database, "documents", credential=key, use_udf=True)
    cosmos.install_udf(udf)
    yield {"sql": sql, "udf": udf}
    sql._client.delete_database(database)
    sql.close()
    udf.close()


@pytest.mark.servers
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(drawn=st.lists(bodies, min_size=1, max_size=12), image_filters=st.lists(filters, max_size=3))
def test_cosmos_selects_what_the_filter_means(
    cosmos_stores: dict[str, cosmos.CosmosMetadataStore],
    drawn: list[dict[str, Any]],
    image_filters: list[ImageFilter],
) -> None:
    documents = _documents(drawn)
    store = cosmos_stores["sql"]
    container = store._container
    for doc_id in list(
        container.query_items("SELECT VALUE c.id FROM c", enable_cross_partition_query=True)
    ):
        container.delete_item(str(doc_id), partition_key=str(doc_id))
    store.upsert(documents)
    assert store.count() == len(documents)
    for image_filter in [*image_filters, ImageFilter(sortout=SORTOUTS, include_labels=[COMMON[2]])]:
        expected = expected_ids(documents, image_filter)
        for mode, opened in cosmos_stores.items():
            selected = [d["id"] for d in opened.select(image_filter)]
            assert selected == expected, (mode, image_filter)
    for document in documents:
        assert store.get(document["id"]) == document


# --- labels with such text travel unchanged through connect_db and data_prep -----------------

TRICKY_LABELS = [
    "it's",
    'say "hi", ok',
    "' OR '1'='1",
    "DROP TABLE documents; --",
    "line\nbreak",
    "日本 🛁",
    "NaN",
    "null",
    " padded ",
    "A\x1fB",
]


def test_hostile_labels_reach_the_id_list_and_manifest_unchanged(
    tiny_catalog: Any, make_document: DocumentMaker
) -> None:
    from sslpipe.core.config import LabelsConfig
    from sslpipe.core.io import read_csv
    from sslpipe.steps.connect_db import run_connect_db
    from sslpipe.steps.data_prep import run_data_prep

    catalog_root: Path = tiny_catalog.root
    expected: dict[str, str] = {}
    documents = []
    for c, label in enumerate(TRICKY_LABELS):
        for i in range(5):
            doc_id = f"tricky-{c:02d}-{i}.jpeg"
            documents.append(make_document(doc_id, (701, [label, "leaf"]), (702, [label])))
            expected[doc_id] = label
    invalid = [
        make_document("bad-blurred.jpeg", (701, ["it's"]), is_blurred="yes"),
        make_document("bad-path.jpeg", (701, ["it's", ""])),
    ]
    tiny_catalog.add(*documents, *invalid)
    only_tricky = ImageFilter(exclude_labels=[["Even"], ["Odd"]])
    stats = run_connect_db(
        metadata_uri=tiny_catalog.metadata_uri,
        blob_uri=tiny_catalog.blob_uri,
        image_filter=only_tricky,
        output_dir=catalog_root / "ids",
        mode="labelled",
        labels=LabelsConfig(level=1, balance="none"),
    )
    assert stats["dropped"]["invalid:is_blurred"] == 1
    assert stats["dropped"]["invalid:labels_with_taxonomy"] == 1
    ids = read_csv(catalog_root / "ids" / "ids.csv")
    assert dict(zip(ids["id"], ids["label"], strict=True)) == expected
    label_map = json.loads((catalog_root / "ids" / "labels.json").read_text(encoding="utf-8"))
    assert label_map["classes"] == sorted(TRICKY_LABELS)
    run_data_prep(
        ids_dir=catalog_root / "ids",
        blob_uri=tiny_catalog.blob_uri,
        output_dir=catalog_root / "data",
        image_size=16,
        concurrency=2,
    )
    manifest = read_csv(catalog_root / "data" / "manifest.csv")
    assert dict(zip(manifest["id"], manifest["label"], strict=True)) == expected
