"""Reading a built PipelineJob into a PipelineGraph, and the graph's own checks.

No ``from __future__ import annotations``: ``@dsl.pipeline`` needs real annotations.
"""

import json
from pathlib import Path

import pytest
from azure.ai.ml import Input, dsl, load_job
from azure.ai.ml.entities import PipelineJob

from sslpipe.execution import (
    InputSpec,
    LiteralValue,
    OutputSpec,
    PipelineGraph,
    PipelineGraphError,
    StepSpec,
    UpstreamOutput,
)

from .helpers import Bench


def _step(name: str, command: str = "run", **fields: object) -> StepSpec:
    """A hand-made step, for checks that need no azure-ai-ml objects."""
    defaults: dict[str, object] = {
        "component_name": name,
        "component_version": "1",
        "command": command,
        "code_dir": Path("/code"),
        "component_dir": Path("/code"),
        "inputs": {},
        "outputs": {"out": OutputSpec("uri_folder")},
    }
    return StepSpec(name=name, **(defaults | fields))  # type: ignore[arg-type]


def test_steps_are_ordered_by_dependencies_not_by_declaration(bench: Bench) -> None:
    writer, reader = bench.component("writer"), bench.component("reader")

    @dsl.pipeline
    def backwards(source: Input) -> None:
        read = reader(upper=True)  # declared first, bound to the writer's output below
        write = writer(source=source, message="m")
        read.inputs.text = write.outputs.out

    graph = PipelineGraph.from_pipeline_job(
        backwards(source=Input(type="uri_file", path=str(bench.root / "source.txt")))
    )

    assert list(graph.steps) == ["read", "write"]
    assert [s.name for s in graph.topological_order()] == ["write", "read"]
    assert graph.steps["read"].bindings["text"] == UpstreamOutput("write", "out")


def test_pipeline_inputs_resolve_to_given_values_or_to_defaults(bench: Bench) -> None:
    graph = PipelineGraph.from_pipeline_job(bench.tiny_job(), pipeline_inputs={"message": "bye"})

    write, read = graph.steps["write"], graph.steps["read"]
    assert write.bindings["message"] == LiteralValue("bye")  # given
    assert read.bindings["upper"] == LiteralValue(False)  # pipeline default, still a bool
    assert write.bindings["repeat"] == LiteralValue(1)  # component default
    assert "suffix" not in write.bindings  # optional and unbound
    assert write.bindings["source"] == LiteralValue(str(bench.root / "source.txt"))
    assert graph.inputs["message"] == "bye"


