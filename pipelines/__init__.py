"""Pipeline definitions (azure-ai-ml dsl), separate from the library functions they run."""

from __future__ import annotations

from collections.abc import Callable

from azure.ai.ml.entities import PipelineJob

from sslpipe.config import PipelineConfig


def _moco(config: PipelineConfig) -> PipelineJob:
    from pipelines import moco

    return moco.build(config)


PIPELINES: dict[str, Callable[[PipelineConfig], PipelineJob]] = {"moco": _moco}
