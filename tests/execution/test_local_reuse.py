"""Step reuse: what hits the cache, what misses it, and how it is reported."""

import shutil
from pathlib import Path

from azure.ai.ml import Input, dsl

from sslpipe.execution import PipelineGraph

from .helpers import Bench


def test_an_identical_second_run_reuses_every_step(bench: Bench) -> None:
    executor = bench.executor()
    first = executor.run(bench.tiny_graph())
    ran_before = bench.runs()

    second = executor.run(bench.tiny_graph())

    assert bench.runs() == ran_before == ["writer", "reader", "gate"]  # nothing ran again
    assert {s.status for s in second.steps.values()} == {"reused"}
    assert {s.reused_from for s in second.steps.values()} == {first.run_id}
    # Reused outputs are the earlier ones (no copy), and readers are given those paths.
    assert second.steps["write"].outputs == first.steps["write"].outputs
    assert second.steps["read"].inputs == {"text": first.steps["write"].outputs["out"]}
    key = (second.steps["write"].cache_key or "")[:8]
    message = (
        "reused: component code, parameters and inputs unchanged since run "
        f"{first.run_id} (cache key {key})"
    )
    assert f"[write] {message}" in bench.console.lines
    assert message in Path(second.steps["write"].log or "").read_text(encoding="utf-8")


def test_a_changed_parameter_reruns_its_step_and_the_steps_reading_new_data(
    bench: Bench,
) -> None:
    executor = bench.executor()
    executor.run(bench.tiny_graph())

    second = executor.run(bench.tiny_graph(message="goodbye"))

    assert bench.runs() == ["writer", "reader", "gate"] * 2
    assert {s.status for s in second.steps.values()} == {"completed"}


def test_a_changed_upstream_file_reruns_the_steps_that_read_it(bench: Bench) -> None:
    executor = bench.executor()
    executor.run(bench.tiny_graph())

    (bench.root / "source.txt").write_text("new source text\n", encoding="utf-8")
    executor.run(bench.tiny_graph())

    assert bench.runs() == ["writer", "reader", "gate"] * 2


def test_the_same_content_at_another_path_still_reuses(bench: Bench) -> None:
    executor = bench.executor()
    executor.run(bench.tiny_graph())
    copy = shutil.copy(bench.root / "source.txt", bench.root / "elsewhere.txt")

    second = executor.run(
        PipelineGraph.from_pipeline_job(bench.tiny_job(), pipeline_inputs={"source": copy})
    )

    assert second.steps["write"].status == "reused"
    assert bench.runs() == ["writer", "reader", "gate"]


def test_a_changed_script_reruns_its_step_and_readers_of_unchanged_output_are_reused(
    bench: Bench,
) -> None:
    executor = bench.executor()
    executor.run(bench.tiny_graph())

    with open(bench.root / "reader" / "reader.py", "a", encoding="utf-8") as script:
        script.write("# a harmless edit still changes the code hash\n")
    second = executor.run(bench.tiny_graph())

    assert bench.runs() == ["writer", "reader", "gate", "reader"]
    statuses = {name: step.status for name, step in second.steps.items()}
    # The re-run reader wrote the same bytes, so the gate's input content is unchanged.
    assert statuses == {"write": "reused", "read": "completed", "gate": "reused"}


def test_a_non_deterministic_step_always_runs(bench: Bench) -> None:
    writer, clock = bench.component("writer"), bench.component("clock")

    @dsl.pipeline
    def timed(source: Input) -> None:
        write = writer(source=source, message="m")
        clock(text=write.outputs.out)

    job = timed(source=Input(type="uri_file", path=str(bench.root / "source.txt")))
    executor = bench.executor()
    executor.run(PipelineGraph.from_pipeline_job(job))
    second = executor.run(PipelineGraph.from_pipeline_job(job))

    assert bench.runs() == ["writer", "clock", "clock"]
    assert second.steps["clock"].status == "completed"
    assert "[clock] running (is_deterministic: false, always runs)" in bench.console.text()


def test_force_rerun_runs_every_step_and_later_runs_reuse_its_outputs(bench: Bench) -> None:
    bench.executor().run(bench.tiny_graph())

    forced = bench.executor(force_rerun=True).run(bench.tiny_graph())
    third = bench.executor().run(bench.tiny_graph())

    assert bench.runs() == ["writer", "reader", "gate"] * 2
    assert {s.status for s in forced.steps.values()} == {"completed"}
    assert {s.reused_from for s in third.steps.values()} == {forced.run_id}


def test_library_code_outside_the_component_folder_is_part_of_the_code_hash(
    bench: Bench,
) -> None:
    lib_user = bench.component("lib_user")

    @dsl.pipeline
    def greet() -> None:
        lib_user()

    graph = PipelineGraph.from_pipeline_job(greet())
    executor = bench.executor(library_paths=[bench.root / "helperlib"])
    executor.run(graph)
    executor.run(graph)
    (bench.root / "helperlib" / "greeting.txt").write_text("changed", encoding="utf-8")
    third = executor.run(graph)

    assert bench.runs() == ["lib_user", "lib_user"]
    greeting = Path(third.steps["lib_user"].outputs["out"], "greeting.txt")
    assert greeting.read_text(encoding="utf-8") == "changed"  # ran in its code folder


def test_deleted_earlier_outputs_are_not_reused(bench: Bench) -> None:
    executor = bench.executor()
    first = executor.run(bench.tiny_graph())
    shutil.rmtree(executor.run_dir(first.run_id))

    second = executor.run(bench.tiny_graph())

    assert {s.status for s in second.steps.values()} == {"completed"}
    assert bench.runs() == ["writer", "reader", "gate"] * 2


def test_plan_says_what_would_be_reused_without_running_anything(bench: Bench) -> None:
    executor = bench.executor()
    graph = bench.tiny_graph()

    before = executor.plan(graph)
    first = executor.run(graph)
    after = executor.plan(graph)

    assert [(p["name"], p["would_reuse"]) for p in before] == [
        ("write", False),
        ("read", None),  # depends on outputs that do not exist yet
        ("gate", None),
    ]
    assert before[0]["parameters"] == {"message": "hello world", "repeat": 1}
    assert before[1]["inputs"] == {"text": "write.out"}
    assert [p["would_reuse"] for p in after] == [True, True, True]
    assert after[2]["reason"] == f"reused from run {first.run_id}"
    assert bench.runs() == ["writer", "reader", "gate"]  # only the real run ran anything
    assert len(list(executor.runs_dir.iterdir())) == 1
