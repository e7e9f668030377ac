"""A failing step: what is reported, what is kept, and resuming the run."""

import pytest
from azure.ai.ml import Input, dsl

from sslpipe.execution import PipelineGraph, RunRecord, StepFailedError
from sslpipe.execution.hashing import hash_path

from .helpers import Bench


def _graph_with_a_step_after_the_gate(bench: Bench) -> PipelineGraph:
    """write -> read -> gate -> clock: the gate fails while GATE_FAIL=1."""
    writer, reader = bench.component("writer"), bench.component("reader")
    gate_component, clock = bench.component("gate"), bench.component("clock")

    @dsl.pipeline
    def gated(source: Input) -> None:
        write = writer(source=source, message="m")
        read = reader(text=write.outputs.out)
        gate = gate_component(result=read.outputs.result)
        clock(text=gate.outputs.out)

    job = gated(source=Input(type="uri_file", path=str(bench.root / "source.txt")))
    return PipelineGraph.from_pipeline_job(job)


def test_a_failing_step_stops_the_run_and_says_where_to_look(bench: Bench) -> None:
    executor = bench.executor(env={"GATE_FAIL": "1"})

    with pytest.raises(StepFailedError) as caught:
        executor.run(_graph_with_a_step_after_the_gate(bench), run_id="broken")

    error = caught.value
    log_path = executor.run_dir("broken") / "gate" / "log.txt"
    assert str(error) == f"step 'gate' failed with exit code 3; see its log: {log_path}"
    assert (error.step, error.returncode, error.log_path) == ("gate", 3, log_path)
    assert "gate: simulated failure" in error.tail
    assert "gate: simulated failure" in log_path.read_text(encoding="utf-8")
    record = RunRecord.load(executor.run_dir("broken") / "run.json")
    assert record.status == "failed"
    assert {n: s.status for n, s in record.steps.items()} == {
        "write": "completed",
        "read": "completed",
        "gate": "failed",
        "clock": "skipped",
    }
    assert record.steps["gate"].returncode == 3
    assert bench.runs() == ["writer", "reader", "gate"]  # the clock never started


def test_a_failed_run_leaves_the_outputs_of_earlier_runs_untouched(bench: Bench) -> None:
    graph = _graph_with_a_step_after_the_gate(bench)
    good = bench.executor().run(graph)
    good_dir = bench.workspace / "runs" / good.run_id
    before = hash_path(good_dir)

    with pytest.raises(StepFailedError):
        bench.executor(env={"GATE_FAIL": "1"}, force_rerun=True).run(graph)

    assert hash_path(good_dir) == before


def test_resume_runs_only_the_failed_and_skipped_steps_in_the_same_folder(
    bench: Bench,
) -> None:
    graph = _graph_with_a_step_after_the_gate(bench)
    with pytest.raises(StepFailedError):
        bench.executor(env={"GATE_FAIL": "1"}).run(graph, run_id="flaky")

    record = bench.executor().resume("flaky")  # the cause of the failure is gone now

    assert bench.runs() == ["writer", "reader", "gate", "gate", "clock"]
    assert record.status == "completed"
    assert [s.status for s in record.steps.values()] == ["completed"] * 4
    gate_out = bench.workspace / "runs" / "flaky" / "gate" / "outputs" / "out"
    assert record.steps["gate"].outputs == {"out": str(gate_out)}
    # The re-run gate found the checkpoint its failed attempt left in its output folder.
    assert (gate_out / "final.txt").read_text(encoding="utf-8") == "resumed from checkpoint"
    assert RunRecord.load(bench.workspace / "runs" / "flaky" / "run.json") == record


def test_resuming_a_completed_run_runs_nothing(bench: Bench) -> None:
    executor = bench.executor()
    first = executor.run(bench.tiny_graph())

    again = executor.resume(first.run_id)

    assert again == first
    assert bench.runs() == ["writer", "reader", "gate"]


def test_a_missing_input_path_fails_the_step_before_it_starts(bench: Bench) -> None:
    graph = PipelineGraph.from_pipeline_job(
        bench.tiny_job(), pipeline_inputs={"source": bench.root / "missing.txt"}
    )

    with pytest.raises(StepFailedError, match=r"step 'write' failed: input 'source' .*missing"):
        bench.executor().run(graph)

    assert bench.runs() == []
