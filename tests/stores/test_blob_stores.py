"""One suite for every blob store implementation, plus the local folder's path safety.

To add an implementation, append one ``pytest.param(factory, id=...)`` to
``BLOB_STORE_FACTORIES``: a factory takes an empty folder and the test's request (to ask for
fixtures such as a local server) and returns an empty container. Each test runs in one event
loop (``run``), as a step does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from azure.storage.blob import BlobServiceClient

from sslpipe.stores import StoreError, open_blob_store
from sslpipe.stores.azure_blob import CONNECTION_STRING_ENV, AzureBlobStore
from sslpipe.stores.base import BlobInfo, BlobNotFoundError, BlobStore
from sslpipe.stores.local_blob import LocalFolderBlobStore, safe_blob_path

T = TypeVar("T")
BlobStoreFactory = Callable[[Path, pytest.FixtureRequest], BlobStore]


def _local_folder_store(folder: Path, request: pytest.FixtureRequest) -> BlobStore:
    return LocalFolderBlobStore(folder / "images", create=True)


class _AbstractMethodsOnly(BlobStore):
    """A store with only the abstract methods (over a local folder): checks the base class's
    default ``info`` and ``read_if_changed``."""

    def __init__(self, inner: LocalFolderBlobStore) -> None:
        self.inner, self.uri, self.container = inner, inner.uri, inner.container

    async def read(self, name: str) -> bytes:
        return await self.inner.read(name)

    async def write(self, name: str, data: bytes) -> None:
        await self.inner.write(name, data)

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        async for info in self.inner.list(prefix):
            yield info


def _base_defaults_store(folder: Path, request: pytest.FixtureRequest) -> BlobStore:
    return _AbstractMethodsOnly(LocalFolderBlobStore(folder / "images", create=True))


def _azure_blob_store(folder: Path, request: pytest.FixtureRequest) -> BlobStore:
    """A new container in Azurite, reached with its connection string (deleted afterwards)."""
    azurite = request.getfixturevalue("azurite")
    request.getfixturevalue("monkeypatch").setenv(
        CONNECTION_STRING_ENV, azurite["connection_string"]
    )
    container = f"suite-{uuid.uuid4().hex[:16]}"

    def drop() -> None:
        with BlobServiceClient.from_connection_string(azurite["connection_string"]) as service:
            service.delete_container(container)

    store = AzureBlobStore.from_uri(f"{azurite['blob_endpoint']}/{container}", create=True)
    request.addfinalizer(drop)
    return store


BLOB_STORE_FACTORIES = [
    pytest.param(_local_folder_store, id="local-folder"),
    pytest.param(_base_defaults_store, id="base-defaults"),
    pytest.param(_azure_blob_store, id="azure-blob", marks=pytest.mark.servers),
]

_runner: asyncio.Runner | None = None


@pytest.fixture(autouse=True)
def _one_event_loop_per_test() -> Iterator[None]:
    global _runner
    with asyncio.Runner() as runner:
        _runner = runner
        yield
        _runner = None


@pytest.fixture(params=BLOB_STORE_FACTORIES)
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    store = request.param(tmp_path, request)
    yield store
    run(store.close())


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` in the test's event loop."""
    assert _runner is not None
    return _runner.run(coroutine)


async def _listing(store: BlobStore, prefix: str = "") -> list[BlobInfo]:
    return [info async for info in store.list(prefix)]


def names(store: BlobStore, prefix: str = "") -> list[str]:
    return sorted(info.name for info in run(_listing(store, prefix)))


# --- the shared suite --------------------------------------------------------------------------


def test_a_written_blob_reads_back_byte_for_byte(blob_store: BlobStore) -> None:
    data = bytes(range(256)) * 10
    run(blob_store.write("a.jpeg", data))
    assert run(blob_store.read("a.jpeg")) == data


