"""Live state outside the cache key's files: registry references, the registry, cached weights.

Real processes and a real SQLite MLflow registry; the fixture components stand for
classifier_train (``model_user``: a backbone reference) and evaluate (``registrar``: registers).
"""

import logging
from pathlib import Path

import pytest
import torch
from azure.ai.ml import Input, dsl
from mlflow.tracking import MlflowClient
from torchvision import models

from sslpipe.core.logs import get_logger
from sslpipe.execution import PipelineGraph, RunRecord, StepFailedError
from sslpipe.execution.live import (
    Effective,
    RegistryLiveState,
    RegistryUse,
    moco_effective_sizes,
)

from .helpers import Bench

TRACKING = "MLFLOW_TRACKING_URI"
BACKBONE = "demo-backbone"
USES_A_BACKBONE = RegistryLiveState(
    {"model_user": RegistryUse(references=("backbone",), torchvision=("backbone",))}
)


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register(uri: str, name: str, source: Path) -> str:
    """A new version of ``name`` in the registry at ``uri``; returns its number."""
    client = _client(uri)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return str(client.create_model_version(name, str(source)).version)


def versions(uri: str, name: str) -> list[str]:
    return sorted(str(v.version) for v in _client(uri).search_model_versions(f"name = '{name}'"))


@pytest.fixture
def registry(tmp_path: Path) -> str:
    """A SQLite registry holding version 1 of demo-backbone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register(uri, BACKBONE, tmp_path)
    return uri


def _user_graph(bench: Bench, backbone: str) -> PipelineGraph:
    user = bench.component("model_user")

    @dsl.pipeline
    def train() -> None:
        user(backbone=backbone)

    return PipelineGraph.from_pipeline_job(train())


def test_a_new_version_of_a_referenced_model_reruns_the_step_on_that_version(
    bench: Bench, registry: str, tmp_path: Path
) -> None:
    graph = _user_graph(bench, f"{BACKBONE}@latest")
    executor = bench.executor(env={TRACKING: registry}, live_state=USES_A_BACKBONE)
    first = executor.run(graph)
    second = executor.run(graph)
    register(registry, BACKBONE, tmp_path)  # version 2 becomes @latest
    third = executor.run(graph)

    assert bench.runs() == ["model_user", "model_user"]
    assert second.steps["model_user"].status == "reused"
    # The step gets the version it was keyed on, and run.json says which one it was.
    for record, version in ((first, "1"), (third, "2")):
        step = record.steps["model_user"]
        assert step.parameters == {"backbone": f"{BACKBONE}/{version}"}
        assert step.live["key"]["backbone.model"]["version"] == version
        assert Path(step.outputs["out"], "backbone.txt").read_text() == f"{BACKBONE}/{version}"
    assert third.steps["model_user"].status == "completed"
    assert f"[model_user] backbone: {BACKBONE}@latest is {BACKBONE}/2" in bench.console.lines
    assert (
        f"[model_user] running (backbone {BACKBONE}/1 -> {BACKBONE}/2 since run {second.run_id})"
        in bench.console.lines
    )


def test_every_reference_form_is_pinned_when_the_run_is_planned(
    bench: Bench, registry: str, tmp_path: Path
) -> None:
    register(registry, BACKBONE, tmp_path)
    _client(registry).set_registered_model_alias(BACKBONE, "champion", "1")
    executor = bench.executor(env={TRACKING: registry}, live_state=USES_A_BACKBONE)
    pinned = {
        reference: executor.plan(_user_graph(bench, reference))[0]["parameters"]["backbone"]
        for reference in (BACKBONE, f"{BACKBONE}/1", f"{BACKBONE}@latest", f"{BACKBONE}@champion")
    }

    assert pinned == {
        BACKBONE: f"{BACKBONE}/2",
        f"{BACKBONE}/1": f"{BACKBONE}/1",
        f"{BACKBONE}@latest": f"{BACKBONE}/2",
        f"{BACKBONE}@champion": f"{BACKBONE}/1",
    }
    assert bench.runs() == []


def test_a_reference_that_names_nothing_fails_the_run_before_any_step_runs(
    bench: Bench, registry: str
) -> None:
    writer, user = bench.component("writer"), bench.component("model_user")

    @dsl.pipeline
    def train(source: Input) -> None:
        writer(source=source, message="m")
        user(backbone="ghost@latest")

    job = train(source=Input(type="uri_file", path=str(bench.root / "source.txt")))
    executor = bench.executor(env={TRACKING: registry}, live_state=USES_A_BACKBONE)

    with pytest.raises(StepFailedError, match=r"'ghost@latest': no registered model named 'ghost'"):
        executor.run(PipelineGraph.from_pipeline_job(job), run_id="ghost")

    record = RunRecord.load(executor.run_dir("ghost") / "run.json")
    assert {n: s.status for n, s in record.steps.items()} == {
        "writer": "skipped",  # it needs no model, yet nothing runs on a run that cannot finish
        "model_user": "failed",
    }
    assert bench.runs() == []


def test_a_resumed_run_keeps_the_versions_pinned_when_it_started(
    bench: Bench, registry: str, tmp_path: Path
) -> None:
    writer, reader = bench.component("writer"), bench.component("reader")
    gate, user = bench.component("gate"), bench.component("model_user")

    @dsl.pipeline
    def gated(source: Input) -> None:
        write = writer(source=source, message="m")
        read = reader(text=write.outputs.out)
        gate(result=read.outputs.result)
        user(backbone=f"{BACKBONE}@latest")  # after the gate: declared last, reads nothing

    job = gated(source=Input(type="uri_file", path=str(bench.root / "source.txt")))
    graph = PipelineGraph.from_pipeline_job(job)
    failing = bench.executor(env={TRACKING: registry, "GATE_FAIL": "1"}, live_state=USES_A_BACKBONE)
    with pytest.raises(StepFailedError, match="'gate' failed"):
        failing.run(graph, run_id="pinned")
    register(registry, BACKBONE, tmp_path)  # version 2, registered while the run was stopped

    resumed = bench.executor(env={TRACKING: registry}, live_state=USES_A_BACKBONE).resume("pinned")

    assert resumed.status == "completed"
    assert resumed.steps["model_user"].parameters == {"backbone": f"{BACKBONE}/1"}


def test_a_step_that_registers_runs_again_when_the_registry_changes(
    bench: Bench, tmp_path: Path
) -> None:
    registrar = bench.component("registrar")
    rules = RegistryLiveState({"registrar": RegistryUse(registry_when="register")})

    @dsl.pipeline
    def publish(register: bool) -> None:
        registrar(model_name="demo-model", register=register)

    def run(uri: str, *, register: bool = True) -> str:
        graph = PipelineGraph.from_pipeline_job(publish(register=register))
        record = bench.executor(env={TRACKING: uri}, live_state=rules).run(graph)
        return record.steps["registrar"].status

    first, second = (f"sqlite:///{tmp_path / name}" for name in ("first.db", "second.db"))
    assert [run(first), run(first), run(second)] == ["completed", "reused", "completed"]
    assert versions(first, "demo-model") == ["1"]
    assert versions(second, "demo-model") == ["1"]  # registered in the registry now in use
    # A step that registers nothing (a baseline's evaluate) does not care where the registry is.
    assert [run(first, register=False), run(second, register=False)] == ["completed", "reused"]


def test_torchvision_weights_in_the_hub_cache_are_part_of_the_key(
    bench: Bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # the steps' hub cache too
    graph = _user_graph(bench, "torchvision:resnet18")
    executor = bench.executor(live_state=USES_A_BACKBONE)
    without = executor.run(graph)
    reused = executor.run(graph)
    weights = Path(
        torch.hub.get_dir(), "checkpoints", Path(models.ResNet18_Weights.DEFAULT.url).name
    )
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"stand-in for ImageNet weights")
    cached = executor.run(graph)
    weights.write_bytes(b"other weights under the same name")
    changed = executor.run(graph)

    assert [r.steps["model_user"].status for r in (without, reused, cached, changed)] == [
        "completed",
        "reused",
        "completed",
        "completed",
    ]
    keys = [r.steps["model_user"].live["key"] for r in (without, cached)]
    assert keys[0] == {"backbone.torchvision_weights": None}
    assert keys[1]["backbone.torchvision_weights"].startswith(f"{weights.name}:")
    # The small stem never loads ImageNet weights: the cache does not matter to it.
    small = _user_graph(bench, "torchvision:resnet18:small").steps["model_user"]
    assert USES_A_BACKBONE.resolve(small, {"backbone": "torchvision:resnet18:small"}, {}).key == {}


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        (64, {"queue_size": 32}),  # 64 images: a 4096-key queue would hold positives
        (5000, {}),  # enough images: the configured values are used
        (20, {"batch_size": 20, "queue_size": 20}),
    ],
)
def test_moco_s_effective_queue_and_batch_come_from_the_prepared_data(
    tmp_path: Path, images: int, expected: dict[str, int]
) -> None:
    rows = "".join(f"{i},images/{i}.jpeg,\n" for i in range(images))
    (tmp_path / "manifest.csv").write_text("id,path,label\n" + rows, encoding="utf-8")
    parameters = {"batch_size": 32, "queue_size": 4096, "nodes": 1, "processes_per_node": 1}

    found = moco_effective_sizes(parameters, {"data": str(tmp_path)})

    assert {name: value.value for name, value in found.items()} == expected
    if "queue_size" in expected:
        assert found["queue_size"].why.startswith(f"configured 4096; {images} images support")
    unknown = moco_effective_sizes(parameters, {"data": "data_prep.data"})  # not prepared yet
    assert unknown["queue_size"] == Effective(
        4096, "configured; shrunk if the prepared images are too few, known after data_prep"
    )


def test_planning_moco_s_sizes_prints_none_of_the_step_s_warnings(tmp_path: Path) -> None:
    # The plan says it in its own words; moco_train warns when it really shrinks them.
    rows = "".join(f"{i},images/{i}.jpeg,\n" for i in range(20))
    (tmp_path / "manifest.csv").write_text("id,path,label\n" + rows, encoding="utf-8")
    parameters = {"batch_size": 32, "queue_size": 4096, "nodes": 1, "processes_per_node": 1}
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    library = get_logger("test").parent
    assert library is not None
    library.addHandler(handler)
    try:
        found = moco_effective_sizes(parameters, {"data": str(tmp_path)})
    finally:
        library.removeHandler(handler)
    assert found["queue_size"].value == 20
    assert [r.getMessage() for r in records] == []
