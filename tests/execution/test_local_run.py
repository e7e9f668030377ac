"""Running a graph: order, folders, command resolution, console and log, the run record."""

import re
import shlex
import sys
from pathlib import Path

import pytest
from azure.ai.ml import Input, dsl

from sslpipe.execution import PipelineGraph, RunRecord, StepFailedError
from sslpipe.execution.local import new_run_id

from .helpers import Bench


def test_steps_run_in_dependency_order_not_declaration_order(bench: Bench) -> None:
    writer, reader = bench.component("writer"), bench.component("reader")

    @dsl.pipeline
    def backwards(source: Input) -> None:
        read = reader(upper=True)
        write = writer(source=source, message="m")
        read.inputs.text = write.outputs.out

    job = backwards(source=Input(type="uri_file", path=str(bench.root / "source.txt")))
    record = bench.executor().run(PipelineGraph.from_pipeline_job(job))

    assert bench.runs() == ["writer", "reader"]
    assert list(record.steps) == ["write", "read"]


def test_each_step_writes_its_outputs_and_log_inside_the_run_folder(bench: Bench) -> None:
    executor = bench.executor()

    record = executor.run(bench.tiny_graph())

    run_dir = executor.run_dir(record.run_id)
    write, read = record.steps["write"], record.steps["read"]
    assert write.outputs == {"out": str(run_dir / "write" / "outputs" / "out")}
    assert read.outputs == {"result": str(run_dir / "read" / "outputs" / "result")}
    result = (run_dir / "read" / "outputs" / "result").read_text(encoding="utf-8")
    assert result == "fixture source text\nhello world"
    assert read.inputs == {"text": write.outputs["out"]}  # upstream outputs as absolute paths
    assert write.log == str(run_dir / "write" / "log.txt")


def test_values_with_spaces_and_quotes_reach_the_script_as_one_argument(bench: Bench) -> None:
    tricky = """it's a "quoted"  message; $HOME"""

    record = bench.executor().run(bench.tiny_graph(message=tricky, upper=True))

    argv = record.steps["write"].argv
    assert argv[0] == sys.executable  # the leading "python" of the command
    assert argv[argv.index("--message") + 1] == tricky
    assert "--suffix" not in argv  # optional, unbound: its $[[...]] block is dropped
    read_argv = record.steps["read"].argv
    assert read_argv[read_argv.index("--upper") + 1] == "true"  # booleans as Azure ML writes them
    result = Path(record.steps["read"].outputs["result"]).read_text(encoding="utf-8")
    assert result.endswith(tricky.upper())


def test_a_bound_optional_input_keeps_its_block_in_the_command(bench: Bench) -> None:
    writer = bench.component("writer")

    @dsl.pipeline
    def with_suffix(source: Input) -> None:
        writer(source=source, message="hello", suffix="!", repeat=2)

    job = with_suffix(source=Input(type="uri_file", path=str(bench.root / "source.txt")))
    record = bench.executor().run(PipelineGraph.from_pipeline_job(job))

    step = record.steps["writer"]
    assert step.argv[step.argv.index("--suffix") + 1] == "!"
    assert step.parameters == {"message": "hello", "repeat": 2, "suffix": "!"}
    text = Path(step.outputs["out"], "text.txt").read_text(encoding="utf-8")
    assert text.endswith("hello!\nhello!")


def test_step_output_goes_to_the_console_with_a_prefix_and_to_the_log(bench: Bench) -> None:
    record = bench.executor().run(bench.tiny_graph())

    assert "[write] message: hello world" in bench.console.lines
    assert "[gate] gate: fresh" in bench.console.lines
    log = Path(record.steps["write"].log or "").read_text(encoding="utf-8")
    assert "message: hello world\n" in log


def test_the_console_says_that_a_step_runs_and_why_and_the_log_keeps_its_command(
    bench: Bench,
) -> None:
    record = bench.executor().run(bench.tiny_graph())

    write = record.steps["write"]
    assert "[write] running (no earlier run of this step)" in bench.console.lines
    assert not [line for line in bench.console.lines if "writer.py" in line]
    log = Path(write.log or "").read_text(encoding="utf-8")
    assert f"# command: {shlex.join(write.argv)}\n" in log  # and run.json has the argv
    assert write.argv[1] == "writer.py"


def test_the_run_record_describes_the_run_and_every_step(bench: Bench) -> None:
    executor = bench.executor()
    record = executor.run(bench.tiny_graph(), run_id="first-run")

    saved = RunRecord.load(executor.run_dir("first-run") / "run.json")

    assert saved == record
    assert (saved.run_id, saved.pipeline, saved.status) == ("first-run", "tiny", "completed")
    assert saved.started and saved.ended and saved.started <= saved.ended
    write = saved.steps["write"]
    assert write.status == "completed"
    assert write.component == "writer"
    assert write.parameters == {"message": "hello world", "repeat": 1}
    assert write.inputs == {"source": str(bench.root / "source.txt")}
    assert re.fullmatch(r"[0-9a-f]{64}", write.cache_key or "")
    assert write.returncode == 0
    assert write.duration_s is not None and write.duration_s >= 0
    assert write.reused_from is None
    assert write.argv[1:3] == ["writer.py", "--source"]
    assert [s.status for s in saved.steps.values()] == ["completed"] * 3


def test_a_run_id_cannot_be_used_twice(bench: Bench) -> None:
    executor = bench.executor()
    executor.run(bench.tiny_graph(), run_id="once")

    with pytest.raises(FileExistsError, match=r"run 'once' already exists.*resume"):
        executor.run(bench.tiny_graph(), run_id="once")


def test_generated_run_ids_sort_by_start_time() -> None:
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", new_run_id())


def test_a_step_that_exits_0_without_writing_its_file_output_fails(bench: Bench) -> None:
    lazy = bench.root / "lazy"
    lazy.mkdir()
    (lazy / "lazy.py").write_text("print('forgot to write')\n", encoding="utf-8")
    (lazy / "component.yaml").write_text(
        "name: lazy\ntype: command\ncode: .\nenvironment:\n  image: python:3.11-slim\n"
        "outputs:\n  model:\n    type: uri_file\n"
        "command: python lazy.py --model ${{outputs.model}}\n",
        encoding="utf-8",
    )
    component = bench.component("lazy")

    @dsl.pipeline
    def forgetful() -> None:
        component()

    with pytest.raises(StepFailedError, match=r"step 'lazy' failed: exited 0 but did not write"):
        bench.executor().run(PipelineGraph.from_pipeline_job(forgetful()))
