"""The Azure Cosmos DB metadata store: one JSON document per image, selected with Cosmos SQL.

``cosmos://<host>[:port]/<database>/<container>[?filter=udf]`` opens it
(:mod:`sslpipe.stores.cosmos_location`). The key comes from ``SSLPIPE_COSMOS_KEY``; without it
``DefaultAzureCredential`` is used (the managed identity on Azure ML). TLS certificates are
verified for every host except the loopback names (127.0.0.1, ::1, localhost), where the local
emulator serves a self-signed certificate.

Filters compile to Cosmos SQL whose values travel only as query parameters
(:func:`sslpipe.stores.cosmos_query.compile_filter`, where the query's shape is explained); the
SDK's retries are set by :class:`sslpipe.stores.cosmos_retry.RetrySettings`.

``select`` is one query for the matching documents, read page by page into a temporary SQLite
file that returns them in id order (code point order, as the SQLite store's BINARY collation)
and applies ``limit``: memory holds one page, not the selection, and the server evaluates the
filter once. (Selecting ids first and then reading the documents by id in chunks made the
server evaluate ``ARRAY_CONTAINS(@ids, c.id)`` against every document once per chunk: 34 s for
8,224 of 10,000 documents on the test server, against 4 s for reading them all, in the
benchmark of 2026-12-02; one query takes 2.6 s where reading them all takes 1.2 s, in that of
2026-12-03.)

The Cosmos-compatible test server (npm ``@vercel/cosmosdb-server`` 1.0.1):

- it ignores the key (any key is accepted), and numbers are JavaScript numbers: an annotator id
  ``701.0`` reads back as ``701`` (one annotator with ``701``, unlike SQLite's "701.0");
  annotator ids that are lists or objects compare by their JSON text (SQLite: Python's repr);
- it closes the connection after every response, so unverified connections share one TLS
  context (:func:`_unverified_transport`) instead of loading the CA bundle per request;
- the SDK itself never verifies certificates of "localhost" and "127.0.0.1" (but does for ::1).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import ssl
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from azure.core.exceptions import AzureError
from azure.cosmos import ContainerProxy, CosmosClient, PartitionKey
from azure.cosmos.exceptions import (
    CosmosResourceExistsError,
    CosmosResourceNotFoundError,
)

from sslpipe.core.filters import ImageFilter
from sslpipe.core.uris import redact_uri
from sslpipe.stores.base import MetadataStore, StoreError, UpsertReport
from sslpipe.stores.cosmos_location import (
    FILTER_MODES,
    KEY_ENV,
    LOOPBACK_HOSTS,
    URI_FORM,
    CosmosLocation,
    parse_cosmos_uri,
    verify_tls_for,
)
from sslpipe.stores.cosmos_query import compile_filter
from sslpipe.stores.cosmos_retry import RetrySettings, error_reason
from sslpipe.stores.cosmos_udf import UDF_BODY, UDF_ID

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

    Credential = str | TokenCredential

__all__ = [
    "FILTER_MODES",
    "KEY_ENV",
    "LOOPBACK_HOSTS",
    "PARTITION_KEY_PATH",
    "SYSTEM_FIELDS",
    "URI_FORM",
    "CosmosLocation",
    "CosmosMetadataStore",
    "RetrySettings",
    "compile_filter",
    "in_id_order",
    "install_udf",
    "parse_cosmos_uri",
    "strip_system_fields",
    "verify_tls_for",
]

log = logging.getLogger(__name__)

SYSTEM_FIELDS = ("_rid", "_self", "_etag", "_attachments", "_ts")
PARTITION_KEY_PATH = "/id"


# Documents per read query in upsert (ids travel in one ARRAY_CONTAINS parameter), and the
# page size of queries.
_CHUNK = 100
_PAGE = 1000

_T = TypeVar("_T")

# Unverified HTTPS is deliberate for the loopback emulator only; urllib3 would warn per request.
warnings.filterwarnings(
    "ignore",
    message=r"Unverified HTTPS request is being made to host '(127\.0\.0\.1|::1|localhost)'",
)

# --- documents ---------------------------------------------------------------------------------


def strip_system_fields(document: dict[str, Any]) -> dict[str, Any]:
    """The document without Cosmos DB's system properties (``_rid``, ``_etag``, ...)."""
    return {k: v for k, v in document.items() if k not in SYSTEM_FIELDS}


