"""The Cosmos DB metadata store: URIs, TLS, and the store against the local
Cosmos-compatible server (infra/servers.py), including injected throttling and outages.

The shared suite in test_metadata_stores.py runs the interface's semantics on this store too;
this file covers what is specific to Cosmos DB.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from azure.cosmos import CosmosClient

from sslpipe.core.filters import ImageFilter
from sslpipe.stores import StoreError, open_metadata_store
from sslpipe.stores import cosmos as cosmos_module
from sslpipe.stores.base import MetadataStore, UpsertReport
from sslpipe.stores.cosmos import (
    KEY_ENV,
    SYSTEM_FIELDS,
    CosmosMetadataStore,
    RetrySettings,
    install_udf,
    parse_cosmos_uri,
    strip_system_fields,
    verify_tls_for,
)
from sslpipe.stores.cosmos_udf import UDF_BODY, UDF_ID
from sslpipe.stores.sqlite import SQLiteMetadataStore
from tests.faults import FaultProxy as HttpFaultProxy
from tests.stores.test_cosmos_query import TRICKY

# The local server's certificate is self-signed; unverified TLS to loopback is intended.
pytestmark = pytest.mark.filterwarnings("ignore:Unverified HTTPS request is being made to host")

FAST_RETRY = RetrySettings(total=1, backoff_max_s=2, connect=1, read=1, backoff_factor=0.05)


def doc(doc_id: str, *labels: tuple[Any, list[str]], **fields: Any) -> dict[str, Any]:
    return {
        "id": doc_id,
        "sortout": "Keep",
        "is_blurred": False,
        "labels_with_taxonomy": [{"annotator_id": a, "taxonomy": [p]} for a, p in labels],
        **fields,
    }


def test_selected_documents_come_back_in_code_point_order_of_their_ids() -> None:
    documents = [{"id": i, "n": n} for n, i in enumerate(["🛁", "b", "Ａ", "a", "b"])]
    ordered = list(cosmos_module.in_id_order(iter(documents), None))
    # The repeated "b" keeps its last document; "Ａ" (U+FF21) sorts before "🛁" (U+1F6C1).
    assert ordered == [{"id": "a", "n": 3}, {"id": "b", "n": 4}, {"id": "Ａ", "n": 2},
                       {"id": "🛁", "n": 0}]  # fmt: skip
    assert [d["id"] for d in cosmos_module.in_id_order(iter(documents), 2)] == ["a", "b"]
    assert list(cosmos_module.in_id_order(iter([]), None)) == []


# --- URIs, TLS, secrets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "endpoint", "database", "container", "use_udf"),
    [
        ("cosmos://acct.documents.azure.com/db/images", "https://acct.documents.azure.com/",
         "db", "images", False),
        ("cosmos://127.0.0.1:8081/sslpipe/images?filter=udf", "https://127.0.0.1:8081/",
         "sslpipe", "images", True),
        ("cosmos://[::1]:8081/d/c?filter=sql", "https://[::1]:8081/", "d", "c", False),
        ("cosmos://h/My%20DB/Bilder%20%C3%A4", "https://h/", "My DB", "Bilder ä", False),
    ],
)  # fmt: skip
def test_parse_cosmos_uri(
    uri: str, endpoint: str, database: str, container: str, use_udf: bool
) -> None:
    location = parse_cosmos_uri(uri)
    assert (location.endpoint, location.database, location.container) == (
        endpoint,
        database,
        container,
    )
    assert location.use_udf is use_udf


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("mongodb://h/db/c", "the scheme is 'mongodb'"),
        ("cosmos://h/db", "exactly a database and a container"),
        ("cosmos://h/db/", "exactly a database and a container"),
        ("cosmos://h/db/c/extra", "exactly a database and a container"),
        ("cosmos:///db/c", "no host"),
        ("cosmos://h:notaport/db/c", "bad port"),
        ("cosmos://h/db/c?filter=javascript", "filter must be one of"),
        ("cosmos://h/db/c?key=s3cret", "unknown query parameter"),
        ("cosmos://admin:s3cret@h/db/c", "credentials do not belong in the URI"),
    ],
)
def test_a_bad_uri_is_one_clear_line_without_secrets(uri: str, reason: str) -> None:
    with pytest.raises(StoreError, match=re.escape(reason)) as err:
        CosmosMetadataStore.from_uri(uri, credential="unused")
    message = str(err.value)
    assert "\n" not in message and "s3cret" not in message
    assert "expected cosmos://<host>[:port]/<database>/<container>" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_tls_verification_is_off_only_for_loopback(host: str) -> None:
    assert verify_tls_for(host) is False


@pytest.mark.parametrize(
    "host",
    ["acct.documents.azure.com", "10.0.0.4", "127.0.0.2", "localhost.example.com", "::2", "vm"],
)
def test_tls_verification_stays_on_for_every_other_host(host: str) -> None:
    assert verify_tls_for(host) is True
    assert parse_cosmos_uri(f"cosmos://{host if ':' not in host else f'[{host}]'}/d/c").verify_tls


def test_system_fields_are_stripped() -> None:
    stored = {"id": "a", "x": 1, "_private": 2, **{name: "s" for name in SYSTEM_FIELDS}}
    assert strip_system_fields(stored) == {"id": "a", "x": 1, "_private": 2}


def test_retry_settings_reach_the_sdk_options() -> None:
    kwargs = RetrySettings(total=4, backoff_max_s=9, connect=2, read=5).client_kwargs()
    assert kwargs["retry_total"] == 4 and kwargs["retry_backoff_max"] == 9
    assert kwargs["retry_connect"] == 2 and kwargs["retry_read"] == 5


# --- against the server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cosmos_database(cosmos_server: dict[str, str]) -> Iterator[str]:
    """A database of this module's own, deleted at its end."""
    name = f"test-cosmos-{uuid.uuid4().hex[:8]}"
    yield name
    with CosmosClient(cosmos_server["endpoint"], cosmos_server["key"]) as client:
        client.delete_database(name)


