"""Helpers for the executor tests: copied fixture components and a tiny pipeline.

No ``from __future__ import annotations`` here: ``@dsl.pipeline`` reads parameter annotations
at runtime and rejects them when they are strings.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslpipe.execution import LocalExecutor, PipelineGraph

with warnings.catch_warnings():
    # Importing azure-ai-ml emits hundreds of marshmallow deprecation warnings.
    warnings.simplefilter("ignore", DeprecationWarning)
    from azure.ai.ml import Input, dsl, load_component
    from azure.ai.ml.entities import PipelineJob

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class Console:
    """Collects what the executor prints."""

    lines: list[str] = field(default_factory=list)

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Bench:
    """A copy of the fixture components, a workspace and a run counter for one test."""

    root: Path
    workspace: Path
    counter: Path
    console: Console

    def component(self, name: str) -> Any:
        return load_component(source=self.root / name / "component.yaml")

    def runs(self) -> list[str]:
        """Which steps' scripts really ran, in order (each script appends its name)."""
        if not self.counter.exists():
            return []
        return self.counter.read_text(encoding="utf-8").split()

    def executor(self, **kwargs: Any) -> LocalExecutor:
        env = {"COUNTER_FILE": str(self.counter), **kwargs.pop("env", {})}
        return LocalExecutor(self.workspace, env=env, echo=self.console, **kwargs)

    def tiny_job(self, **inputs: Any) -> PipelineJob:
        """writer -> reader -> gate, with pipeline inputs ``source``, ``message``, ``upper``."""
        inputs.setdefault("source", Input(type="uri_file", path=str(self.root / "source.txt")))
        return build_tiny_pipeline(self)(**inputs)

    def tiny_graph(self, **inputs: Any) -> PipelineGraph:
        return PipelineGraph.from_pipeline_job(self.tiny_job(**inputs))


def build_tiny_pipeline(bench: Bench) -> Callable[..., PipelineJob]:
    """The pipeline most tests run, defined the way real pipelines are: with ``@dsl.pipeline``."""
    writer = bench.component("writer")
    reader = bench.component("reader")
    gate = bench.component("gate")

    @dsl.pipeline
    def tiny(source: Input, message: str = "hello world", upper: bool = False) -> None:
        write = writer(source=source, message=message)
        read = reader(text=write.outputs.out, upper=upper)
        gate(result=read.outputs.result)

    return tiny
