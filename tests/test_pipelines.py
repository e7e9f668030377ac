"""The ``full`` pipeline's graph: MoCo, its classifier and the two baselines it is compared with.

The graph is read the way the local executor reads it (``PipelineGraph.from_pipeline_job``);
nothing is trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import PIPELINES
from pipelines.steps import BASELINE_INPUTS, train_and_evaluate
from sslpipe.config import load_config
from sslpipe.executor import Literal, PipelineGraph, UpstreamOutput

FULL_STEPS = {
    "connect_db",
    "data_prep",
    "moco_train",
    "connect_db_labelled",
    "data_prep_labelled",
    "baseline_classifier_train",
    "baseline_evaluate",
    "scratch_classifier_train",
    "scratch_evaluate",
    "classifier_train",
    "evaluate",
}


def full_graph(tmp_path: Path, *sets: str) -> PipelineGraph:
    config = load_config(None, [f"workspace={tmp_path}", *sets])
    return PipelineGraph.from_pipeline_job(PIPELINES["full"](config))


def literal(graph: PipelineGraph, step: str, name: str) -> object:
    binding = graph.steps[step].bindings[name]
    assert isinstance(binding, Literal), (step, name, binding)
    return binding.value


def test_the_full_report_gets_both_baselines(tmp_path: Path) -> None:
    graph = full_graph(tmp_path)
    assert set(graph.steps) == FULL_STEPS
    bindings = graph.steps["evaluate"].bindings
    assert bindings["baseline"] == UpstreamOutput("baseline_evaluate", "report")
    assert bindings["baseline_scratch"] == UpstreamOutput("scratch_evaluate", "report")
    assert bindings["model"] == UpstreamOutput("classifier_train", "model")
    order = [step.name for step in graph.topological_order()]
    assert order.index("baseline_evaluate") < order.index("evaluate")
    assert order.index("scratch_evaluate") < order.index("evaluate")
    assert literal(graph, "evaluate", "register") is True


@pytest.mark.parametrize("prefix", ["baseline_", "scratch_"])
def test_each_baseline_is_evaluated_on_its_own_and_never_registered(
    tmp_path: Path, prefix: str
) -> None:
    graph = full_graph(tmp_path, "retrain.skip_unchanged=true")
    evaluate = graph.steps[f"{prefix}evaluate"]
    assert evaluate.bindings["model"] == UpstreamOutput(f"{prefix}classifier_train", "model")
    assert evaluate.bindings["data"] == UpstreamOutput("data_prep_labelled", "data")
    assert not set(BASELINE_INPUTS) & set(evaluate.bindings)  # no report of its own to compare
    assert literal(graph, f"{prefix}evaluate", "register") is False
    train = graph.steps[f"{prefix}classifier_train"]
    assert train.upstream_steps() == ["data_prep_labelled"]  # no MoCo backbone
    assert "backbone_model" not in train.bindings
    # The retraining guard compares with the registered model: a baseline always trains.
    assert literal(graph, f"{prefix}classifier_train", "skip_unchanged") is False
    assert literal(graph, "classifier_train", "skip_unchanged") is True


@pytest.mark.parametrize("mode", ["head", "two_stage"])
def test_the_baselines_are_moco_s_network_from_random_init_head_only_and_two_stage(
    tmp_path: Path, mode: str
) -> None:
    graph = full_graph(
        tmp_path,
        "moco.backbone=resnet34",
        "moco.small_stem=true",
        "classifier.image_size=48",
        f"classifier.mode={mode}",
    )
    for prefix, baseline_mode in (("baseline_", "head"), ("scratch_", "two_stage")):
        step = f"{prefix}classifier_train"
        assert literal(graph, step, "backbone") == "torchvision:resnet34:small", step
        assert literal(graph, step, "mode") == baseline_mode, step  # whatever classifier.mode
        assert literal(graph, step, "image_size") == 48, step
    assert literal(graph, "classifier_train", "mode") == mode


def test_an_unknown_baseline_input_is_refused(tmp_path: Path) -> None:
    config = load_config(None, [f"workspace={tmp_path}"])
    with pytest.raises(ValueError, match="no baseline input 'baseline_imagenet'"):
        train_and_evaluate(
            config,
            data=None,
            classifier=config.classifier,
            baselines={"baseline_imagenet": object()},
        )


def test_the_local_dry_run_lists_the_baseline_branches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sslpipe.cli import main

    code = main(["--pipeline", "full", "--dry-run", "--no-demo", "--set", f"workspace={tmp_path}"])
    assert code == 0
    listed = [
        line.split(":")[0].removeprefix("step ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("step ")
    ]
    assert set(listed) == FULL_STEPS
    assert listed.index("scratch_evaluate") < listed.index("evaluate")
