"""Stores: metadata (documents) and blobs (image bytes), each an interface with implementations.

Components open a store from a URI and never know which implementation they got:

- metadata: ``sqlite:///abs/path/metadata.db`` (embedded default), ``cosmos://...`` (Azure)
- blobs: ``file:///abs/path/container`` (embedded default), ``https://<account>.blob...`` (Azure)
"""

from sslpipe.stores.base import BlobStore, MetadataStore, StoreError
from sslpipe.stores.factory import open_blob_store, open_metadata_store

__all__ = ["BlobStore", "MetadataStore", "StoreError", "open_blob_store", "open_metadata_store"]
