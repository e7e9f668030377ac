"""Local execution of Azure ML pipelines: the same ``PipelineJob``, run on this machine.

Typical use::

    from sslpipe.executor import LocalExecutor, PipelineGraph

    graph = PipelineGraph.from_pipeline_job(pipeline_job, pipeline_inputs={"ids": "ids.csv"})
    record = LocalExecutor(Path(".sslpipe")).run(graph)
"""

from sslpipe.executor.graph import (
    InputSpec,
    LiteralValue,
    OutputSpec,
    PipelineGraph,
    PipelineGraphError,
    StepSpec,
    UpstreamOutput,
)
from sslpipe.executor.local import CommandError, LocalExecutor, StepFailedError
from sslpipe.executor.record import RunRecord, StepRecord

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
