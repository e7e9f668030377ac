"""The sync_labels step: Label Studio annotations into the metadata store, and a report.

Output (one folder): ``report.json``, the :class:`~sslpipe.data.labelstudio.sync.SyncReport` with
the Label Studio URL and the store URI (both without credentials). The API token comes from
``$LABEL_STUDIO_API_KEY`` (on Azure ML, a workspace connection or Key Vault secret exposed to
the job as that variable), never from an input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslpipe.core.io import write_json
from sslpipe.core.logs import get_logger
from sslpipe.core.uris import redact_uri
from sslpipe.data.labelstudio.client import connect
from sslpipe.data.labelstudio.sync import sync_labels
from sslpipe.data.labelstudio.tasks import DEFAULT_IMAGE_ID_FIELD
from sslpipe.stores import open_metadata_store

log = get_logger("sync_labels")


def run_sync_labels(
    *,
    metadata_uri: str,
    labelstudio_url: str,
    project_id: int,
    output_dir: Path,
    image_id_field: str = DEFAULT_IMAGE_ID_FIELD,
) -> dict[str, Any]:
    """Sync the project's labels into the store and write ``report.json``; returns the report.

    Raises:
        LabelStudioError: Label Studio cannot be reached or refuses (the store is unchanged).
        StoreError: the metadata store cannot be opened or written.
    """
    client = connect(labelstudio_url)
    with open_metadata_store(metadata_uri) as store:
        report = sync_labels(client, project_id, store, image_id_field=image_id_field)
    data = {"labelstudio_url": redact_uri(client.url), **report.to_dict()}
    write_json(Path(output_dir) / "report.json", data)
    log.info(
        "project %d: %d tasks; documents created %d, updated %d, unchanged %d; "
        "unmatched tasks %d; skipped annotations %s",
        project_id,
        report.tasks,
        report.created,
        report.updated,
        report.unchanged,
        len(report.unmatched),
        report.skipped_by_reason,
    )
    return data
