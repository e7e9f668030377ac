"""Loading images and their metadata documents into the configured stores."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from sslpipe.demo import DemoImage
from sslpipe.stores.base import BlobStore, MetadataStore, UpsertReport


async def _upload(blob_store: BlobStore, images: Sequence[DemoImage], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(image: DemoImage) -> None:
        async with gate:
            await blob_store.write(image.blob_name, image.data)

    await asyncio.gather(*(one(image) for image in images))


def ingest_images(
    images: Iterable[DemoImage],
    metadata_store: MetadataStore,
    blob_store: BlobStore,
    *,
    concurrency: int = 16,
) -> UpsertReport:
    """Upload every image's bytes first, then upsert its document.

    Blobs go first so that a document never points at an image that is not there yet.
    """
    batch = list(images)
    asyncio.run(_upload(blob_store, batch, concurrency))
    return metadata_store.upsert(image.document for image in batch)
