"""Execution: the local executor (the same ``PipelineJob`` Azure ML runs, run on this machine),
the Azure ML adapter and submitter, schedules and the environments.

Typical use::

    from sslpipe.execution import LocalExecutor, PipelineGraph

    graph = PipelineGraph.from_pipeline_job(pipeline_job, pipeline_inputs={"ids": "ids.csv"})
    record = LocalExecutor(Path(".sslpipe")).run(graph)
"""

from typing import TYPE_CHECKING, Any

# The local executor is imported when first named, so that the modules beside it (the
# environments' pin/check command, the Azure ML submitter) load without its dependencies.
_EXPORTS = {
    "InputSpec": "graph",
    "LiteralValue": "graph",
    "OutputSpec": "graph",
    "PipelineGraph": "graph",
    "PipelineGraphError": "graph",
    "StepSpec": "graph",
    "UpstreamOutput": "graph",
    "CommandError": "local",
    "LocalExecutor": "local",
    "StepFailedError": "local",
    "RunRecord": "record",
    "StepRecord": "record",
}

if TYPE_CHECKING:
    from sslpipe.execution.graph import (
        InputSpec,
        LiteralValue,
        OutputSpec,
        PipelineGraph,
        PipelineGraphError,
        StepSpec,
        UpstreamOutput,
    )
    from sslpipe.execution.local import CommandError, LocalExecutor, StepFailedError
    from sslpipe.execution.record import RunRecord, StepRecord


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = [
    "CommandError",
    "InputSpec",
    "LiteralValue",
    "LocalExecutor",
    "OutputSpec",
    "PipelineGraph",
    "PipelineGraphError",
    "RunRecord",
    "StepFailedError",
    "StepRecord",
    "StepSpec",
    "UpstreamOutput",
]
