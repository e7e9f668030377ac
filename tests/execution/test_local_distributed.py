"""Steps with a PyTorch distribution: run under torchrun on this machine, refused on >1 machine."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from azure.ai.ml import dsl
from azure.ai.ml.entities import JobResourceConfiguration

from pipelines import PIPELINES
from sslpipe.core.config import ConfigError, load_config
from sslpipe.execution import CommandError, PipelineGraph, PipelineGraphError, StepFailedError
from sslpipe.execution.cache import compute_cache_key
from sslpipe.execution.commands import torchrun_argv

from .helpers import Bench

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def ranks_graph(bench: Bench, *, instances: int = 1, **inputs: int) -> PipelineGraph:
    ranks = bench.component("ranks")

    @dsl.pipeline
    def distributed_step() -> None:
        node = ranks(**inputs)
        node.name = "ranks"
        if instances != 1:
            node.resources = JobResourceConfiguration(instance_count=instances)

    return PipelineGraph.from_pipeline_job(distributed_step())


def test_a_module_command_runs_under_torchrun_with_one_process_per_count() -> None:
    argv = [sys.executable, "-m", "components.moco_train.main", "--epochs", "2"]
    assert torchrun_argv(argv, 4) == [
        *TORCHRUN,
        "--nproc_per_node=4",
        "-m",
        "components.moco_train.main",
        "--epochs",
        "2",
    ]


def test_a_script_command_runs_under_torchrun_too() -> None:
    assert torchrun_argv(["python", "train.py", "--x", "1"], 2) == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        "--x",
        "1",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["python"], "no script to run"),
        (["python", "-u", "train.py"], "no interpreter options"),
    ],
)
def test_commands_torchrun_cannot_start_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        torchrun_argv(argv, 2)


def test_the_graph_reads_the_process_count_and_the_cache_key_depends_on_it(bench: Bench) -> None:
    step = ranks_graph(bench).steps["ranks"]
    assert (step.processes, step.instance_count) == (2, 1)
    single = dataclasses.replace(step, distribution={"type": "pytorch"})
    assert single.processes == 1
    keys = {
        compute_cache_key(s, code_hash="c", parameters={}, input_hashes={}) for s in (step, single)
    }
    assert len(keys) == 2


def test_a_two_process_step_runs_under_torchrun_and_gathers_both_ranks(bench: Bench) -> None:
    record = bench.executor().run(ranks_graph(bench))

    step = record.steps["ranks"]
    assert step.status == "completed"
    assert step.argv[: len(TORCHRUN) + 1] == [*TORCHRUN, "--nproc_per_node=2"]
    assert step.argv[len(TORCHRUN) + 1 : len(TORCHRUN) + 3] == ["-m", "ranks"]
    report = json.loads(Path(step.outputs["out"], "ranks.json").read_text(encoding="utf-8"))
    assert report == {"world_size": 2, "ranks": [0, 1]}
    assert bench.runs() == ["ranks"]  # rank 0 alone counted
    lines = bench.console.lines
    assert "[ranks] rank 0 of 2" in lines and "[ranks] rank 1 of 2" in lines
    log = Path(step.log or "").read_text(encoding="utf-8")
    assert "rank 1 of 2" in log and "torch.distributed.run" in log


def test_a_step_fails_when_any_of_its_processes_fails(bench: Bench) -> None:
    executor = bench.executor()
    with pytest.raises(StepFailedError, match=r"step 'ranks' failed with exit code") as err:
        executor.run(ranks_graph(bench, fail_rank=1), run_id="fails")

    assert err.value.returncode != 0
    record = json.loads((executor.run_dir("fails") / "run.json").read_text(encoding="utf-8"))
    assert record["steps"]["ranks"]["status"] == "failed"
    assert "rank 1 fails on purpose" in Path(err.value.log_path).read_text(encoding="utf-8")


def test_a_step_on_several_machines_is_refused_as_a_config_error(bench: Bench) -> None:
    with pytest.raises(PipelineGraphError, match=r"asks for 3 machines.*--backend azureml"):
        ranks_graph(bench, instances=3)
    assert issubclass(PipelineGraphError, ConfigError)


def test_the_moco_pipeline_trains_with_the_configured_process_count(tmp_path: Path) -> None:
    config = load_config(None, [f"workspace={tmp_path}", "moco.processes_per_node=2"])
    step = PipelineGraph.from_pipeline_job(PIPELINES["moco"](config)).steps["moco_train"]
    assert (step.processes, step.instance_count) == (2, 1)
    assert step.bindings["processes_per_node"].value == 2  # type: ignore[union-attr]
    assert (
        PipelineGraph.from_pipeline_job(
            PIPELINES["moco"](load_config(None, [f"workspace={tmp_path}"]))
        )
        .steps["moco_train"]
        .processes
        == 1
    )


def test_moco_on_several_nodes_is_one_error_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sslpipe.cli.pipelines import main

    code = main(["--pipeline", "moco", "--set", f"workspace={tmp_path}", "--set", "moco.nodes=2"])

    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "moco.nodes" in lines[0] and "--backend azureml" in lines[0]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
