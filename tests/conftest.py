"""Small shared fixtures: image bytes and a tiny catalog (SQLite store + local blob folder)."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sslpipe.stores.local_blob import LocalFolderBlobStore
from sslpipe.stores.sqlite import SQLiteMetadataStore

ROOT = Path(__file__).resolve().parent.parent

ImageMaker = Callable[..., bytes]
DocumentMaker = Callable[..., dict[str, Any]]


def _image_bytes(
    size: tuple[int, int] = (40, 30),
    color: Any = (200, 40, 10),
    *,
    mode: str = "RGB",
    fmt: str = "JPEG",
    **save_args: Any,
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def _document(
    doc_id: str,
    *labels: tuple[Any, list[str]],
    is_blurred: bool | None = False,
    sortout: str | None = "Keep",
    has_review: bool | None = False,
    **extra: Any,
) -> dict[str, Any]:
    """A seed-schema document; ``labels`` are ``(annotator_id, taxonomy_path)`` pairs."""
    annotations: dict[Any, list[list[str]]] = {}
    for annotator, path in labels:
        annotations.setdefault(annotator, []).append(list(path))
    return {
        "id": doc_id,
        "file_hash": f"hash-{doc_id}",
        "is_blurred": is_blurred,
        "sortout": sortout,
        "has_review": has_review,
        "labels_with_taxonomy": [
            {"annotator_id": a, "taxonomy": paths} for a, paths in annotations.items()
        ],
        "total_annotations": len(annotations),
        **extra,
    }


@pytest.fixture
def make_image() -> ImageMaker:
    """``make_image(size=(w, h), color=..., mode="RGB", fmt="JPEG")`` -> encoded bytes."""
    return _image_bytes


@pytest.fixture
def make_document() -> DocumentMaker:
    """``make_document("id", (annotator, ["A", "B"]), ..., is_blurred=..., sortout=...)``."""
    return _document


@dataclass
class TinyCatalog:
    """A SQLite metadata store and a local blob folder holding a handful of images."""

    root: Path
    db_path: Path
    blob_dir: Path
    documents: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metadata_uri(self) -> str:
        return f"sqlite:///{self.db_path}"

    @property
    def blob_uri(self) -> str:
        return self.blob_dir.as_uri()

    def add(self, *documents: dict[str, Any]) -> None:
        """Store documents, each with a 40x30 JPEG blob named by its id."""
        blobs = LocalFolderBlobStore(self.blob_dir)
        for doc in documents:
            blobs.write_sync(doc["id"], _image_bytes())
        with SQLiteMetadataStore(self.db_path) as store:
            store.upsert(documents)
        self.documents.extend(documents)


@pytest.fixture
def tiny_catalog(tmp_path: Path) -> TinyCatalog:
    """Six images: two labelled (one by two agreeing annotators), a tie, an unlabelled one, a
    blurred one and a sorted-out one; blob container ``images``."""
    catalog = TinyCatalog(
        root=tmp_path, db_path=tmp_path / "db" / "metadata.db", blob_dir=tmp_path / "images"
    )
    catalog.add(
        _document("a.jpeg", (701, ["Even", "2"]), (702, ["Even", "2"])),
        _document("b.jpeg", (701, ["Odd", "3"])),
        _document("c.jpeg"),
        _document("d.jpeg", (701, ["Odd", "5"]), is_blurred=True),
        _document("e.jpeg", (702, ["Even", "4"]), sortout="Sort Out"),
        _document("f.jpeg", (701, ["Even", "4"]), (702, ["Odd", "5"])),
    )
    return catalog


# --- the local servers (infra/servers.py) ------------------------------------------------------


def _servers_module() -> Any:
    name = "sslpipe_infra_servers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "infra" / "servers.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _started(server: str) -> dict[str, str]:
    """Install (pinned, once) and start one local server; its endpoint and credentials.

    Servers that are already up (``bash scripts/test.sh`` starts all three before pytest) are
    reused. ``SSLPIPE_SKIP_SERVERS=1`` skips the tests that need them, for a quick inner loop;
    the test command never sets it.
    """
    if os.environ.get("SSLPIPE_SKIP_SERVERS") == "1":
        pytest.skip("SSLPIPE_SKIP_SERVERS=1: tests against the local servers are skipped")
    servers = _servers_module()
    try:
        servers.start([server])
    except servers.ServerError as err:
        pytest.fail(f"the local {server} server could not be started: {err}", pytrace=False)
    info: dict[str, str] = servers.connection_info()[server]
    return info


@pytest.fixture(scope="session")
def azurite() -> dict[str, str]:
    """Azurite: ``blob_endpoint``, ``account_name``, ``account_key``, ``connection_string``."""
    return _started("azurite")


@pytest.fixture(scope="session")
def cosmos_server() -> dict[str, str]:
    """The Cosmos DB-compatible server: ``endpoint`` (https, self-signed) and ``key``."""
    return _started("cosmos")


@pytest.fixture(scope="session")
def label_studio() -> dict[str, str]:
    """Label Studio: ``url``, ``token`` (the preset admin's API token) and ``user``."""
    return _started("labelstudio")
