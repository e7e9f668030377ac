"""The embedded metadata store: documents in one SQLite file, with indexed filter columns.

Filters never scan JSON text: the fields they test are kept in indexed columns, and taxonomy
paths in their own indexed table, so a prefix match is an index range scan.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sslpipe.core.filters import ImageFilter, TaxonomyPath
from sslpipe.stores.base import MetadataStore, StoreError, UpsertReport

# A level terminator, so that the prefix "A" never matches a path starting with "AB". Label text
# from other systems may contain it (or the escape character): inside a level both are escaped,
# so every encoded level is a prefix-free code word and ["A\x1fB"] never reads as ["A", "B"].
_LEVEL_END = "\x1f"
_ESCAPE = "\x1e"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    is_blurred INTEGER,
    sortout TEXT,
    has_review INTEGER,
    n_annotators INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS documents_filter ON documents (sortout, is_blurred, n_annotators);
CREATE TABLE IF NOT EXISTS label_paths (
    doc_id TEXT NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    PRIMARY KEY (doc_id, path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS label_paths_path ON label_paths (path, doc_id);
"""


def _escape_level(level: str) -> str:
    return level.replace(_ESCAPE, _ESCAPE + _ESCAPE).replace(_LEVEL_END, _ESCAPE + _LEVEL_END)


def encode_path(path: Iterable[str]) -> str:
    """``("A", "B")`` -> ``"A\\x1fB\\x1f"``: every level closed, so prefixes compare as strings
    (``\\x1e`` and ``\\x1f`` inside a level are escaped with ``\\x1e``)."""
    return "".join(f"{_escape_level(level)}{_LEVEL_END}" for level in path)


def _prefix_range(prefix: TaxonomyPath) -> tuple[str, str]:
    """The half-open string range [low, high) of encoded paths starting with ``prefix``."""
    low = encode_path(prefix)
    high = low[:-1] + chr(ord(_LEVEL_END) + 1)
    return low, high


def _bool_column(value: object) -> int | None:
    return int(value) if isinstance(value, bool) else None


def _index_columns(doc: dict[str, Any]) -> tuple[int | None, str | None, int | None, int, set[str]]:
    """Filter columns of a raw document, lenient about wrong types (validation comes later)."""
    annotations = doc.get("labels_with_taxonomy")
    annotators: set[str] = set()
    paths: set[str] = set()
    if isinstance(annotations, list | tuple):
        for annotation in annotations:
            if not isinstance(annotation, dict):
                continue
            annotators.add(str(annotation.get("annotator_id")))
            taxonomy = annotation.get("taxonomy")
            # Tuples too: json.dumps stores them as lists, so they must be indexed like lists.
            for path in taxonomy if isinstance(taxonomy, list | tuple) else []:
                is_path = isinstance(path, list | tuple) and all(isinstance(p, str) for p in path)
                if is_path and path:
                    paths.add(encode_path(path))
    sortout = doc.get("sortout")
    return (
        _bool_column(doc.get("is_blurred")),
        sortout if isinstance(sortout, str) else None,
        _bool_column(doc.get("has_review")),
        len(annotators),
        paths,
    )


def compile_filter(image_filter: ImageFilter) -> tuple[str, list[Any]]:
    """SQL text with ``?`` placeholders and its parameters. Values never enter the text."""
    where: list[str] = []
    params: list[Any] = []
    if image_filter.exclude_blurred:
        # Missing or mistyped is_blurred is not "known blurred"; the document is validated later.
        where.append("(d.is_blurred IS NULL OR d.is_blurred = 0)")
    if image_filter.sortout is not None:
        where.append(f"d.sortout IN ({', '.join('?' * len(image_filter.sortout)) or 'NULL'})")
        params.extend(image_filter.sortout)
    if image_filter.labelled == "labelled":
        where.append("d.n_annotators > 0")
    elif image_filter.labelled == "unlabelled":
        where.append("d.n_annotators = 0")
    if image_filter.min_annotators > 0:
        where.append("d.n_annotators >= ?")
        params.append(image_filter.min_annotators)
    if image_filter.require_review:
        where.append("d.has_review = 1")
    for negate, prefixes in (
        (False, image_filter.include_labels),
        (True, image_filter.exclude_labels),
    ):
        if not prefixes:
            continue
        ranges = " OR ".join("(l.path >= ? AND l.path < ?)" for _ in prefixes)
        if negate:
            where.append(
                f"NOT EXISTS (SELECT 1 FROM label_paths l WHERE l.doc_id = d.id AND ({ranges}))"
            )
        else:
            # Uncorrelated, so SQLite searches the path index for the (few) matching documents
            # and looks each up by id, instead of visiting every document (benchmark row 4).
            where.append(f"d.id IN (SELECT l.doc_id FROM label_paths l WHERE {ranges})")
        for prefix in prefixes:
            params.extend(_prefix_range(prefix))
    sql = "SELECT d.doc FROM documents d"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY d.id"
    if image_filter.limit is not None:
        sql += " LIMIT ?"
        params.append(image_filter.limit)
    return sql, params


class SQLiteMetadataStore(MetadataStore):
    """Metadata documents in a SQLite file (created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.uri = f"sqlite:///{self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as err:
            raise StoreError(
                f"cannot open the SQLite metadata store at {self.path}: {err}"
            ) from err

    def upsert(self, documents: Iterable[dict[str, Any]]) -> UpsertReport:
        created = updated = unchanged = 0
        with self._db:
            for doc in documents:
                doc_id = doc.get("id") if isinstance(doc, dict) else None
                if not isinstance(doc_id, str) or not doc_id:
                    raise ValueError(f"cannot store a document without a string 'id': {doc!r:.200}")
                text = json.dumps(doc, sort_keys=True, ensure_ascii=False)
                row = self._db.execute(
                    "SELECT doc FROM documents WHERE id = ?", (doc_id,)
                ).fetchone()
                if row is not None and row[0] == text:
                    unchanged += 1
                    continue
                created, updated = (created + 1, updated) if row is None else (created, updated + 1)
                self._write(doc_id, doc, text)
        return UpsertReport(created=created, updated=updated, unchanged=unchanged)

    def _write(self, doc_id: str, doc: dict[str, Any], text: str) -> None:
        is_blurred, sortout, has_review, n_annotators, paths = _index_columns(doc)
        self._db.execute(
            "INSERT OR REPLACE INTO documents"
            " (id, doc, is_blurred, sortout, has_review, n_annotators) VALUES (?, ?, ?, ?, ?, ?)",
            (doc_id, text, is_blurred, sortout, has_review, n_annotators),
        )
        self._db.execute("DELETE FROM label_paths WHERE doc_id = ?", (doc_id,))
        self._db.executemany(
            "INSERT INTO label_paths (doc_id, path) VALUES (?, ?)", [(doc_id, p) for p in paths]
        )

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    def get(self, doc_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT doc FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def select(self, image_filter: ImageFilter) -> Iterator[dict[str, Any]]:
        sql, params = compile_filter(image_filter)
        for (text,) in self._db.execute(sql, params):
            yield json.loads(text)

    def close(self) -> None:
        self._db.close()