def test_writing_again_replaces_the_blob(blob_store: BlobStore) -> None:
    run(blob_store.write("a.jpeg", b"old"))
    run(blob_store.write("a.jpeg", b"new content"))
    assert run(blob_store.read("a.jpeg")) == b"new content"
    assert names(blob_store) == ["a.jpeg"]


def test_an_empty_blob_is_a_blob(blob_store: BlobStore) -> None:
    run(blob_store.write("empty.jpeg", b""))
    assert run(blob_store.read("empty.jpeg")) == b""


def test_list_gives_names_sizes_and_etags_filtered_by_prefix(blob_store: BlobStore) -> None:
    for name, data in [("a.jpeg", b"1"), ("dir/b.jpeg", b"22"), ("dir/sub/c.jpeg", b"333")]:
        run(blob_store.write(name, data))
    listing = {info.name: info for info in run(_listing(blob_store))}
    assert sorted(listing) == ["a.jpeg", "dir/b.jpeg", "dir/sub/c.jpeg"]
    assert [listing[n].size for n in sorted(listing)] == [1, 2, 3]
    assert all(info.etag for info in listing.values())
    assert names(blob_store, "dir/") == ["dir/b.jpeg", "dir/sub/c.jpeg"]
    assert names(blob_store, "di") == ["dir/b.jpeg", "dir/sub/c.jpeg"]
    assert names(blob_store, "nothing") == []


def test_the_etag_changes_when_the_blob_changes(blob_store: BlobStore) -> None:
    run(blob_store.write("a.jpeg", b"one"))
    before = run(_listing(blob_store))[0].etag
    run(blob_store.write("a.jpeg", b"other content"))
    assert run(_listing(blob_store))[0].etag != before


def test_info_gives_the_listing_of_one_blob(blob_store: BlobStore) -> None:
    run(blob_store.write("dir/b.jpeg", b"22"))
    run(blob_store.write("dir/b.jpeg2", b"333"))
    info = run(blob_store.info("dir/./b.jpeg"))
    assert info == run(_listing(blob_store, "dir/b.jpeg"))[0]
    assert (info.name, info.size) == ("dir/b.jpeg", 2)
    with pytest.raises(BlobNotFoundError, match=r"'dir' not found"):
        run(blob_store.info("dir"))


def test_read_if_changed_reads_only_when_the_etag_differs(blob_store: BlobStore) -> None:
    run(blob_store.write("a.jpeg", b"one"))
    data, etag = run(blob_store.read_if_changed("a.jpeg", None))
    assert data == b"one" and etag == run(_listing(blob_store))[0].etag
    assert run(blob_store.read_if_changed("a.jpeg", etag)) == (None, etag)
    assert run(blob_store.read_if_changed("a.jpeg", "another etag")) == (b"one", etag)
    run(blob_store.write("a.jpeg", b"two!"))
    data, new_etag = run(blob_store.read_if_changed("a.jpeg", etag))
    assert data == b"two!" and new_etag != etag
    assert new_etag == run(_listing(blob_store))[0].etag


def test_read_if_changed_sees_a_rewrite_of_the_same_size(blob_store: BlobStore) -> None:
    run(blob_store.write("a.jpeg", b"one"))
    _, etag = run(blob_store.read_if_changed("a.jpeg", None))
    run(blob_store.write("a.jpeg", b"owt"))  # at once, same size
    assert run(blob_store.read_if_changed("a.jpeg", etag))[0] == b"owt"


def test_read_if_changed_of_a_missing_blob_raises_blob_not_found(blob_store: BlobStore) -> None:
    with pytest.raises(BlobNotFoundError, match=r"'missing\.jpeg' not found"):
        run(blob_store.read_if_changed("missing.jpeg", "some etag"))


def test_unicode_and_space_names_round_trip(blob_store: BlobStore) -> None:
    run(blob_store.write("Bäder/Wanne 1.jpeg", b"x"))
    assert run(blob_store.read("Bäder/Wanne 1.jpeg")) == b"x"
    assert names(blob_store) == ["Bäder/Wanne 1.jpeg"]


