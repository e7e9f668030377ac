"""Label Studio: annotations into the metadata documents, model predictions back as
pre-annotations.

- :func:`connect` -> :class:`LabelStudioClient` (token from ``$LABEL_STUDIO_API_KEY``)
- :func:`sync_labels` -> :class:`SyncReport`: tasks' annotations -> ``labels_with_taxonomy``,
  ``total_annotations``, ``has_review`` of the matching documents
- :func:`push_predictions` -> :class:`PushReport`: a classifier's predictions -> taxonomy
  predictions on the matching tasks (a registered classifier computes them:
  :func:`sslpipe.models.serving.blob_predictions.predict_images`)
- :func:`task_image_id`: the task -> image id rule both use

Command line: ``python -m sslpipe sync-labels`` / ``push-predictions`` (:mod:`.cli`).
"""

from sslpipe.data.labelstudio.client import LabelStudioClient, LabelStudioError, connect
from sslpipe.data.labelstudio.push import (
    PushError,
    PushReport,
    project_image_ids,
    push_predictions,
)
from sslpipe.data.labelstudio.sync import SyncReport, sync_labels
from sslpipe.data.labelstudio.tasks import task_image_id

__all__ = [
    "LabelStudioClient",
    "LabelStudioError",
    "PushError",
    "PushReport",
    "SyncReport",
    "connect",
    "project_image_ids",
    "push_predictions",
    "sync_labels",
    "task_image_id",
]
