"""The one place that reads azure-ai-ml objects: a built ``PipelineJob`` -> graph model.

:meth:`sslpipe.execution.graph.PipelineGraph.from_pipeline_job` calls :func:`read_pipeline_job`;
the graph model itself (:mod:`sslpipe.execution.graph`) never touches the SDK.

How the ``PipelineJob`` is read (public API wherever the pinned azure-ai-ml has one):

* ``job.jobs`` maps node names to nodes: ``Command`` nodes become steps, ``Pipeline`` nodes
  (sub-pipelines) are flattened into steps named ``<sub>.<inner>``.
* ``node.component`` is the ``CommandComponent``: ``command``, ``inputs`` (type, optional,
  default), ``outputs``, ``is_deterministic``, ``code`` (relative to ``base_path``, the
  folder of the component YAML) and the YAML file it was loaded from.
* What a node input is bound to: ``None`` (unbound), a literal, an ``Input`` (a path), or a
  reference object (``PipelineInput`` / ``NodeOutput``). References are turned into their
  data-binding expressions (``${{parent.inputs.x}}``, ``${{parent.jobs.<node>.outputs.<name>}}``,
  which is what ``str()`` of a reference gives) so that pipelines built with ``@dsl.pipeline``
  and pipelines loaded from YAML (whose bindings *are* such strings) go through one parser.
* Pipeline input values come from ``job.inputs[name].result()``; the names the pipeline
  declares (including unset optional ones, which ``job.inputs`` leaves out) from
  ``job.component.inputs``.

The node's serialised dict is deliberately *not* the source of truth: it serialises boolean
literals as ``1``/``0``, defaults as strings and local paths as ``azureml:<path>``. Only a
node's ``environment_variables``, ``distribution`` and ``resources`` are read from it (plain
dicts there).

Private SDK access that remains (no public API serves) is isolated in the functions of the
"private azure-ai-ml access" section below, one function per access, each checked against the
pinned SDK by ``tests/execution/test_azureml_adapter.py``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sslpipe.core.logs import quieted
from sslpipe.execution.graph import (
    PRIMITIVE_TYPES,
    REMOTE_PREFIXES,
    STEP_SEPARATOR,
    Binding,
    InputSpec,
    LiteralValue,
    OutputSpec,
    PipelineGraphError,
    StepSpec,
    UpstreamOutput,
    _names,
    _resolve_aliases,
)

ANONYMOUS_COMPONENT_NAME = "azureml_anonymous"
"""The name azure-ai-ml gives components loaded inline by a pipeline YAML."""

_PARENT_INPUT_RE = re.compile(r"\$\{\{\s*parent\.inputs\.([\w.]+)\s*\}\}")
_PARENT_JOB_OUTPUT_RE = re.compile(r"\$\{\{\s*parent\.jobs\.([\w.-]+)\.outputs\.(\w+)\s*\}\}")
_PARENT_OUTPUT_RE = re.compile(r"\$\{\{\s*parent\.outputs\.(\w+)\s*\}\}")


def read_pipeline_job(
    job: Any, *, pipeline_inputs: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, StepSpec], dict[str, Any]]:
    """Read a built ``PipelineJob`` into (pipeline name, steps, resolved pipeline inputs).

    See :meth:`sslpipe.execution.graph.PipelineGraph.from_pipeline_job`, which validates the
    result by building the :class:`~sslpipe.execution.graph.PipelineGraph`.
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
    with quieted(logging.getLogger("azure.ai.ml")):  # its 'experimental class' warnings
        reader.collect(job.jobs, prefix="", parent_inputs=values, steps=steps, aliases=aliases)
    steps = {name: _resolve_aliases(step, aliases) for name, step in steps.items()}
    name = job.display_name or job.name or getattr(job.component, "name", None) or "pipeline"
    resolved = {n: (v.value if isinstance(v, LiteralValue) else None) for n, v in values.items()}
    return str(name), steps, resolved


# --------------------------------------------------------------------------- private azure-ai-ml
# Each function below is the only place that touches one private part of azure-ai-ml; the
# comment says why no public API serves. tests/execution/test_azureml_adapter.py checks each
# against the installed SDK and names its version when one changes.


def node_io_data(node_io: Any) -> Any:
    """What a node input/output is bound to (``NodeInput._data`` / ``NodeOutput._data``).

    Private because: the public ``path`` property raises for literals and unbound inputs,
    and ``result()`` exists only on ``PipelineInput``; nothing public returns the bound value
    (literal, ``Input``, ``PipelineInput``/``NodeOutput`` reference or expression string).
    """
    return node_io._data


def bound_value(value: Any) -> Any:
    """What a node or pipeline input is bound to (:func:`node_io_data`), or ``value`` itself
    when it is a plain value rather than an SDK input."""
    return node_io_data(value) if hasattr(value, "_data") else value


def component_source_path(component: Any) -> str | None:
    """The YAML file a component was loaded from (``Component._source_path``), or None.

    Private because: components expose ``base_path`` (the YAML's folder) publicly, but not
    the file itself, which is needed to read back the name/version of anonymous components.
    """
    source = getattr(component, "_source_path", None)
    return None if source is None else str(source)


def node_settings(node: Any) -> dict[str, Any]:
    """A command node's serialised form (``BaseNode._to_dict()``), as plain dicts.

    Private because: the public ``node.distribution`` / ``node.resources`` are SDK objects
    whose only dict forms are private too, and the public ``dump()`` writes this same
    ``_to_dict()`` as YAML text only (reading it back would add a YAML round trip that can
    change value types).
    """
    data: dict[str, Any] = node._to_dict()
    return data


def reference_types() -> tuple[type, ...]:
    """The classes of reference bindings: ``PipelineInput`` and ``NodeOutput``.

    Private because: azure-ai-ml exports neither class publicly; they live in
    ``azure.ai.ml.entities._job.pipeline._io``. (Their data-binding expression is read with the
    public ``str()``.)
    """
    from azure.ai.ml.entities._job.pipeline._io import NodeOutput, PipelineInput

    return (PipelineInput, NodeOutput)


# --------------------------------------------------------------------------- reading


def _job_base_dir(job: Any) -> Path:
    """The folder that relative local paths in the job are relative to."""
    base = getattr(job, "base_path", None)
    return Path(base).resolve() if base else Path.cwd()


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
            data = node_io_data(node_input) if node_input is not None else None
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
                expression = self._expression(node_io_data(node_output))
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
            data = node_io_data(node_input) if node_input is not None else None
            binding = self._binding(data, parent_inputs, prefix, where)
            if binding is None and spec.default is not None:
                binding = LiteralValue(spec.default)
            if binding is not None:
                bindings[input_name] = self._typed(binding, spec, where)
        node_dict = node_settings(node)
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
        source = component_source_path(component)
        base = Path(getattr(component, "base_path", None) or Path.cwd()).resolve()
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
        if isinstance(data, reference_types()):
            return str(data)
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
    source = component_source_path(component)
    if name == ANONYMOUS_COMPONENT_NAME and source:
        # A pipeline YAML that references component files marks them anonymous.
        import yaml

        with open(source, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        name = str(data.get("name") or name)
        version = None if data.get("version") is None else str(data["version"])
    return name, version
