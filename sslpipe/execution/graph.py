"""A plain, Azure-free description of a pipeline: steps, their components and their bindings.

The pipeline is defined once with azure-ai-ml (``load_component`` + ``@dsl.pipeline``, or a
pipeline YAML loaded with ``load_job``). :meth:`PipelineGraph.from_pipeline_job` reads that
built ``PipelineJob`` and turns it into the frozen dataclasses of this module, which the local
executor (and the run record) use without touching the SDK again.

This module does not import azure-ai-ml (not even lazily, except for the one delegating
call in :meth:`PipelineGraph.from_pipeline_job`): everything that reads azure-ai-ml objects
lives in :mod:`sslpipe.execution.azureml_adapter`, so an SDK upgrade can only break that one
module, and the graph model loads on machines without the SDK.

A step with ``distribution: {type: pytorch, process_count_per_instance: N > 1}`` runs as N
processes on this machine (see :attr:`StepSpec.processes`); one that asks for more than one
machine (``resources.instance_count > 1``) is refused when the graph is built.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from sslpipe.core.config import ConfigError

if TYPE_CHECKING:
    from azure.ai.ml.entities import PipelineJob

PRIMITIVE_TYPES = frozenset({"integer", "number", "string", "boolean"})
"""Input types passed by value; every other type (uri_file, uri_folder, ...) is a path."""

REMOTE_PREFIXES = (
    "azureml:",
    "http://",
    "https://",
    "wasb://",
    "wasbs://",
    "abfs://",
    "abfss://",
    "adl://",
    "s3://",
    "gs://",
)
"""Path prefixes that point at cloud data, which the local executor cannot read."""

PLACEHOLDER_RE = re.compile(r"\$\{\{\s*(inputs|outputs)\.([A-Za-z_]\w*)\s*\}\}")
"""``${{inputs.x}}`` / ``${{outputs.y}}`` in a component command."""

OPTIONAL_BLOCK_RE = re.compile(r"\$\[\[(.*?)\]\]", re.DOTALL)
"""``$[[ ... ]]``: a part of the command kept only when every input inside it is bound."""

STEP_SEPARATOR = "."
"""Joins a sub-pipeline node's name and an inner node's name into a flat step name."""


class PipelineGraphError(ConfigError):
    """The pipeline cannot be turned into a runnable local graph (the message says why).

    A :class:`~sslpipe.core.config.ConfigError` (and so a ValueError): the command line reports it
    as one line, before anything runs.
    """


@dataclass(frozen=True)
class InputSpec:
    """A component input as declared in its YAML."""

    type: str
    optional: bool = False
    default: Any = None

    @property
    def is_path(self) -> bool:
        """True for data inputs (uri_file, uri_folder, ...), which are bound to paths."""
        return self.type not in PRIMITIVE_TYPES


@dataclass(frozen=True)
class OutputSpec:
    """A component output as declared in its YAML."""

    type: str


@dataclass(frozen=True)
class LiteralValue:
    """An input bound to a value; for path inputs, an absolute local path as a string."""

    value: Any


@dataclass(frozen=True)
class UpstreamOutput:
    """An input bound to another step's output."""

    step: str
    output: str


Binding: TypeAlias = LiteralValue | UpstreamOutput


@dataclass(frozen=True)
class StepSpec:
    """One runnable step: a command component plus what its inputs are bound to."""

    name: str
    component_name: str
    component_version: str | None
    command: str
    code_dir: Path
    component_dir: Path
    inputs: dict[str, InputSpec]
    outputs: dict[str, OutputSpec]
    bindings: dict[str, Binding] = field(default_factory=dict)
    is_deterministic: bool = True
    environment_variables: dict[str, str] = field(default_factory=dict)
    distribution: dict[str, Any] | None = None
    resources: dict[str, Any] | None = None

    @property
    def processes(self) -> int:
        """Processes per machine: ``distribution.process_count_per_instance``, else 1."""
        count = (self.distribution or {}).get("process_count_per_instance")
        return 1 if count is None else int(count)

    @property
    def instance_count(self) -> int:
        """Machines the step asks for: ``resources.instance_count``, else 1."""
        count = (self.resources or {}).get("instance_count")
        return 1 if count is None else int(count)

    def upstream_steps(self) -> list[str]:
        """Names of the steps whose outputs this step reads, without duplicates, sorted."""
        return sorted({b.step for b in self.bindings.values() if isinstance(b, UpstreamOutput)})

    def component_spec(self) -> dict[str, Any]:
        """The parts of the component that define what the step does (hashed for reuse).

        The distribution counts when there is one: N processes may compute something else
        than one (data-parallel training with another global batch).
        """
        spec = {
            "name": self.component_name,
            "version": self.component_version,
            "command": self.command,
            "inputs": {n: _input_spec_to_dict(s) for n, s in sorted(self.inputs.items())},
            "outputs": {n: {"type": s.type} for n, s in sorted(self.outputs.items())},
            "environment_variables": dict(sorted(self.environment_variables.items())),
        }
        if self.distribution is not None:
            spec["distribution"] = dict(sorted(self.distribution.items()))
        return spec

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible form (used by the run record and to resume a run)."""
        return {
            "name": self.name,
            "component": {"name": self.component_name, "version": self.component_version},
            "command": self.command,
            "code_dir": str(self.code_dir),
            "component_dir": str(self.component_dir),
            "inputs": {n: _input_spec_to_dict(s) for n, s in self.inputs.items()},
            "outputs": {n: {"type": s.type} for n, s in self.outputs.items()},
            "bindings": {n: _binding_to_dict(b) for n, b in self.bindings.items()},
            "is_deterministic": self.is_deterministic,
            "environment_variables": dict(self.environment_variables),
            "distribution": self.distribution,
            "resources": self.resources,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepSpec:
        """Rebuild a step from :meth:`to_dict` output."""
        return cls(
            name=data["name"],
            component_name=data["component"]["name"],
            component_version=data["component"].get("version"),
            command=data["command"],
            code_dir=Path(data["code_dir"]),
            component_dir=Path(data["component_dir"]),
            inputs={
                n: InputSpec(s["type"], bool(s.get("optional", False)), s.get("default"))
                for n, s in data["inputs"].items()
            },
            outputs={n: OutputSpec(s["type"]) for n, s in data["outputs"].items()},
            bindings={n: _binding_from_dict(b) for n, b in data.get("bindings", {}).items()},
            is_deterministic=bool(data.get("is_deterministic", True)),
            environment_variables=dict(data.get("environment_variables") or {}),
            distribution=data.get("distribution"),
            resources=data.get("resources"),
        )


def _input_spec_to_dict(spec: InputSpec) -> dict[str, Any]:
    return {"type": spec.type, "optional": spec.optional, "default": spec.default}


def _binding_to_dict(binding: Binding) -> dict[str, Any]:
    if isinstance(binding, UpstreamOutput):
        return {"step": binding.step, "output": binding.output}
    return {"value": binding.value}


def _binding_from_dict(data: Mapping[str, Any]) -> Binding:
    if "step" in data:
        return UpstreamOutput(data["step"], data["output"])
    return LiteralValue(data["value"])


@dataclass(frozen=True)
class PipelineGraph:
    """A validated pipeline: steps in declaration order, each with resolved bindings.

    Construction validates the graph, so every ``PipelineGraph`` is runnable: required
    inputs are bound, references name existing steps and outputs, and there is no cycle.
    """

    name: str
    steps: dict[str, StepSpec]
    inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for step in self.steps.values():
            _validate_step(step, self.steps)
        self.topological_order()  # raises on cycles

    def topological_order(self) -> list[StepSpec]:
        """Steps ordered so that each comes after the steps it reads from.

        Among steps that are ready at the same time, declaration order is kept, so the
        order is stable and predictable.

        Raises:
            PipelineGraphError: when the steps depend on each other in a cycle.
        """
        remaining = {name: set(step.upstream_steps()) for name, step in self.steps.items()}
        ordered: list[StepSpec] = []
        while remaining:
            ready = next((n for n, deps in remaining.items() if not deps), None)
            if ready is None:
                cycle = _find_cycle(remaining)
                raise PipelineGraphError(
                    "the pipeline's steps depend on each other in a cycle: "
                    + " -> ".join(cycle)
                    + "; a step cannot read (directly or indirectly) its own outputs"
                )
            ordered.append(self.steps[ready])
            del remaining[ready]
            for deps in remaining.values():
                deps.discard(ready)
        return ordered

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible form, for the run record and ``--dry-run`` printing."""
        return {
            "name": self.name,
            "inputs": dict(self.inputs),
            "steps": [step.to_dict() for step in self.steps.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineGraph:
        """Rebuild a graph from :meth:`to_dict` output (validating it again)."""
        steps = [StepSpec.from_dict(s) for s in data["steps"]]
        return cls(name=data["name"], steps={s.name: s for s in steps}, inputs=dict(data["inputs"]))

    @classmethod
    def from_pipeline_job(
        cls, job: PipelineJob, *, pipeline_inputs: Mapping[str, Any] | None = None
    ) -> PipelineGraph:
        """Read a built azure-ai-ml ``PipelineJob`` into a graph.

        Args:
            job: the pipeline, as returned by a ``@dsl.pipeline`` function or ``load_job``.
            pipeline_inputs: values that replace the pipeline's own input values (local
                paths for data inputs, given as ``str``/``Path``/``Input``; relative paths
                are taken relative to the current directory).

        Raises:
            PipelineGraphError: for nodes the local executor cannot run, unbound required
                inputs, references to unknown steps or outputs, remote data, or cycles.

        The SDK objects are read by :mod:`sslpipe.execution.azureml_adapter` (imported here,
        on use, so that this module loads without azure-ai-ml).
        """
        from sslpipe.execution.azureml_adapter import read_pipeline_job

        name, steps, inputs = read_pipeline_job(job, pipeline_inputs=pipeline_inputs)
        return cls(name=name, steps=steps, inputs=inputs)


# --------------------------------------------------------------------------- validation


def command_references(command: str) -> tuple[set[str], set[str]]:
    """Return the input names used outside and inside ``$[[...]]`` blocks of a command."""
    inside = {
        name
        for block in OPTIONAL_BLOCK_RE.findall(command)
        for kind, name in PLACEHOLDER_RE.findall(block)
        if kind == "inputs"
    }
    outside_text = OPTIONAL_BLOCK_RE.sub(" ", command)
    outside = {name for kind, name in PLACEHOLDER_RE.findall(outside_text) if kind == "inputs"}
    return outside, inside


def _validate_step(step: StepSpec, steps: Mapping[str, StepSpec]) -> None:
    """Check one step's bindings and command against its component and the other steps."""
    where = f"step {step.name!r} (component {step.component_name!r})"
    for input_name, binding in step.bindings.items():
        if input_name not in step.inputs:
            raise PipelineGraphError(
                f"{where} binds input {input_name!r}, which the component does not declare; "
                f"declared inputs: {_names(step.inputs)}"
            )
        if isinstance(binding, UpstreamOutput):
            _validate_upstream(where, input_name, binding, steps)
    for kind, name in PLACEHOLDER_RE.findall(step.command):
        declared: Mapping[str, object] = step.inputs if kind == "inputs" else step.outputs
        if name not in declared:
            raise PipelineGraphError(
                f"{where}: its command uses ${{{{{kind}.{name}}}}}, but the component declares "
                f"no such {kind[:-1]}; declared {kind}: {_names(declared)}"
            )
    _validate_distribution(step, where)
    outside, _ = command_references(step.command)
    for input_name, spec in step.inputs.items():
        if input_name in step.bindings:
            continue
        if not spec.optional:
            raise PipelineGraphError(
                f"{where}: required input {input_name!r} is not bound; bind it in the pipeline "
                "(to a value, a pipeline input with a value, or another step's output), "
                "give the component input a default, or mark it 'optional: true'"
            )
        if input_name in outside:
            raise PipelineGraphError(
                f"{where}: optional input {input_name!r} is not bound but its command uses it "
                "outside a $[[...]] block; wrap that part of the command in $[[...]] or bind it"
            )


def _validate_distribution(step: StepSpec, where: str) -> None:
    """A local step runs on this one machine, several processes only with torchrun."""
    distribution = step.distribution or {}
    resources = step.resources or {}
    for key, value in (
        ("distribution.process_count_per_instance", distribution.get("process_count_per_instance")),
        ("resources.instance_count", resources.get("instance_count")),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise PipelineGraphError(f"{where}: {key} must be a whole number >= 1, got {value!r}")
        if value is not None and value < 1:
            raise PipelineGraphError(f"{where}: {key} must be >= 1, got {value}")
    if step.instance_count > 1:
        raise PipelineGraphError(
            f"{where} asks for {step.instance_count} machines (resources.instance_count), but "
            "the local executor runs every step on this machine; set the instance count to 1 "
            "(moco.nodes, classifier.nodes, data_prep.nodes or train.nodes = 1) or run the "
            "pipeline on Azure ML (--backend azureml)"
        )
    kind = str(distribution.get("type", "pytorch")).lower()
    if step.processes > 1 and kind != "pytorch":
        raise PipelineGraphError(
            f"{where}: distribution type {kind!r} with {step.processes} processes cannot run "
            "locally; the local executor starts several processes only for type 'pytorch' "
            "(with torchrun)"
        )


def _validate_upstream(
    where: str, input_name: str, binding: UpstreamOutput, steps: Mapping[str, StepSpec]
) -> None:
    upstream = steps.get(binding.step)
    if upstream is None:
        raise PipelineGraphError(
            f"{where}: input {input_name!r} reads output {binding.output!r} of step "
            f"{binding.step!r}, but the pipeline has no such step; steps: {_names(steps)}"
        )
    if binding.output not in upstream.outputs:
        raise PipelineGraphError(
            f"{where}: input {input_name!r} reads output {binding.output!r} of step "
            f"{binding.step!r}, which declares no such output; its outputs: "
            f"{_names(upstream.outputs)}"
        )


def _names(mapping: Mapping[str, object]) -> str:
    return ", ".join(sorted(mapping)) or "(none)"


def _find_cycle(remaining: Mapping[str, set[str]]) -> list[str]:
    """Return one dependency cycle among steps that all still have unmet dependencies."""
    start = next(iter(remaining))
    path: list[str] = []
    node = start
    while node not in path:
        path.append(node)
        node = sorted(remaining[node])[0]
    return [*path[path.index(node) :], node]


def _resolve_aliases(step: StepSpec, aliases: Mapping[tuple[str, str], Binding | None]) -> StepSpec:
    """Replace references to sub-pipeline outputs by the inner steps' outputs they expose."""
    bindings: dict[str, Binding] = {}
    for name, binding in step.bindings.items():
        seen: set[tuple[str, str]] = set()
        current: Binding | None = binding
        while isinstance(current, UpstreamOutput) and (current.step, current.output) in aliases:
            key = (current.step, current.output)
            if key in seen:
                raise PipelineGraphError(f"sub-pipeline output {key[0]}.{key[1]} refers to itself")
            seen.add(key)
            current = aliases[key]
        if current is None:
            raise PipelineGraphError(
                f"step {step.name!r}: input {name!r} reads output {binding!r} of a "
                "sub-pipeline, but no step inside it produces that output"
            )
        bindings[name] = current
    return dataclasses.replace(step, bindings=bindings)
