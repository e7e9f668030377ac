"""The plan behind ``--dry-run``: reuse (which run) or run (why), as the real run then does."""

from pathlib import Path
from typing import Any

from azure.ai.ml import Input, dsl

from sslpipe.execution import PipelineGraph, RunRecord

from .helpers import Bench


def _selected_graph(bench: Bench) -> PipelineGraph:
    """select -> read -> gate; select always runs, as connect_db does (it reads a live store)."""
    selector, reader, gate = (bench.component(n) for n in ("selector", "reader", "gate"))

    @dsl.pipeline
    def selected(source: Input) -> None:
        select = selector(source=source)
        read = reader(text=select.outputs.out)
        gate(result=read.outputs.result)

    job = selected(source=Input(type="uri_file", path=str(bench.root / "source.txt")))
    return PipelineGraph.from_pipeline_job(job)


def _planned(plan: list[dict[str, Any]]) -> dict[str, str]:
    return {step["name"]: "reuse" if step["would_reuse"] else "run" for step in plan}


def _done(record: RunRecord) -> dict[str, str]:
    return {n: "reuse" if s.status == "reused" else "run" for n, s in record.steps.items()}


def test_after_a_step_that_always_runs_the_plan_says_what_the_run_then_does(
    bench: Bench,
) -> None:
    executor = bench.executor()
    graph = _selected_graph(bench)
    first = executor.run(graph)

    plan = executor.plan(graph)
    second = executor.run(graph)
    (bench.root / "source.txt").write_text("the store changed\n", encoding="utf-8")
    changed_plan = executor.plan(graph)
    third = executor.run(graph)

    assert _planned(plan) == _done(second) == {"select": "run", "read": "reuse", "gate": "reuse"}
    assert plan[1]["reused_from"] == first.run_id
    assert plan[1]["assumes"] == [f"select writes what it wrote in run {first.run_id}"]
    # select now writes something else, which the plan cannot know yet: the steps after it run.
    assert _planned(changed_plan) == _done(third) == {"select": "run", "read": "run", "gate": "run"}
    assert changed_plan[1]["reason"] == (
        "reads outputs of select, which runs first: reused only if they are the same files as "
        "before"
    )


def test_the_plan_and_the_run_say_what_changed_since_the_last_run(bench: Bench) -> None:
    executor = bench.executor()
    first = executor.run(bench.tiny_graph())
    graph = bench.tiny_graph(message="goodbye")

    plan = executor.plan(graph)
    second = executor.run(graph)
    with open(bench.root / "reader" / "reader.py", "a", encoding="utf-8") as script:
        script.write("# an edit\n")
    third_plan = executor.plan(graph)
    executor.run(graph)

    why = f"message hello world -> goodbye since run {first.run_id}"
    assert plan[0]["reason"] == why
    assert f"[write] running ({why})" in bench.console.lines
    assert f"[read] running (input text changed since run {first.run_id})" in bench.console.lines
    assert third_plan[1]["reason"] == f"its code changed since run {second.run_id}"
    assert f"[read] running (its code changed since run {second.run_id})" in bench.console.lines
    assert Path(second.steps["write"].outputs["out"], "text.txt").read_text().endswith("goodbye")
