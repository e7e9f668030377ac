"""Open a store from its URI; the URI scheme picks the implementation."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from sslpipe.core.uris import redact_uri
from sslpipe.stores.base import BlobStore, MetadataStore, StoreError

METADATA_SCHEMES = ("sqlite", "cosmos")
BLOB_SCHEMES = ("file", "https", "http")


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    return Path(unquote(parsed.netloc + parsed.path))


def open_metadata_store(uri: str) -> MetadataStore:
    """``sqlite:///abs/path.db`` -> SQLiteMetadataStore;
    ``cosmos://host[:port]/database/container`` -> CosmosMetadataStore."""
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        from sslpipe.stores.sqlite import SQLiteMetadataStore

        return SQLiteMetadataStore(_local_path(uri))
    if scheme == "cosmos":
        from sslpipe.stores.cosmos import CosmosMetadataStore

        return CosmosMetadataStore.from_uri(uri)
    raise StoreError(
        f"unsupported metadata store URI {redact_uri(uri)!r}: "
        f"scheme {scheme!r} is not one of {METADATA_SCHEMES}"
    )


def open_blob_store(uri: str, *, create: bool = False) -> BlobStore:
    """``file:///abs/folder`` -> LocalFolderBlobStore;
    ``https://account.blob.core.windows.net/container`` (or the emulator's
    ``http://127.0.0.1:10000/devstoreaccount1/container``) -> AzureBlobStore."""
    scheme = urlparse(uri).scheme
    if scheme == "file":
        from sslpipe.stores.local_blob import LocalFolderBlobStore

        return LocalFolderBlobStore(_local_path(uri), create=create)
    if scheme in ("https", "http"):
        from sslpipe.stores.azure_blob import AzureBlobStore

        return AzureBlobStore.from_uri(uri, create=create)
    raise StoreError(
        f"unsupported blob store URI {redact_uri(uri)!r}: "
        f"scheme {scheme!r} is not one of {BLOB_SCHEMES}"
    )
