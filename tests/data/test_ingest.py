"""``python -m sslpipe ingest``: a folder of images plus a JSON-lines file of documents."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sslpipe.data.ingest import IngestError, ingest_folder, validate_documents
from sslpipe.stores.local_blob import LocalFolderBlobStore
from sslpipe.stores.sqlite import SQLiteMetadataStore
from tests.conftest import DocumentMaker, ImageMaker

ROOT = Path(__file__).resolve().parents[2]


def _write_catalog(
    folder: Path, documents: list[dict[str, Any]], images: dict[str, bytes]
) -> tuple[Path, Path]:
    images_dir = folder / "photos"
    images_dir.mkdir(parents=True)
    for name, data in images.items():
        (images_dir / name).write_bytes(data)
    documents_path = folder / "metadata.jsonl"
    documents_path.write_text("".join(json.dumps(d) + "\n" for d in documents), encoding="utf-8")
    return images_dir, documents_path


def test_ingest_uploads_the_images_then_upserts_their_documents(
    tmp_path: Path, make_document: DocumentMaker, make_image: ImageMaker
) -> None:
    docs = [make_document(f"{i}.jpeg", (701, ["Even", "2"])) for i in range(5)]
    images_dir, documents = _write_catalog(
        tmp_path, docs, {d["id"]: make_image(color=(i, 0, 0)) for i, d in enumerate(docs)}
    )
    blobs = LocalFolderBlobStore(tmp_path / "container")
    with SQLiteMetadataStore(tmp_path / "metadata.db") as store:
        report = ingest_folder(images_dir, documents, store, blobs, concurrency=2)
        assert (report.created, report.updated, report.unchanged) == (5, 0, 0)
        assert report.blobs_written == 5 and not report.skipped
        assert store.get("3.jpeg") == docs[3]
        again = ingest_folder(images_dir, documents, store, blobs)
        assert (again.created, again.updated, again.unchanged) == (0, 0, 5)
    assert asyncio.run(blobs.read("2.jpeg")) == (images_dir / "2.jpeg").read_bytes()


def test_documents_without_a_usable_image_are_skipped_and_reported(
    tmp_path: Path, make_document: DocumentMaker, make_image: ImageMaker
) -> None:
    docs = [make_document(name) for name in ("ok.jpeg", "gone.jpeg", "empty.jpeg", "../up.jpeg")]
    images_dir, documents = _write_catalog(
        tmp_path, docs, {"ok.jpeg": make_image(), "empty.jpeg": b""}
    )
    (tmp_path / "up.jpeg").write_bytes(make_image())  # exists, but outside the images folder
    with SQLiteMetadataStore(tmp_path / "metadata.db") as store:
        report = ingest_folder(
            images_dir, documents, store, LocalFolderBlobStore(tmp_path / "container")
        )
        assert store.count() == 1 and store.get("ok.jpeg") is not None
    assert dict(report.skipped) == {"empty_image": 1, "missing_image": 1, "unsafe_name": 1}
    assert {item["item"] for item in report.skipped_items} == {
        "gone.jpeg",
        "empty.jpeg",
        "../up.jpeg",
    }
    assert [p.name for p in (tmp_path / "container").iterdir()] == ["ok.jpeg"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": "a.jpeg"}\n{"id": \n', "metadata.jsonl:2: not valid JSON"),
        ('["a.jpeg"]\n', "metadata.jsonl:1: expected a JSON object"),
        ('{"id": "a.jpeg"}\n\n{"file_hash": "x"}\n', "metadata.jsonl:3: the document has no"),
        ('{"id": 7}\n', "metadata.jsonl:1: the document has no string 'id'"),
        ('{"id": "a.jpeg"}\n{"id": "a.jpeg"}\n', "the id 'a.jpeg' occurs more than once"),
    ],
)
def test_a_bad_documents_file_is_refused_before_anything_is_written(
    tmp_path: Path, make_image: ImageMaker, content: str, message: str
) -> None:
    images_dir, documents = _write_catalog(tmp_path, [], {"a.jpeg": make_image()})
    documents.write_text(content, encoding="utf-8")
    with SQLiteMetadataStore(tmp_path / "metadata.db") as store:
        with pytest.raises(IngestError, match=message.replace("(", r"\(")):
            ingest_folder(images_dir, documents, store, LocalFolderBlobStore(tmp_path / "c"))
        assert store.count() == 0
    assert not list((tmp_path / "c").iterdir())


def test_validate_counts_the_documents(tmp_path: Path, make_document: DocumentMaker) -> None:
    _, documents = _write_catalog(tmp_path, [make_document("a"), make_document("b")], {})
    assert validate_documents(documents) == 2


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sslpipe", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_the_ingest_command_loads_into_the_configured_stores(
    tmp_path: Path, make_document: DocumentMaker, make_image: ImageMaker
) -> None:
    docs = [make_document("a.jpeg", (701, ["Odd", "3"])), make_document("b.jpeg")]
    images_dir, documents = _write_catalog(
        tmp_path, docs, {"a.jpeg": make_image(), "b.jpeg": make_image()}
    )
    done = _cli(
        "ingest", "--images", str(images_dir), "--documents", str(documents),
        "--set", f"workspace={tmp_path / 'ws'}", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["documents"] == {"created": 2, "updated": 0, "unchanged": 0}
    assert summary["metadata_uri"] == f"sqlite:///{tmp_path / 'ws' / 'metadata.db'}"
    with SQLiteMetadataStore(tmp_path / "ws" / "metadata.db") as store:
        assert store.get("a.jpeg") == docs[0]
    assert (tmp_path / "ws" / "blobs" / "images" / "b.jpeg").is_file()


def test_the_ingest_command_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "docs.jsonl").write_text("{oops\n")
    done = _cli(
        "ingest", "--images", "photos", "--documents", "docs.jsonl",
        "--set", "workspace=ws", cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: docs.jsonl:1: not valid JSON (Expecting property name enclosed in double quotes)"
    ]


def test_install_udf_refuses_a_store_that_is_not_cosmos(tmp_path: Path) -> None:
    done = _cli("install-udf", "--set", "workspace=ws", cwd=tmp_path)
    assert done.returncode == 2
    assert "install-udf needs a Cosmos DB metadata store" in done.stderr