@pytest.fixture
def open_store(cosmos_server: dict[str, str], cosmos_database: str) -> Iterator[Any]:
    """``open_store(container=None, **kwargs)`` -> a CosmosMetadataStore (closed afterwards)."""
    stores: list[CosmosMetadataStore] = []

    def _open(container: str | None = None, **kwargs: Any) -> CosmosMetadataStore:
        kwargs.setdefault("credential", cosmos_server["key"])
        name = container or f"c-{uuid.uuid4().hex[:10]}"
        store = CosmosMetadataStore(cosmos_server["endpoint"], cosmos_database, name, **kwargs)
        stores.append(store)
        return store

    yield _open
    for store in stores:
        store.close()


@pytest.fixture
def store(open_store: Any) -> CosmosMetadataStore:
    result: CosmosMetadataStore = open_store()
    return result


def _ids(store: MetadataStore, image_filter: ImageFilter) -> list[str]:
    return [d["id"] for d in store.select(image_filter)]


@pytest.mark.servers
def test_from_uri_takes_the_key_from_the_environment_and_keeps_it_out_of_sight(
    cosmos_server: dict[str, str], cosmos_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, cosmos_server["key"])
    host = urlparse(cosmos_server["endpoint"]).netloc
    uri = f"cosmos://{host}/{cosmos_database}/from-uri?filter=udf"
    with open_metadata_store(uri) as opened:
        assert isinstance(opened, CosmosMetadataStore)
        assert opened.uri == uri and opened.use_udf and opened.verify_tls is False
        assert opened.upsert([doc("a")]) == UpsertReport(created=1)
        assert cosmos_server["key"] not in opened.uri + repr(opened)
    again = CosmosMetadataStore.from_uri(uri.replace("?filter=udf", ""))
    assert again.count() == 1 and not again.use_udf
    again.close()


@pytest.mark.servers
def test_a_missing_database_and_container_are_created(cosmos_server: dict[str, str]) -> None:
    database = f"test-cosmos-new-{uuid.uuid4().hex[:6]}"
    try:
        created = CosmosMetadataStore(
            cosmos_server["endpoint"], database, "images", credential=cosmos_server["key"]
        )
        properties = created._container.read()
        assert properties["partitionKey"]["paths"] == ["/id"]
        created.close()
    finally:
        with CosmosClient(cosmos_server["endpoint"], cosmos_server["key"]) as client:
            client.delete_database(database)


@pytest.mark.servers
def test_a_missing_container_is_an_error_when_creating_is_not_allowed(open_store: Any) -> None:
    with pytest.raises(StoreError, match="container 'absent' does not exist") as err:
        open_store("absent", create=False)
    assert "partition key /id" in str(err.value) and "https://127.0.0.1:" in str(err.value)