def test_relative_local_paths_in_pipeline_inputs_become_absolute(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(bench.root)

    graph = PipelineGraph.from_pipeline_job(
        bench.tiny_job(), pipeline_inputs={"source": "helperlib/greeting.txt"}
    )

    assert graph.steps["write"].bindings["source"] == LiteralValue(
        str(bench.root / "helperlib" / "greeting.txt")
    )


def test_an_unbound_required_input_is_reported_with_step_and_input(bench: Bench) -> None:
    reader = bench.component("reader")

    @dsl.pipeline
    def forgetful() -> None:
        reader(upper=True)

    with pytest.raises(PipelineGraphError, match=r"step 'reader'.*required input 'text' is not"):
        PipelineGraph.from_pipeline_job(forgetful())


def test_an_unknown_pipeline_input_override_lists_the_declared_inputs(bench: Bench) -> None:
    with pytest.raises(PipelineGraphError, match=r"'mesage'.*inputs: message, source, upper"):
        PipelineGraph.from_pipeline_job(bench.tiny_job(), pipeline_inputs={"mesage": "typo"})


def test_remote_data_is_rejected_with_a_hint_to_pass_a_local_path(bench: Bench) -> None:
    job = bench.tiny_job(source=Input(type="uri_file", path="azureml:ids:1"))

    with pytest.raises(PipelineGraphError, match=r"input 'source' is bound to remote data"):
        PipelineGraph.from_pipeline_job(job)
    # ...and overriding the pipeline input with a local path makes it runnable.
    graph = PipelineGraph.from_pipeline_job(
        job, pipeline_inputs={"source": bench.root / "source.txt"}
    )
    assert graph.steps["write"].bindings["source"] == LiteralValue(str(bench.root / "source.txt"))


def test_a_reference_to_an_unknown_step_or_output_is_reported() -> None:
    consumer_inputs = {"data": InputSpec("uri_folder")}

    with pytest.raises(PipelineGraphError, match=r"step 'b'.*'ghost', but the pipeline has no"):
        PipelineGraph(
            "p",
            {
                "b": _step(
                    "b", inputs=consumer_inputs, bindings={"data": UpstreamOutput("ghost", "out")}
                )
            },
        )
    with pytest.raises(PipelineGraphError, match=r"output 'nope' of step 'a', which declares no"):
        PipelineGraph(
            "p",
            {
                "a": _step("a"),
                "b": _step(
                    "b", inputs=consumer_inputs, bindings={"data": UpstreamOutput("a", "nope")}
                ),
            },
        )


def test_a_cycle_is_reported_with_the_steps_in_it() -> None:
    data = {"data": InputSpec("uri_folder")}
    steps = {
        "a": _step("a", inputs=data, bindings={"data": UpstreamOutput("b", "out")}),
        "b": _step("b", inputs=data, bindings={"data": UpstreamOutput("a", "out")}),
    }

    with pytest.raises(PipelineGraphError, match=r"cycle: a -> b -> a"):
        PipelineGraph("p", steps)


def test_an_unbound_optional_input_outside_an_optional_block_is_reported() -> None:
    step = _step("a", command="run --n ${{inputs.n}}", inputs={"n": InputSpec("integer", True)})

    with pytest.raises(PipelineGraphError, match=r"optional input 'n' is not bound.*outside"):
        PipelineGraph("p", {"a": step})


def test_a_command_placeholder_for_an_undeclared_input_is_reported() -> None:
    step = _step("a", "run ${{inputs.nme}}", inputs={"name": InputSpec("string", True)})

    with pytest.raises(PipelineGraphError, match=r"inputs\.nme.*declared inputs: name"):
        PipelineGraph("p", {"a": step})


def test_component_folders_and_settings_are_read_from_the_yaml(bench: Bench) -> None:
    lib_user, clock, writer = (bench.component(n) for n in ("lib_user", "clock", "writer"))

    @dsl.pipeline
    def settings(source: Input) -> None:
        write = writer(source=source, message="m")
        lib_user()
        clock(text=write.outputs.out)

    graph = PipelineGraph.from_pipeline_job(
        settings(source=Input(type="uri_file", path=str(bench.root / "source.txt")))
    )

    lib_step, clock_step = graph.steps["lib_user"], graph.steps["clock"]
    assert lib_step.code_dir == bench.root  # "code: .." is relative to the component YAML
    assert lib_step.component_dir == bench.root / "lib_user"
    assert graph.steps["write"].is_deterministic is True
    assert clock_step.is_deterministic is False
    assert clock_step.distribution == {"type": "pytorch", "process_count_per_instance": 1}
    assert clock_step.resources == {"instance_count": 1}
    assert clock_step.outputs == {"stamp": OutputSpec("uri_file")}


def test_a_graph_survives_a_round_trip_through_json(bench: Bench) -> None:
    graph = bench.tiny_graph()

    assert PipelineGraph.from_dict(json.loads(json.dumps(graph.to_dict()))) == graph


def test_a_yaml_pipeline_gives_the_same_kind_of_graph_as_a_dsl_pipeline(bench: Bench) -> None:
    job = load_job(bench.root / "pipeline.yaml")
    assert isinstance(job, PipelineJob)

    graph = PipelineGraph.from_pipeline_job(job)

    write, read = graph.steps["write"], graph.steps["read"]
    assert (write.component_name, read.component_name) == ("writer", "reader")
    assert write.bindings["source"] == LiteralValue(str(bench.root / "source.txt"))
    assert write.bindings["message"] == LiteralValue("hello world")
    assert read.bindings == {"text": UpstreamOutput("write", "out"), "upper": LiteralValue(True)}


def test_sub_pipelines_are_flattened_into_prefixed_steps(bench: Bench) -> None:
    writer, reader = bench.component("writer"), bench.component("reader")

    @dsl.pipeline
    def write_then_read(source: Input, upper: bool = True) -> dict:
        write = writer(source=source, message="inner")
        read = reader(text=write.outputs.out, upper=upper)
        return {"result": read.outputs.result}

    @dsl.pipeline
    def outer(source: Input) -> None:
        first = write_then_read(source=source)
        writer(source=first.outputs["result"], message="after")

    graph = PipelineGraph.from_pipeline_job(
        outer(source=Input(type="uri_file", path=str(bench.root / "source.txt")))
    )

    assert [s.name for s in graph.topological_order()] == [
        "first.write",
        "first.read",
        "writer",
    ]
    assert graph.steps["first.read"].bindings["text"] == UpstreamOutput("first.write", "out")
    assert graph.steps["first.read"].bindings["upper"] == LiteralValue(True)
    assert graph.steps["writer"].bindings["source"] == UpstreamOutput("first.read", "result")
