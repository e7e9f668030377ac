"""The moco pipeline: connect_db -> data_prep -> moco_train, defined once for every executor.

The graph knows nothing about where it runs: store URIs and the filter are pipeline inputs,
step settings are bound from the configuration on each node.
"""

# No `from __future__ import annotations`: azure-ai-ml's dsl reads the real annotation types.
from typing import Any

from azure.ai.ml import dsl
from azure.ai.ml.entities import PipelineJob

from pipelines.steps import moco_training, select_and_prepare
from sslpipe.core.config import PipelineConfig
from sslpipe.core.filters import filter_argument


def build(config: PipelineConfig) -> PipelineJob:
    """The moco pipeline job with every input bound from ``config``."""

    @dsl.pipeline(None, name="moco", description="MoCo v2 pre-training on catalog images")
    def moco_pipeline(metadata_uri: str, blob_uri: str, image_filter: str) -> dict[str, Any]:
        data_prep = select_and_prepare(
            config,
            metadata_uri=metadata_uri,
            blob_uri=blob_uri,
            image_filter=image_filter,
            labelled=False,
        )
        moco_train = moco_training(config, data=data_prep.outputs.data)
        return {"backbone": moco_train.outputs.model}

    job: PipelineJob = moco_pipeline(
        metadata_uri=config.metadata_uri,
        blob_uri=config.blob_uri,
        image_filter=filter_argument(config.filter),
    )
    assert job.settings is not None
    job.settings.default_compute = "cpu-cluster"
    return job