@pytest.mark.servers
def test_tls_is_verified_for_a_host_that_is_not_loopback(cosmos_server: dict[str, str]) -> None:
    """The server's self-signed certificate is refused through this machine's own address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # no packet is sent; picks the outgoing address
        except OSError:
            pytest.skip("no non-loopback address on this machine")
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("no non-loopback address on this machine")
    port = urlparse(cosmos_server["endpoint"]).port
    with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED") as err:
        CosmosMetadataStore.from_uri(
            f"cosmos://{address}:{port}/d/c", credential=cosmos_server["key"], retry=FAST_RETRY
        )
    assert f"https://{address}:{port}/" in str(err.value) and "connect failed" in str(err.value)
    assert cosmos_server["key"] not in str(err.value)


@pytest.mark.servers
def test_tls_verification_is_off_for_ipv6_loopback(
    cosmos_server: dict[str, str], cosmos_database: str
) -> None:
    """The SDK itself skips verification only for localhost and 127.0.0.1, not for ::1."""
    port = urlparse(cosmos_server["endpoint"]).port
    uri = f"cosmos://[::1]:{port}/{cosmos_database}/ipv6"
    opened = CosmosMetadataStore.from_uri(uri, credential=cosmos_server["key"])
    assert opened.verify_tls is False and opened.count() == 0
    opened.close()


@pytest.mark.servers
def test_an_unreachable_endpoint_names_endpoint_and_operation(
    cosmos_server: dict[str, str],
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"connect failed \(ServiceRequestError") as err:
        CosmosMetadataStore(
            f"https://127.0.0.1:{port}/", "d", "c", credential=cosmos_server["key"],
            retry=FAST_RETRY,
        )  # fmt: skip
    assert f"https://127.0.0.1:{port}/ database 'd' container 'c'" in str(err.value)
    assert cosmos_server["key"] not in str(err.value)
    assert time.monotonic() - started < 30


@pytest.mark.servers
def test_the_key_is_scrubbed_from_error_messages(open_store: Any) -> None:
    """Even when a message would carry it (here: a container named like the key)."""
    secret = "c2VjcmV0LWtleS1mb3ItdGhlLXRlc3Q="
    reader = open_store(credential=secret)
    error = reader._error(f"read {secret}", OSError(f"refused {secret}"))
    assert secret not in str(error) and str(error).count("***") == 2


@pytest.mark.servers
def test_upsert_reports_and_writes_only_changed_documents(store: CosmosMetadataStore) -> None:
    first = [doc(f"{i:03d}", (701, ["A", "B"])) for i in range(5)]
    assert store.upsert(first) == UpsertReport(created=5)
    etags = {d["id"]: d["_etag"] for d in store._container.query_items(
        "SELECT * FROM c", enable_cross_partition_query=True)}  # fmt: skip
    second = [*first[:3], {**first[3], "has_review": True}, doc("new")]
    assert store.upsert(second) == UpsertReport(created=1, updated=1, unchanged=3)
    after = {d["id"]: d["_etag"] for d in store._container.query_items(
        "SELECT * FROM c", enable_cross_partition_query=True)}  # fmt: skip
    assert [i for i in etags if etags[i] != after[i]] == ["003"]  # the unchanged were not written
    assert store.count() == 6


@pytest.mark.servers
def test_upsert_counts_a_repeated_id_like_sqlite(store: CosmosMetadataStore) -> None:
    report = store.upsert([doc("a"), doc("a", has_review=True), doc("a", has_review=True)])
    assert report == UpsertReport(created=1, updated=1, unchanged=1)
    stored = store.get("a")
    assert stored is not None and stored["has_review"] is True


@pytest.mark.servers
def test_upsert_compares_as_json_numbers_and_ignores_key_order(
    store: CosmosMetadataStore,
) -> None:
    store.upsert([{"id": "n", "width": 480, "ratio": 0.75, "labels": (["A"],)}])
    same = {"labels": [["A"]], "ratio": 0.75, "width": 480.0, "id": "n"}
    assert store.upsert([same]) == UpsertReport(unchanged=1)
    assert store.upsert([{**same, "width": True}]) == UpsertReport(updated=1)


@pytest.mark.servers
def test_upsert_in_chunks_with_concurrent_writes(
    store: CosmosMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cosmos_module, "_CHUNK", 7)
    monkeypatch.setattr(cosmos_module, "_PAGE", 5)
    documents = (doc(f"p{i:03d}", (i % 3, ["A"])) for i in range(40))
    assert store.upsert(documents) == UpsertReport(created=40)
    assert store.count() == 40
    selected = _ids(store, ImageFilter(include_labels=[["A"]]))
    assert selected == [f"p{i:03d}" for i in range(40)]  # paged, in order
    assert _ids(store, ImageFilter(limit=9)) == selected[:9]


@pytest.mark.servers
def test_a_document_without_a_text_id_is_refused_by_name(store: CosmosMetadataStore) -> None:
    with pytest.raises(ValueError, match=r"without a string 'id': \{'id': 7"):
        store.upsert([{"id": 7, "name": "seven"}])


@pytest.mark.servers
def test_get_count_and_select_return_documents_without_system_fields(
    store: CosmosMetadataStore,
) -> None:
    original = doc("Bad Wäsche 日本.jpeg", (701, ["Bäder", "Wanne"]), extra={"n": [1, None]})
    store.upsert([original, doc("b")])
    assert store.count() == 2
    assert store.get("Bad Wäsche 日本.jpeg") == original
    assert store.get("bad wäsche 日本.jpeg") is None
    selected = list(store.select(ImageFilter()))
    assert selected[0] == original
    assert not any(name in d for d in selected for name in SYSTEM_FIELDS)


@pytest.mark.servers
def test_ids_beyond_the_basic_multilingual_plane_sort_like_sqlite(
    store: CosmosMetadataStore,
) -> None:
    """JavaScript compares UTF-16 code units ("🛁" < "Ａ"); SQLite and Python code points."""
    store.upsert([doc("🛁"), doc("Ａ"), doc("a")])
    assert _ids(store, ImageFilter()) == ["a", "Ａ", "🛁"]


@pytest.mark.servers
def test_label_values_never_alter_the_query(store: CosmosMetadataStore) -> None:
    store.upsert([doc(f"d{i:02d}", (1, [label, "child"])) for i, label in enumerate(TRICKY)])
    for i, label in enumerate(TRICKY):
        assert _ids(store, ImageFilter(include_labels=[[label]])) == [f"d{i:02d}"]
    assert store.count() == len(TRICKY)


@pytest.mark.servers
@pytest.mark.parametrize(
    ("annotator_ids", "distinct"),
    [
        ([701, "701"], 1),
        ([None, "<missing>", "None"], 1),
        ([True, "True"], 1),
        ([True, 1], 2),
        ([0, False, "0"], 2),
        (["anna", "Anna", 702, None], 4),
    ],
)
def test_annotators_are_told_apart_by_their_text_like_sqlite(
    store: CosmosMetadataStore, tmp_path: Path, annotator_ids: list[Any], distinct: int
) -> None:
    annotations = [
        {"taxonomy": [["A"]]} if a == "<missing>" else {"annotator_id": a, "taxonomy": [["A"]]}
        for a in annotator_ids
    ]
    document = {"id": "a", "sortout": "Keep", "labels_with_taxonomy": annotations}
    with SQLiteMetadataStore(tmp_path / "reference.db") as reference:
        for backend in (store, reference):
            backend.upsert([document])
            assert _ids(backend, ImageFilter(min_annotators=distinct)) == ["a"]
            assert _ids(backend, ImageFilter(min_annotators=distinct + 1)) == []


@pytest.mark.servers
def test_install_udf_creates_updates_and_leaves_unchanged(store: CosmosMetadataStore) -> None:
    assert install_udf(store) == "created"
    assert install_udf(store) == "unchanged"
    seed_like = "function filterDocumentsByLabels(id, labels, include, exclude) { return []; }"
    store._container.scripts.replace_user_defined_function(
        UDF_ID, {"id": UDF_ID, "body": seed_like}
    )
    assert install_udf(store) == "updated"
    deployed = store._container.scripts.get_user_defined_function(UDF_ID)
    assert deployed["body"] == UDF_BODY


@pytest.mark.servers
def test_the_udf_mode_selects_with_the_installed_udf(open_store: Any) -> None:
    store = open_store(use_udf=True)
    store.upsert([doc("a", (1, ["A", "B"])), doc("b", (1, ["C"])), doc("c")])
    with pytest.raises(StoreError, match="no user-defined function 'filterDocumentsByLabels'"):
        list(store.select(ImageFilter(include_labels=[["A"]])))
    assert _ids(store, ImageFilter()) == ["a", "b", "c"]  # no labels asked: no UDF needed
    install_udf(store)
    assert _ids(store, ImageFilter(include_labels=[["A"]])) == ["a"]
    assert _ids(store, ImageFilter(exclude_labels=[["A", "B"]])) == ["b", "c"]


@pytest.mark.servers
def test_an_outdated_udf_is_used_with_a_warning(
    open_store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(use_udf=True)
    store.upsert([doc("a", (1, ["A"]))])
    old = "function filterDocumentsByLabels(id, labels, include, exclude) { return [1]; }"
    store._container.scripts.create_user_defined_function({"id": UDF_ID, "body": old})
    with caplog.at_level(logging.WARNING, logger="sslpipe.stores.cosmos"):
        assert _ids(store, ImageFilter(include_labels=[["Z"]])) == ["a"]
    assert "differs from this version's" in caplog.text


# --- throttling and outages, injected by a proxy in front of the server ------------------------


class FaultProxy(HttpFaultProxy):
    """A plain-HTTP proxy to the Cosmos server that answers queued requests itself.

    ``fail(method, path_part, status, times)`` queues faults: an HTTP status (it comes with
    ``x-ms-retry-after-ms``) or 0 for a connection closed without a response.
    """

    def __init__(self, upstream: str) -> None:
        self.faults: list[tuple[str, str, int]] = []
        self.injected: list[int] = []
        self._lock = threading.Lock()
        super().__init__(upstream)

    def fail(self, method: str, path_part: str, status: int, times: int) -> None:
        with self._lock:
            self.faults.extend([(method, path_part, status)] * times)

    def fault(self, method: str, path: str) -> int | None:
        with self._lock:
            for index, (m, part, status) in enumerate(self.faults):
                if m == method and part in path:
                    del self.faults[index]
                    self.injected.append(status)
                    return status
        return None

    def fault_headers(self, status: int) -> list[tuple[str, str]]:
        return [("x-ms-retry-after-ms", "20")]


@pytest.fixture
def proxied(
    cosmos_server: dict[str, str], cosmos_database: str
) -> Iterator[tuple[FaultProxy, CosmosMetadataStore]]:
    proxy = FaultProxy(cosmos_server["endpoint"])
    retry = RetrySettings(total=2, backoff_max_s=5, connect=2, read=2, backoff_factor=0.05)
    name = f"proxied-{uuid.uuid4().hex[:8]}"
    store = CosmosMetadataStore(
        proxy.endpoint, cosmos_database, name, credential=cosmos_server["key"], retry=retry
    )
    store.upsert([doc("a"), doc("b")])
    yield proxy, store
    store.close()
    proxy.close()


@pytest.mark.servers
def test_throttled_requests_are_retried_after_the_servers_retry_after(
    proxied: tuple[FaultProxy, CosmosMetadataStore],
) -> None:
    proxy, store = proxied
    proxy.fail("POST", "/docs", 429, times=2)
    assert _ids(store, ImageFilter()) == ["a", "b"]
    assert proxy.injected == [429, 429]


@pytest.mark.servers
def test_unavailable_and_reset_connections_are_retried(
    proxied: tuple[FaultProxy, CosmosMetadataStore],
) -> None:
    proxy, store = proxied
    proxy.fail("POST", "/docs", 503, times=1)
    proxy.fail("POST", "/docs", 0, times=1)
    assert store.upsert([doc("c")]) == UpsertReport(created=1)
    assert store.count() == 3
    assert proxy.injected == [503, 0]


@pytest.mark.servers
@pytest.mark.parametrize(
    ("status", "reason"),
    [(429, "HTTP 429, request rate too large"), (503, "HTTP 503, service unavailable"),
     (0, "ServiceResponseError")],
)  # fmt: skip
def test_exhausted_retries_raise_store_error_naming_the_operation(
    proxied: tuple[FaultProxy, CosmosMetadataStore], status: int, reason: str
) -> None:
    proxy, store = proxied
    proxy.fail("POST", "/docs", status, times=100)
    with pytest.raises(StoreError, match="select documents failed") as err:
        list(store.select(ImageFilter()))
    assert proxy.endpoint in str(err.value) and reason in str(err.value)
    assert len(proxy.injected) >= 2  # retried before giving up