def _normalized(value: Any) -> Any:
    """JSON value as the server keeps it: tuples are lists, integral floats are integers."""
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalized(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _canonical(document: dict[str, Any]) -> str:
    """Canonical text of a document for change detection (key order ignored)."""
    return json.dumps(_normalized(document), sort_keys=True, ensure_ascii=False)


def _document_id(document: Any) -> str:
    """The document's id; raises ValueError (like the SQLite store) when it is not text."""
    doc_id = document.get("id") if isinstance(document, dict) else None
    if not isinstance(doc_id, str) or not doc_id:
        raise ValueError(f"cannot store a document without a string 'id': {document!r:.200}")
    return doc_id


def in_id_order(documents: Iterable[dict[str, Any]], limit: int | None) -> Iterator[dict[str, Any]]:
    """The first ``limit`` (default all) of ``documents`` by id, in code point order; a repeated
    id keeps its last document.

    They wait in a temporary SQLite file, so memory holds one document at a time however many
    there are; its text comparison (BINARY, UTF-8 bytes) orders ids by code point.
    """
    with tempfile.TemporaryDirectory(prefix="sslpipe-select-") as folder:
        spill = sqlite3.connect(Path(folder) / "documents.sqlite")
        try:
            spill.execute("CREATE TABLE documents (id TEXT PRIMARY KEY, body TEXT) WITHOUT ROWID")
            rows = ((_document_id(doc), json.dumps(doc)) for doc in documents)
            spill.executemany("INSERT OR REPLACE INTO documents VALUES (?, ?)", rows)
            ordered = spill.execute(
                "SELECT body FROM documents ORDER BY id LIMIT ?", (-1 if limit is None else limit,)
            )
            yield from (json.loads(body) for (body,) in ordered)
        finally:
            spill.close()


def _chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


# --- the store ---------------------------------------------------------------------------------


class CosmosMetadataStore(MetadataStore):
    """Metadata documents in one Cosmos DB container, partitioned by ``/id``.

    Args:
        endpoint: ``https://host[:port]/`` of the account.
        database, container: created when missing (``create=True``) where permitted.
        credential: the account key, or an Azure identity credential.
        use_udf: evaluate label include/exclude with ``udf.filterDocumentsByLabels``.
        verify_tls: None applies the rule of :func:`verify_tls_for` (off only for loopback);
            False for any other host raises StoreError before connecting.
        retry: the SDK's retry options.
        write_concurrency: upserts in flight at once.
    """

    def __init__(
        self,
        endpoint: str,
        database: str,
        container: str,
        *,
        credential: Credential,
        use_udf: bool = False,
        verify_tls: bool | None = None,
        create: bool = True,
        retry: RetrySettings | None = None,
        write_concurrency: int = 8,
    ) -> None:
        if write_concurrency < 1:
            raise ValueError(f"write_concurrency must be >= 1, got {write_concurrency}")
        self.location = CosmosLocation(endpoint, database, container, use_udf)
        self.uri = redact_uri(self.location.uri)
        self.use_udf = use_udf
        if verify_tls is False and self.location.verify_tls:
            # Checked before any connection: the key would go to whoever answers.
            raise StoreError(
                f"refusing to open {self.uri} without verifying its TLS certificate: only the "
                f"local emulator on a loopback address ({', '.join(sorted(LOOPBACK_HOSTS))}) "
                "may be used unverified; leave verify_tls unset"
            )
        self.verify_tls = self.location.verify_tls if verify_tls is None else verify_tls
        self._secret = credential if isinstance(credential, str) else None
        self._write_concurrency = write_concurrency
        self._udf_checked = False
        transport = {} if self.verify_tls else {"transport": _unverified_transport()}
        self._client = self._call(
            "connect",
            lambda: CosmosClient(
                endpoint,
                credential=credential,
                connection_verify=self.verify_tls,
                **transport,
                **(retry or RetrySettings()).client_kwargs(),
            ),
        )
        self._container = self._open(create)
        log.debug("opened the Cosmos DB metadata store %s", self.uri)

    @classmethod
    def from_uri(
        cls,
        uri: str,
        *,
        credential: Credential | None = None,
        create: bool = True,
        retry: RetrySettings | None = None,
    ) -> CosmosMetadataStore:
        """Open ``cosmos://host[:port]/database/container[?filter=udf]``.

        The credential defaults to the key in ``SSLPIPE_COSMOS_KEY``, else
        ``DefaultAzureCredential()``. Raises StoreError for a bad URI or an unreachable store.
        """
        location = parse_cosmos_uri(uri)
        if credential is None:
            credential = os.environ.get(KEY_ENV) or _default_credential()
        return cls(
            location.endpoint,
            location.database,
            location.container,
            credential=credential,
            use_udf=location.use_udf,
            create=create,
            retry=retry,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # --- errors and calls ---

    def _error(self, operation: str, err: Exception) -> StoreError:
        """A StoreError naming the endpoint, container and operation; the key scrubbed."""
        loc = self.location
        message = (
            f"Cosmos DB {loc.endpoint} database {loc.database!r} container "
            f"{loc.container!r}: {operation} failed ({error_reason(err)})"
        )
        if self._secret:
            message = message.replace(self._secret, "***")
        return StoreError(message)

    def _call(self, operation: str, call: Callable[[], _T]) -> _T:
        """``call()``, its SDK errors (after the SDK's retries) raised as StoreError."""
        try:
            return call()
        except (AzureError, OSError) as err:
            raise self._error(operation, err) from None

    def _call_or_none(self, operation: str, call: Callable[[], _T]) -> _T | None:
        """``call()``, or None when the resource does not exist (HTTP 404)."""
        try:
            return call()
        except CosmosResourceNotFoundError:
            return None
        except (AzureError, OSError) as err:
            raise self._error(operation, err) from None

    def _open(self, create: bool) -> ContainerProxy:
        """The container, with the database and container created when missing."""
        loc = self.location
        database = self._client.get_database_client(loc.database)
        if self._call_or_none(f"read database {loc.database!r}", database.read) is None:
            self._create(
                f"database {loc.database!r}",
                create,
                lambda: self._client.create_database(loc.database),
            )
        container = database.get_container_client(loc.container)
        if self._call_or_none(f"read container {loc.container!r}", container.read) is None:
            self._create(
                f"container {loc.container!r}",
                create,
                lambda: database.create_container(
                    loc.container, PartitionKey(path=PARTITION_KEY_PATH)
                ),
            )
        return container

    def _create(self, what: str, create: bool, call: Callable[[], Any]) -> None:
        """Create a missing database or container, or explain how to get one."""
        hint = (
            f"create it (container partition key {PARTITION_KEY_PATH}) with the Azure portal, "
            "CLI or Bicep, or use an identity that may create it"
        )
        if not create:
            raise self._error(f"open {what}", LookupError(f"{what} does not exist; {hint}"))
        try:
            call()
        except CosmosResourceExistsError:  # created meanwhile by someone else
            return
        except (AzureError, OSError) as err:
            message = f"{self._error(f'create {what}', err)}; it does not exist: {hint}"
            raise StoreError(message) from None

    def _query(
        self, operation: str, query: str, parameters: list[dict[str, Any]], page_size: int
    ) -> Iterator[Any]:
        """Results of a cross-partition query, fetched page by page."""
        pages = self._call(
            operation,
            lambda: self._container.query_items(
                query,
                parameters=parameters,
                enable_cross_partition_query=True,
                max_item_count=page_size,
            ).by_page(),
        )
        while (page := self._call(operation, lambda: _next_page(pages))) is not None:
            yield from page

    # --- the interface ---

    def count(self) -> int:
        counts = self._query("count documents", "SELECT VALUE COUNT(1) FROM c", [], _PAGE)
        return int(sum(counts))

    def get(self, doc_id: str) -> dict[str, Any] | None:
        """The document with this id without system fields, or None."""
        query = "SELECT * FROM c WHERE c.id = @id"
        params = [{"name": "@id", "value": doc_id}]
        for document in self._query(f"read document {doc_id!r}", query, params, 1):
            return strip_system_fields(document)
        return None

    def select(self, image_filter: ImageFilter) -> Iterator[dict[str, Any]]:
        """Matching documents (system fields stripped) in id order; see the module docstring."""
        if self.use_udf and (image_filter.include_labels or image_filter.exclude_labels):
            self._check_udf()
        query, params = compile_filter(image_filter, use_udf=self.use_udf, documents=True)
        found = self._query("select documents", query, params, _PAGE)
        yield from in_id_order(map(strip_system_fields, found), image_filter.limit)

    def _read_chunk(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The stored documents with these ids (system fields stripped), by id."""
        query = "SELECT * FROM c WHERE ARRAY_CONTAINS(@ids, c.id)"
        params = [{"name": "@ids", "value": ids}]
        found = self._query(
            f"read {len(ids)} documents from id {ids[0]!r}", query, params, len(ids)
        )
        return {doc["id"]: strip_system_fields(doc) for doc in found}

    def upsert(self, documents: Iterable[dict[str, Any]]) -> UpsertReport:
        """Insert or replace documents by id; returns how many were created, updated, unchanged.

        Per chunk of 100: one query reads the stored versions, then only new or changed
        documents (compared without system fields) are written, ``write_concurrency`` at once.
        A document without a string id raises ValueError; earlier chunks stay written (Cosmos
        DB has no transaction across partitions).
        """
        created = updated = unchanged = 0
        with ThreadPoolExecutor(self._write_concurrency, "cosmos-upsert") as pool:
            for chunk in _chunks(documents, _CHUNK):
                checked = [(_document_id(doc), doc) for doc in chunk]
                stored = self._read_chunk(sorted({i for i, _ in checked}))
                texts = {doc_id: _canonical(doc) for doc_id, doc in stored.items()}
                changed: dict[str, dict[str, Any]] = {}
                for doc_id, doc in checked:  # in order, as SQLite counts repeated ids
                    text = _canonical(doc)
                    if texts.get(doc_id) == text:
                        unchanged += 1
                        continue
                    created, updated = (
                        (created + 1, updated) if doc_id not in texts else (created, updated + 1)
                    )
                    texts[doc_id], changed[doc_id] = text, doc
                list(pool.map(self._write, changed.values()))
        return UpsertReport(created=created, updated=updated, unchanged=unchanged)

    def _write(self, document: dict[str, Any]) -> None:
        self._call(
            f"upsert document {document['id']!r}", lambda: self._container.upsert_item(document)
        )

    def _check_udf(self) -> None:
        """Fail clearly when the UDF is missing; warn when it is not this version's."""
        if self._udf_checked:
            return
        body = _deployed_udf_body(self)
        if body is None:
            raise StoreError(
                f"the Cosmos DB container {self.uri} has no user-defined function {UDF_ID!r}, "
                "which ?filter=udf needs; run `python -m sslpipe install-udf` (install_udf)"
            )
        if body != UDF_BODY:
            log.warning(
                "the UDF %s in %s differs from this version's; its results may differ "
                "(run install-udf to replace it)",
                UDF_ID,
                self.uri,
            )
        self._udf_checked = True

    def close(self) -> None:
        self._client.close()


def _unverified_transport() -> Any:
    """An HTTP transport that does not verify certificates, with one reused TLS context.

    The emulator closes the connection after every response; without a shared context each
    new connection would load the system CA bundle again (about 40 ms per request here).
    """
    import requests
    from azure.core.pipeline.transport import RequestsTransport

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    class _Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs, ssl_context=context)

    session = requests.Session()
    session.mount("https://", _Adapter())
    return RequestsTransport(session=session, session_owner=True)


def _next_page(pages: Iterator[Iterable[Any]]) -> list[Any] | None:
    """The next page of a query as a list, or None after the last one."""
    page = next(pages, None)
    return None if page is None else list(page)


def _default_credential() -> TokenCredential:
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def _deployed_udf_body(store: CosmosMetadataStore) -> str | None:
    """The body of the deployed ``filterDocumentsByLabels``, or None when there is none."""
    scripts = store._container.scripts
    udf = store._call_or_none(
        f"read UDF {UDF_ID!r}", lambda: scripts.get_user_defined_function(UDF_ID)
    )
    return None if udf is None else str(udf.get("body", ""))


def install_udf(store: CosmosMetadataStore) -> Literal["created", "updated", "unchanged"]:
    """Create or replace ``udf.filterDocumentsByLabels`` in the store's container.

    Returns what happened: "created", "updated" (another body was replaced) or "unchanged".
    """
    scripts = store._container.scripts
    definition = {"id": UDF_ID, "body": UDF_BODY}
    body = _deployed_udf_body(store)
    store._udf_checked = False
    if body == UDF_BODY:
        return "unchanged"
    if body is None:
        store._call(
            f"create UDF {UDF_ID!r}", lambda: scripts.create_user_defined_function(definition)
        )
        return "created"
    store._call(
        f"replace UDF {UDF_ID!r}",
        lambda: scripts.replace_user_defined_function(UDF_ID, definition),
    )
    return "updated"
