"""Blob containers for data_prep's tests: a local folder, or a fresh container in Azurite.

Scenarios that must hold for every blob store take the ``CONTAINERS`` parameters and build
their own :class:`BlobContainer` subclass with ``request.param(TheirClass, tmp_path, request)``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from azure.storage.blob import BlobServiceClient

from sslpipe.stores.azure_blob import CONNECTION_STRING_ENV, AzureBlobStore
from sslpipe.stores.base import BlobStore
from sslpipe.stores.local_blob import LocalFolderBlobStore


class BlobContainer:
    """A blob container that tests write blobs into, under a test's ``root`` folder."""

    def __init__(self, root: Path, blob_uri: str, open_store: Callable[[], BlobStore]) -> None:
        self.root, self.blob_uri, self.open_store = root, blob_uri, open_store

    def put(self, blobs: dict[str, bytes]) -> None:
        async def scenario() -> None:
            store = self.open_store()
            try:
                for name, data in blobs.items():
                    await store.write(name, data)
            finally:
                await store.close()

        asyncio.run(scenario())

    def etags(self) -> dict[str, str]:
        async def scenario() -> dict[str, str]:
            store = self.open_store()
            try:
                return {info.name: info.etag async for info in store.list()}
            finally:
                await store.close()

        return asyncio.run(scenario())


Container = TypeVar("Container", bound=BlobContainer)


def in_local_folder(
    kind: type[Container], tmp_path: Path, request: pytest.FixtureRequest | None = None
) -> Container:
    folder = tmp_path / "blobs"
    return kind(tmp_path, folder.as_uri(), lambda: LocalFolderBlobStore(folder))


def in_azurite(kind: type[Container], tmp_path: Path, request: pytest.FixtureRequest) -> Container:
    """A new container in the local Azurite, deleted after the test."""
    azurite = request.getfixturevalue("azurite")
    request.getfixturevalue("monkeypatch").setenv(
        CONNECTION_STRING_ENV, azurite["connection_string"]
    )
    container = f"prep-{uuid.uuid4().hex[:16]}"
    uri = f"{azurite['blob_endpoint']}/{container}"

    def drop() -> None:
        with BlobServiceClient.from_connection_string(azurite["connection_string"]) as service:
            service.delete_container(container)

    AzureBlobStore.from_uri(uri, create=True)
    request.addfinalizer(drop)
    return kind(tmp_path, uri, lambda: AzureBlobStore.from_uri(uri))


CONTAINERS = [
    pytest.param(in_local_folder, id="local-folder"),
    pytest.param(in_azurite, id="azure-blob", marks=pytest.mark.servers),
]
"""``@pytest.fixture(params=CONTAINERS)``: every scenario on both kinds of store."""
