"""A registered classifier's predictions for images in a blob store, one row per image id
(what ``python -m sslpipe push-predictions`` sends to Label Studio)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd

from sslpipe.models.serving.classifier import describe_error
from sslpipe.stores import open_blob_store
from sslpipe.stores.base import BlobNotFoundError

CHUNK = 256  # images handed to the model at once; bounds memory on large folders
BLOB_CONCURRENCY = 16


async def _read_blobs(blob_uri: str, names: Sequence[str]) -> list[bytes | Exception]:
    """Each blob's bytes, or the BlobNotFoundError/ValueError (bad name) it raised."""
    store = open_blob_store(blob_uri)
    limit = asyncio.Semaphore(BLOB_CONCURRENCY)

    async def read(name: str) -> bytes | Exception:
        async with limit:
            try:
                return await store.read(name)
            except (BlobNotFoundError, ValueError) as err:
                return err

    try:
        return list(await asyncio.gather(*(read(name) for name in names)))
    finally:
        await store.close()


def predict_images(model_ref: str, image_ids: Sequence[str], blob_uri: str) -> pd.DataFrame:
    """The registered classifier's predictions for blobs of ``blob_uri``: one row per image id,
    in order, with ``id`` and the classifier's columns (label, confidence, ``prob_<class>``,
    error). An image that cannot be read gets its reason in ``error``.

    The MLflow tracking URI must be set (as ``python -m sslpipe predict`` does).
    """
    from sslpipe.models.registry import load_classifier

    model = load_classifier(model_ref)
    records: list[dict[str, Any]] = []
    model_columns = ["label", "confidence", "error"]
    for start in range(0, len(image_ids), CHUNK):
        names = list(image_ids[start : start + CHUNK])
        data = asyncio.run(_read_blobs(blob_uri, names))
        readable = [d for d in data if isinstance(d, bytes)]
        predicted: Iterator[dict[str, Any]] = iter([])
        if readable:
            frame = model.predict(readable)
            model_columns = [str(c) for c in frame.columns]
            predicted = iter(frame.to_dict("records"))
        for name, item in zip(names, data, strict=True):
            if isinstance(item, bytes):
                records.append({"id": name, **next(predicted)})
            else:
                records.append({"id": name, "label": None, "error": describe_error(item)})
    frame = pd.DataFrame.from_records(records, columns=["id", *model_columns])
    for column in ("label", "error"):  # None, as the classifier gives, not NaN
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame
