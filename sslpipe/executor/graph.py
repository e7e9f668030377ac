"""A plain, Azure-free description of a pipeline: steps, their components and their bindings.

The pipeline is defined once with azure-ai-ml (``load_component`` + ``@dsl.pipeline``, or a
pipeline YAML loaded with ``load_job``). :meth:`PipelineGraph.from_pipeline_job` reads that
built ``PipelineJob`` and turns it into frozen dataclasses that the local executor (and the
run record) can use without touching the SDK again.

How the ``PipelineJob`` is read (all SDK access lives in :class:`_JobReader`):

* ``job.jobs`` maps node names to nodes: ``Command`` nodes become steps, ``Pipeline`` nodes
  (sub-pipelines) are flattened into steps named ``<sub>.<inner>``.
* ``node.component`` is the ``CommandComponent``: ``command``, ``inputs`` (type, optional,
  default), ``outputs``, ``is_deterministic``, ``code`` (relative to ``_base_path``, the
  folder of the component YAML) and ``_source_path`` (the YAML file).
* ``node.inputs[name]._data`` holds what the input is bound to: ``None`` (unbound), a
  literal, an ``Input`` (a path), or a reference object (``PipelineInput`` / ``NodeOutput``).
  References are turned into their data-binding expressions (``${{parent.inputs.x}}``,
  ``${{parent.jobs.<node>.outputs.<name>}}``) so that pipelines built with ``@dsl.pipeline``
  and pipelines loaded from YAML (whose bindings *are* such strings) go through one parser.
* Pipeline input values come from ``job.inputs[name].result()``; the names the pipeline
  declares (including unset optional ones, which ``job.inputs`` leaves out) from
  ``job.component.inputs``.

``job._to_dict()`` is deliberately *not* the source of truth: it serialises boolean literals
as ``1``/``0``, defaults as strings and local paths as ``azureml:<path>``. Only a node's
``distribution`` and ``resources`` are read from it (plain dicts there).

A step with ``distribution: {type: pytorch, process_count_per_instance: N > 1}`` runs as N
processes on this machine (see :attr:`StepSpec.processes`); one that asks for more than one
machine (``resources.instance_count > 1``) is refused when the graph is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from sslpipe.config import ConfigError

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

ANONYMOUS_COMPONENT_NAME = "azureml_anonymous"
"""The name azure-ai-ml gives components loaded inline by a pipeline YAML."""

PLACEHOLDER_RE = re.compile(r"\$\{\{\s*(inputs|outputs)\.([A-Za-z_]\w*)\s*\}\}")
"""``${{inputs.x}}`` / ``${{outputs.y}}`` in a component command."""

OPTIONAL_BLOCK_RE = re.compile(r"\$\[\[(.*?)\]\]", re.DOTALL)
"""``$[[ ... ]]``: a part of the command kept only when every input inside it is bound."""

_PARENT_INPUT_RE = re.compile(r"\$\{\{\s*parent\.inputs\.([\w.]+)\s*\}\}")
_PARENT_JOB_OUTPUT_RE = re.compile(r"\$\{\{\s*parent\.jobs\.([\w.-]+)\.outputs\.(\w+)\s*\}\}")
_PARENT_OUTPUT_RE = re.compile(r"\$\{\{\s*parent\.outputs\.(\w+)\s*\}\}")

STEP_SEPARATOR = "."
"""Joins a sub-pipeline node's name and an inner node's name into a flat step name."""


class PipelineGraphError(ConfigError):
    """The pipeline cannot be turned into a runnable local graph (the message says why).

    A :class:`~sslpipe.config.ConfigError` (and so a ValueError): the command line reports it
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
        """
        from azure.ai.ml.entities import PipelineJob

        if not isinstance(job, PipelineJob):
            raise PipelineGraphError(
                f"expected an azure.ai.ml PipelineJob (from a @dsl.pipeline function or "
                f"load_job of a pipeline YAML), got {type(job).__name__}"
            )
        reader = _JobReader(base_dir=_job_base_dir(job))
        values = reader.pipeline_input_values(job, pipeline_inputs or {})
        steps: dict[str, StepSpec] = {}
        aliases: dict[tuple[str, str], Binding | None] = {}
        with _quiet_azure_logs():
            reader.collect(job.jobs, prefix="", parent_inputs=values, steps=steps, aliases=aliases)
        steps = {name: _resolve_aliases(step, aliases) for name, step in steps.items()}
        name = job.display_name or job.name or getattr(job.component, "name", None) or "pipeline"
        resolved = {
            n: (v.value if isinstance(v, LiteralValue) else None) for n, v in values.items()
        }
        return cls(name=str(name), steps=steps, inputs=resolved)


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


# --------------------------------------------------------------------------- azure-ai-ml


def _job_base_dir(job: Any) -> Path:
    """The folder that relative local paths in the job are relative to."""
    base = getattr(job, "_base_path", None)
    return Path(base).resolve() if base else Path.cwd()


@contextlib.contextmanager
def _quiet_azure_logs() -> Iterator[None]:
    """Silence azure-ai-ml's 'experimental class' warnings while we serialise nodes."""
    logger = logging.getLogger("azure.ai.ml")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _is_remote(path: str) -> bool:
    return path.lower().startswith(REMOTE_PREFIXES)


def _local_path(value: Any, base_dir: Path) -> str:
    """An absolute local path for a path-like value (remote ones are returned unchanged)."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if _is_remote(text):
        return text
    text = text.removeprefix("file://")
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _coerce(value: Any, spec: InputSpec, where: str) -> Any:
    """Give literal values their declared type: YAML and the SDK may hand over strings."""
    if not isinstance(value, str) or spec.is_path:
        return value
    try:
        if spec.type == "boolean":
            lowered = value.strip().lower()
            if lowered not in ("true", "false"):
                raise ValueError(value)
            return lowered == "true"
        if spec.type == "integer":
            return int(value)
        if spec.type == "number":
            return float(value)
    except ValueError:
        raise PipelineGraphError(f"{where}: value {value!r} is not a valid {spec.type}") from None
    return value


class _JobReader:
    """Everything that touches azure-ai-ml objects, in one place."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir

    # ---- pipeline inputs

    def pipeline_input_values(
        self, job: Any, overrides: Mapping[str, Any]
    ) -> dict[str, Binding | None]:
        """Values of the pipeline's inputs, with ``overrides`` applied (None = no value)."""
        declared = self._declared_pipeline_inputs(job)
        values: dict[str, Binding | None] = {}
        for name, pipeline_input in (job.inputs or {}).items():
            value = pipeline_input.result()
            # YAML pipelines leave the input's own type empty; its Input value still has one.
            declared_type = getattr(pipeline_input, "type", None) or getattr(value, "type", None)
            declared.setdefault(name, declared_type)
            values[name] = self._pipeline_value(value, self.base_dir, None)
        for name in declared:
            values.setdefault(name, None)
        for name, value in overrides.items():
            if name not in declared:
                raise PipelineGraphError(
                    f"pipeline_inputs gives a value for {name!r}, but the pipeline declares no "
                    f"such input; its inputs: {_names(declared)}"
                )
            values[name] = self._pipeline_value(value, Path.cwd(), declared[name])
        return values

    @staticmethod
    def _declared_pipeline_inputs(job: Any) -> dict[str, str | None]:
        from azure.ai.ml.entities import PipelineComponent

        component = getattr(job, "component", None)
        if isinstance(component, PipelineComponent):
            return {name: meta.type for name, meta in (component.inputs or {}).items()}
        return {}

    @staticmethod
    def _pipeline_value(value: Any, base_dir: Path, declared_type: str | None) -> Binding | None:
        from azure.ai.ml import Input

        if value is None:
            return None
        if isinstance(value, Input):
            if value.path is None:
                return None if value.default is None else LiteralValue(value.default)
            return LiteralValue(_local_path(value.path, base_dir))
        if isinstance(value, os.PathLike):
            return LiteralValue(_local_path(value, base_dir))
        is_path = declared_type is not None and declared_type not in PRIMITIVE_TYPES
        if isinstance(value, str) and is_path:
            return LiteralValue(_local_path(value, base_dir))
        if isinstance(value, bool | int | float | str):
            return LiteralValue(value)
        raise PipelineGraphError(
            f"unsupported pipeline input value {value!r} of type {type(value).__name__}; "
            "expected a number, string, boolean, path or azure.ai.ml.Input"
        )

    # ---- nodes

    def collect(
        self,
        jobs: Mapping[str, Any],
        *,
        prefix: str,
        parent_inputs: Mapping[str, Binding | None],
        steps: dict[str, StepSpec],
        aliases: dict[tuple[str, str], Binding | None],
    ) -> None:
        """Add a step for every command node in ``jobs``, flattening sub-pipelines."""
        from azure.ai.ml.entities import Command, Pipeline

        for key, node in jobs.items():
            name = prefix + key
            if isinstance(node, Pipeline):
                self._collect_sub_pipeline(node, name, prefix, parent_inputs, steps, aliases)
            elif isinstance(node, Command):
                steps[name] = self._step(node, name, prefix, parent_inputs)
            else:
                raise PipelineGraphError(
                    f"node {name!r} is a {type(node).__name__} node; the local executor runs "
                    "only command components (and sub-pipelines made of them)"
                )

    def _collect_sub_pipeline(
        self,
        node: Any,
        name: str,
        prefix: str,
        parent_inputs: Mapping[str, Binding | None],
        steps: dict[str, StepSpec],
        aliases: dict[tuple[str, str], Binding | None],
    ) -> None:
        """Flatten a sub-pipeline: its inner steps become ``<name>.<inner>``."""
        component = node.component
        inner_prefix = name + STEP_SEPARATOR
        sub_inputs: dict[str, Binding | None] = {}
        for input_name, meta in (component.inputs or {}).items():
            where = f"sub-pipeline {name!r} input {input_name!r}"
            node_input = node.inputs.get(input_name)
            data = node_input._data if node_input is not None else None
            binding = self._binding(data, parent_inputs, prefix, where)
            if binding is None and meta.default is not None:
                binding = LiteralValue(meta.default)
            sub_inputs[input_name] = binding
        self.collect(
            component.jobs,
            prefix=inner_prefix,
            parent_inputs=sub_inputs,
            steps=steps,
            aliases=aliases,
        )
        # Inner nodes expose outputs to the outer pipeline via ${{parent.outputs.<name>}}.
        for inner_key, inner_node in component.jobs.items():
            for port, node_output in (inner_node.outputs or {}).items():
                expression = self._expression(node_output._data)
                match = _PARENT_OUTPUT_RE.fullmatch(expression or "")
                if match:
                    target = UpstreamOutput(inner_prefix + inner_key, port)
                    aliases[(name, match.group(1))] = target

    def _step(
        self, node: Any, name: str, prefix: str, parent_inputs: Mapping[str, Binding | None]
    ) -> StepSpec:
        component = node.component
        if isinstance(component, str):
            raise PipelineGraphError(
                f"step {name!r} uses the registered component {component!r}; the local "
                "executor needs components loaded from YAML with load_component(source=...)"
            )
        component_dir, code_dir = self._component_dirs(component, name)
        component_name, version = _component_identity(component)
        inputs = {
            input_name: InputSpec(
                type=str(meta.type),
                optional=bool(meta.optional),
                default=meta.default,
            )
            for input_name, meta in (component.inputs or {}).items()
        }
        bindings: dict[str, Binding] = {}
        for input_name, spec in inputs.items():
            where = f"step {name!r} input {input_name!r}"
            node_input = node.inputs.get(input_name)
            data = node_input._data if node_input is not None else None
            binding = self._binding(data, parent_inputs, prefix, where)
            if binding is None and spec.default is not None:
                binding = LiteralValue(spec.default)
            if binding is not None:
                bindings[input_name] = self._typed(binding, spec, where)
        node_dict = node._to_dict()
        return StepSpec(
            name=name,
            component_name=component_name,
            component_version=version,
            command=str(component.command),
            code_dir=code_dir,
            component_dir=component_dir,
            inputs=inputs,
            outputs={n: OutputSpec(str(m.type)) for n, m in (component.outputs or {}).items()},
            bindings=bindings,
            is_deterministic=component.is_deterministic is not False,
            environment_variables={
                str(k): str(v) for k, v in (node_dict.get("environment_variables") or {}).items()
            },
            distribution=node_dict.get("distribution"),
            resources=node_dict.get("resources"),
        )

    def _typed(self, binding: Binding, spec: InputSpec, where: str) -> Binding:
        """Coerce literal values to their input's type; make data paths absolute and local."""
        if not isinstance(binding, LiteralValue):
            return binding
        if not spec.is_path:
            return LiteralValue(_coerce(binding.value, spec, where))
        path = _local_path(binding.value, self.base_dir)
        if _is_remote(path):
            raise PipelineGraphError(
                f"{where} is bound to remote data {path!r}, which the local executor cannot "
                "read; bind a local path instead, e.g. by overriding the pipeline input with "
                "PipelineGraph.from_pipeline_job(job, pipeline_inputs={...: '/local/path'})"
            )
        return LiteralValue(path)

    def _component_dirs(self, component: Any, step: str) -> tuple[Path, Path]:
        """(folder of the component YAML, code folder the command runs in)."""
        source = getattr(component, "_source_path", None)
        base = Path(getattr(component, "_base_path", None) or Path.cwd()).resolve()
        component_dir = Path(source).resolve().parent if source else base
        code = component.code
        if code is None:
            return component_dir, component_dir
        code_text = os.fspath(code) if isinstance(code, str | os.PathLike) else None
        if code_text is None:
            code_text = getattr(code, "path", None)  # a Code asset object
        if not code_text or _is_remote(str(code_text)):
            raise PipelineGraphError(
                f"step {step!r}: component code {code!r} is not a local folder; the local "
                "executor needs 'code:' to be a path relative to the component YAML"
            )
        code_dir = Path(code_text)
        code_dir = (code_dir if code_dir.is_absolute() else base / code_dir).resolve()
        if not code_dir.is_dir():
            raise PipelineGraphError(
                f"step {step!r}: component code folder {code_dir} does not exist "
                f"(from 'code: {code_text}' relative to {base})"
            )
        return component_dir, code_dir

    @staticmethod
    def _expression(data: Any) -> str | None:
        """The data-binding expression of a reference object, or the string itself."""
        from azure.ai.ml.entities._job.pipeline._io import NodeOutput, PipelineInput

        if isinstance(data, PipelineInput | NodeOutput):
            return str(data._data_binding())
        if isinstance(data, str) and "${{" in data:
            return data
        return None

    def _binding(
        self,
        data: Any,
        parent_inputs: Mapping[str, Binding | None],
        prefix: str,
        where: str,
    ) -> Binding | None:
        """Turn a node input's ``_data`` into a binding (None when unbound)."""
        from azure.ai.ml import Input

        expression = self._expression(data)
        if expression is not None:
            return self._parse_expression(expression, parent_inputs, prefix, where)
        if data is None:
            return None
        if isinstance(data, Input):
            if data.path is None:
                return None if data.default is None else LiteralValue(data.default)
            return LiteralValue(str(data.path))
        if isinstance(data, os.PathLike):
            return LiteralValue(os.fspath(data))
        if isinstance(data, bool | int | float | str):
            return LiteralValue(data)
        raise PipelineGraphError(
            f"{where} is bound to {data!r} ({type(data).__name__}), which the local executor "
            "does not understand; bind a literal, a path, a pipeline input or a step output"
        )

    @staticmethod
    def _parse_expression(
        expression: str,
        parent_inputs: Mapping[str, Binding | None],
        prefix: str,
        where: str,
    ) -> Binding | None:
        expression = expression.strip()
        match = _PARENT_INPUT_RE.fullmatch(expression)
        if match:
            input_name = match.group(1)
            if input_name not in parent_inputs:
                raise PipelineGraphError(
                    f"{where} refers to pipeline input {input_name!r}, which the pipeline does "
                    f"not declare; its inputs: {_names(parent_inputs)}"
                )
            return parent_inputs[input_name]
        match = _PARENT_JOB_OUTPUT_RE.fullmatch(expression)
        if match:
            return UpstreamOutput(prefix + match.group(1), match.group(2))
        raise PipelineGraphError(
            f"{where} is bound to the expression {expression!r}; the local executor supports "
            "only ${{parent.inputs.<name>}} and ${{parent.jobs.<node>.outputs.<name>}}"
        )


def _component_identity(component: Any) -> tuple[str, str | None]:
    """(name, version) of a component, read back from its YAML when the SDK hid them."""
    name = str(component.name)
    version = None if component.version is None else str(component.version)
    source = getattr(component, "_source_path", None)
    if name == ANONYMOUS_COMPONENT_NAME and source:
        # A pipeline YAML that references component files marks them anonymous.
        import yaml

        with open(source, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        name = str(data.get("name") or name)
        version = None if data.get("version") is None else str(data["version"])
    return name, version
