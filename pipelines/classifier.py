"""The classifier pipeline, and the full pipeline (moco, then classifier on its backbone).

classifier: connect_db (labelled) -> data_prep -> classifier_train -> evaluate
full:       moco's three steps, then the classifier on the new backbone, evaluated beside two
            baselines in one report: the seed's (same network, random init, frozen, head only;
            nodes ``baseline_*``) and a stronger one (same network trained from scratch with
            the labels, two-stage; nodes ``scratch_*``). Neither baseline is registered.
"""

# No `from __future__ import annotations`: azure-ai-ml's dsl reads the real annotation types.
from typing import Any

from azure.ai.ml import dsl
from azure.ai.ml.entities import PipelineJob

from pipelines.steps import (
    baseline_classifier,
    moco_training,
    scratch_classifier,
    select_and_prepare,
    train_and_evaluate,
)
from sslpipe.core.config import PipelineConfig
from sslpipe.core.filters import filter_argument


def _labelled_filter(config: PipelineConfig) -> str:
    return filter_argument(config.filter.model_copy(update={"labelled": "labelled"}))


def _finish(job: PipelineJob) -> PipelineJob:
    assert job.settings is not None
    job.settings.default_compute = "cpu-cluster"
    return job


def build(config: PipelineConfig) -> PipelineJob:
    """The classifier pipeline with every input bound from ``config``."""

    @dsl.pipeline(None, name="classifier", description="Classifier on a registered backbone")
    def classifier_pipeline(metadata_uri: str, blob_uri: str, image_filter: str) -> dict[str, Any]:
        data_prep = select_and_prepare(
            config,
            metadata_uri=metadata_uri,
            blob_uri=blob_uri,
            image_filter=image_filter,
            labelled=True,
        )
        evaluate = train_and_evaluate(
            config, data=data_prep.outputs.data, classifier=config.classifier
        )
        return {"report": evaluate.outputs.report}

    return _finish(
        classifier_pipeline(
            metadata_uri=config.metadata_uri,
            blob_uri=config.blob_uri,
            image_filter=_labelled_filter(config),
        )
    )


def build_full(config: PipelineConfig) -> PipelineJob:
    """moco, then the classifier on the new backbone beside the two supervised baselines."""

    @dsl.pipeline(None, name="full", description="MoCo pre-training, classifier and two baselines")
    def full_pipeline(
        metadata_uri: str, blob_uri: str, image_filter: str, labelled_filter: str
    ) -> dict[str, Any]:
        unlabelled = select_and_prepare(
            config,
            metadata_uri=metadata_uri,
            blob_uri=blob_uri,
            image_filter=image_filter,
            labelled=False,
        )
        moco_train = moco_training(config, data=unlabelled.outputs.data)
        labelled = select_and_prepare(
            config,
            metadata_uri=metadata_uri,
            blob_uri=blob_uri,
            image_filter=labelled_filter,
            labelled=True,
            suffix="_labelled",
        )
        baseline = train_and_evaluate(
            config,
            data=labelled.outputs.data,
            classifier=baseline_classifier(config),
            register=False,
            prefix="baseline_",
        )
        scratch = train_and_evaluate(
            config,
            data=labelled.outputs.data,
            classifier=scratch_classifier(config),
            register=False,
            prefix="scratch_",
        )
        evaluate = train_and_evaluate(
            config,
            data=labelled.outputs.data,
            classifier=config.classifier,
            backbone_model=moco_train.outputs.model,
            baselines={
                "baseline": baseline.outputs.report,
                "baseline_scratch": scratch.outputs.report,
            },
        )
        return {"backbone": moco_train.outputs.model, "report": evaluate.outputs.report}

    return _finish(
        full_pipeline(
            metadata_uri=config.metadata_uri,
            blob_uri=config.blob_uri,
            image_filter=filter_argument(config.filter),
            labelled_filter=_labelled_filter(config),
        )
    )