def test_a_missing_blob_raises_blob_not_found(blob_store: BlobStore) -> None:
    with pytest.raises(BlobNotFoundError, match=r"'missing\.jpeg' not found"):
        run(blob_store.read("missing.jpeg"))


def test_blob_not_found_is_a_store_error_and_a_key_error(blob_store: BlobStore) -> None:
    with pytest.raises(StoreError):
        run(blob_store.read("missing.jpeg"))
    with pytest.raises(KeyError):
        run(blob_store.read("missing.jpeg"))


@pytest.mark.parametrize("name", ["dir", "dir/", "dir/b.jpeg/x"])
def test_a_folder_or_a_path_through_a_blob_is_not_found(blob_store: BlobStore, name: str) -> None:
    run(blob_store.write("dir/b.jpeg", b"1"))
    with pytest.raises(BlobNotFoundError):
        run(blob_store.read(name))


@pytest.mark.parametrize(
    "name", ["../escape.jpeg", "a/../../escape.jpeg", "/etc/passwd", "a\\..\\b", "", ".", "a\x00b"]
)
def test_names_that_would_leave_the_container_are_refused(blob_store: BlobStore, name: str) -> None:
    with pytest.raises(ValueError, match="unsafe blob name"):
        run(blob_store.write(name, b"x"))
    with pytest.raises(ValueError, match="unsafe blob name"):
        run(blob_store.read(name))


# --- the local folder --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("a.jpeg", ("a.jpeg",)),
        ("x/y/z.jpeg", ("x", "y", "z.jpeg")),
        ("x/./y.jpeg", ("x", "y.jpeg")),
    ],
)
def test_safe_blob_path_stays_under_the_root(
    tmp_path: Path, name: str, parts: tuple[str, ...]
) -> None:
    path = safe_blob_path(tmp_path, name)
    assert path == tmp_path.joinpath(*parts)
    assert path.resolve().is_relative_to(tmp_path.resolve())


@pytest.mark.parametrize(
    "name", ["..", "../x", "x/../../y", "/abs", "//abs", "a\\b", "", ".", "./"]
)
def test_safe_blob_path_refuses_parent_absolute_and_empty_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="must be a relative path inside the container"):
        safe_blob_path(tmp_path, name)


def test_the_local_folder_is_the_container(tmp_path: Path) -> None:
    store = LocalFolderBlobStore(tmp_path / "images")
    assert store.container == "images"
    assert store.uri == (tmp_path / "images").resolve().as_uri()
    assert (tmp_path / "images").is_dir()


def test_sync_writes_are_visible_to_async_reads_and_leave_no_temporary_files(
    tmp_path: Path,
) -> None:
    store = LocalFolderBlobStore(tmp_path / "images")
    store.write_sync("sub/a.jpeg", b"abc")
    assert run(store.read("sub/a.jpeg")) == b"abc"
    assert sorted(p.name for p in (tmp_path / "images" / "sub").iterdir()) == ["a.jpeg"]


def test_a_missing_folder_is_an_error_unless_create_is_asked(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        LocalFolderBlobStore(tmp_path / "nope", create=False)
    assert not (tmp_path / "nope").exists()


def test_open_blob_store_picks_the_local_folder_for_file_uris(tmp_path: Path) -> None:
    folder = tmp_path / "my images"
    store = open_blob_store(folder.as_uri(), create=True)
    assert isinstance(store, LocalFolderBlobStore)
    assert store.root == folder.resolve() and store.container == "my images"
    with pytest.raises(StoreError, match="does not exist"):
        open_blob_store((tmp_path / "absent").as_uri())


def test_an_unsupported_blob_scheme_is_refused_without_leaking_the_signature() -> None:
    uri = "ftp://acct.blob.core.windows.net/images?sv=2024&sig=s3cret"
    with pytest.raises(StoreError, match="scheme 'ftp' is not one of") as err:
        open_blob_store(uri)
    assert "s3cret" not in str(err.value)
