"""The ``full`` pipeline's graph: MoCo, its classifier and the two baselines it is compared with.

The graph is read the way the local executor reads it (``PipelineGraph.from_pipeline_job``);
nothing is trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import PIPELINES
from pipelines.steps import BASELINE_INPUTS, train_and_evaluate
from sslpipe.core.config import load_config
from sslpipe.execution import LiteralValue, PipelineGraph, UpstreamOutput

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
    assert isinstance(binding, LiteralValue), (step, name, binding)
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
    from sslpipe.cli.pipelines import main

    code = main(["--pipeline", "full", "--dry-run", "--no-demo", "--set", f"workspace={tmp_path}"])
    assert code == 0
    listed = [
        line.split(":")[0].removeprefix("step ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("step ")
    ]
    assert set(listed) == FULL_STEPS
    assert listed.index("scratch_evaluate") < listed.index("evaluate")


def _registry_with_a_backbone(tmp_path: Path) -> str:
    """The workspace's registry (tracking URI) with version 1 of moco-backbone."""
    from mlflow.tracking import MlflowClient

    uri = load_config(None, [f"workspace={tmp_path}"]).tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("moco-backbone")
    client.create_model_version("moco-backbone", str(tmp_path))
    return uri


def test_the_local_run_pins_the_classifier_s_backbone_and_keys_the_registering_steps(
    tmp_path: Path,
) -> None:
    from sslpipe.execution import LocalExecutor
    from sslpipe.execution.live import project_live_state

    uri = _registry_with_a_backbone(tmp_path)
    config = load_config(None, [f"workspace={tmp_path}"])
    executor = LocalExecutor(
        tmp_path, env={"MLFLOW_TRACKING_URI": uri}, live_state=project_live_state()
    )
    classifier = {
        p["name"]: p
        for p in executor.plan(PipelineGraph.from_pipeline_job(PIPELINES["classifier"](config)))
    }
    assert classifier["classifier_train"]["parameters"]["backbone"] == "moco-backbone/1"
    assert classifier["classifier_train"]["configured"] == {"backbone": "moco-backbone@latest"}

    graph = full_graph(tmp_path)
    resolver = project_live_state()

    def key(step: str) -> dict[str, object]:
        spec = graph.steps[step]
        parameters = {n: b.value for n, b in spec.bindings.items() if isinstance(b, LiteralValue)}
        return resolver.resolve(spec, parameters, {"MLFLOW_TRACKING_URI": uri}).key

    for step in ("moco_train", "evaluate"):  # they register: in this registry
        assert key(step) == {"tracking_uri": uri}, step
    assert key("classifier_train") == {}  # trains on moco_train's folder, not on a reference
    assert key("baseline_evaluate") == key("scratch_evaluate") == {}  # registers nothing
    # The seed's baseline loads torchvision's ImageNet weights when they are in the hub cache.
    assert set(key("baseline_classifier_train")) == {"backbone.torchvision_weights"}


def test_the_local_dry_run_says_when_the_classifier_would_fail_and_creates_no_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sslpipe.cli.pipelines import main

    code = main(["--pipeline", "classifier", "--dry-run", "--set", f"workspace={tmp_path}"])

    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    train = next(line for line in lines if line.startswith("step classifier_train:"))
    assert train.startswith(
        "step classifier_train: run (would fail: input 'backbone' = 'moco-backbone@latest': "
        "no registered model named 'moco-backbone' in sqlite:///"
    )
    assert not (tmp_path / "mlflow.db").exists()
