"""The moco pipeline: connect_db -> data_prep -> moco_train, defined once for every executor.

The graph knows nothing about where it runs: store URIs and the filter are pipeline inputs,
step settings are bound from the configuration on each node.
"""

# No `from __future__ import annotations`: azure-ai-ml's dsl reads the real annotation types.
from typing import Any

from azure.ai.ml import dsl
from azure.ai.ml.entities import PipelineJob

from pipelines.components import component
from sslpipe.config import PipelineConfig
from sslpipe.filters import filter_argument


def build(config: PipelineConfig) -> PipelineJob:
    """The moco pipeline job with every input bound from ``config``."""
    prep = config.data_prep
    moco = config.moco.model_dump(mode="json")

    @dsl.pipeline(
        None, name="moco", description="MoCo v2 pre-training on images selected from the catalog"
    )
    def moco_pipeline(metadata_uri: str, blob_uri: str, image_filter: str) -> dict[str, Any]:
        connect_db = component("connect_db")(
            metadata_uri=metadata_uri, blob_uri=blob_uri, filter=image_filter
        )
        data_prep = component("data_prep")(
            selection=connect_db.outputs.selection,
            blob_uri=blob_uri,
            image_size=prep.image_size,
            concurrency=prep.concurrency,
            max_skipped_fraction=prep.max_skipped_fraction,
        )
        moco_train = component("moco_train")(data=data_prep.outputs.data, **moco)
        return {"backbone": moco_train.outputs.model}

    job: PipelineJob = moco_pipeline(
        metadata_uri=config.metadata_uri,
        blob_uri=config.blob_uri,
        image_filter=filter_argument(config.filter),
    )
    assert job.settings is not None
    job.settings.default_compute = "cpu-cluster"
    return job
