"""Pipeline definitions (azure-ai-ml dsl), separate from the library functions they run."""

from __future__ import annotations

from collections.abc import Callable

from azure.ai.ml.entities import PipelineJob

from sslpipe.core.config import PipelineConfig


def _moco(config: PipelineConfig) -> PipelineJob:
    from pipelines import moco

    return moco.build(config)


def _classifier(config: PipelineConfig) -> PipelineJob:
    from pipelines import classifier

    return classifier.build(config)


def _full(config: PipelineConfig) -> PipelineJob:
    from pipelines import classifier

    return classifier.build_full(config)


PIPELINES: dict[str, Callable[[PipelineConfig], PipelineJob]] = {
    "moco": _moco,
    "classifier": _classifier,
    "full": _full,
}
