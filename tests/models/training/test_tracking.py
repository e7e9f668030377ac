"""Tracking: training without MLflow or Azure SDKs, the local fallback and the MLflow tracker."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sslpipe.core.io import read_journal
from sslpipe.models.training.tracking import (
    RUN_LOG,
    LocalTracker,
    MlflowMissingError,
    MlflowTracker,
    Tracker,
    default_tracker,
    require_mlflow,
)
from tests.blocked_imports import without_packages
from tests.classifier_testkit import make_data

REPO = Path(__file__).resolve().parents[3]

# A machine with the training dependencies only (the GPU machines): `import mlflow`,
# `import azure...` and `import yaml` fail.
WITHOUT_MLFLOW = (
    without_packages("mlflow", "azure", "yaml")
    + """
import json, sys
from pathlib import Path

from sslpipe.core.config import ClassifierConfig, MocoConfig
from sslpipe.steps.classifier_train import run_classifier_train
from sslpipe.steps.moco_train import run_moco_train

data, out = Path(sys.argv[1]), Path(sys.argv[2])
moco = MocoConfig(epochs=2, image_size=16, batch_size=8, projection_hidden_dim=32,
                  projection_dim=16, queue_size=8, num_workers=0, small_stem=False)
pretrained = run_moco_train(data_dir=data, model_dir=out / "moco", checkpoint_dir=out / "moco-ckpt",
                            config=moco, register=False, resume=False)
classifier = run_classifier_train(
    data_dir=data, model_dir=out / "classifier", checkpoint_dir=out / "classifier-ckpt",
    config=ClassifierConfig(image_size=16, batch_size=4, hidden_dim=16, num_workers=0, epochs=1),
    backbone_dir=out / "moco", resume=False)
try:
    run_moco_train(data_dir=data, model_dir=out / "registered", checkpoint_dir=out / "ckpt2",
                   config=moco, register=True, resume=False)
    refused = None
except ImportError as err:
    refused = f"{type(err).__name__}: {err}"
print(json.dumps({
    "loaded": sorted({m.partition(".")[0] for m in sys.modules} & {"mlflow", "azure", "yaml"}),
    "moco": pretrained["metrics"],
    "registered": pretrained["registered"],
    "classifier_run": classifier["metrics"]["mlflow_run_id"],
    "refused": refused,
}))
"""
)


@pytest.fixture(scope="module")
def without_mlflow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """MoCo, then a classifier on its backbone, then a MoCo run that asks to register, all in
    a process where MLflow and the Azure SDKs cannot be imported."""
    root = tmp_path_factory.mktemp("no-mlflow")
    data = make_data(root / "data")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SSLPIPE_TRACKING_DIR": str(root / "tracking"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'never.db'}",
    }
    env.pop("SSLPIPE_MLFLOW_PARENT_RUN_ID", None)
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_MLFLOW, str(data), str(root / "out")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "log": done.stdout, **json.loads(done.stdout.splitlines()[-1])}


def test_training_runs_without_mlflow_or_azure_and_writes_the_backbone(
    without_mlflow: dict[str, Any],
) -> None:
    out = without_mlflow["root"] / "out"
    assert without_mlflow["loaded"] == []
    assert len(without_mlflow["moco"]["losses"]) == 2 and without_mlflow["registered"] is None
    for name in ("backbone.pt", "backbone.json", "loss_curve.png", "metrics.json"):
        assert (out / "moco" / name).is_file(), name
    assert (out / "classifier" / "classifier.pt").is_file()
    assert not (without_mlflow["root"] / "never.db").exists()
    assert "MLflow is not installed" in without_mlflow["log"]


def test_without_mlflow_runs_are_tracked_as_json_lines(without_mlflow: dict[str, Any]) -> None:
    runs = {
        folder.name: read_journal(folder / RUN_LOG)
        for folder in (without_mlflow["root"] / "tracking").iterdir()
    }
    moco = next(r for r in runs.values() if r[0]["run_name"] == "moco_train")
    assert [r["kind"] for r in moco][:2] == ["start", "params"] and moco[-1]["status"] == "FINISHED"
    assert moco[1]["params"]["effective_batch_size"] == 8
    steps = [r["step"] for r in moco if r["kind"] == "metrics"]
    assert steps == [0, 1, 2]  # kNN at random init, then one row per epoch
    assert any(r["kind"] == "artifact" and r["path"].endswith("loss_curve.png") for r in moco)
    assert runs[without_mlflow["classifier_run"]][0]["run_name"] == "classifier_train"


def test_registering_without_mlflow_fails_before_training_and_names_the_package(
    without_mlflow: dict[str, Any],
) -> None:
    refused = without_mlflow["refused"]
    assert refused is not None and refused.startswith("MlflowMissingError")
    assert "moco_train with register=True" in refused and "'mlflow' is not installed" in refused
    assert not (without_mlflow["root"] / "out" / "ckpt2").exists()  # nothing was trained


def test_require_mlflow_names_the_purpose_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(MlflowMissingError, match=r"the model registry needs MLflow.*pip install"):
        require_mlflow("the model registry")


def test_the_fallback_is_used_only_when_mlflow_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SSLPIPE_TRACKING_DIR", str(tmp_path / "runs"))
    assert isinstance(default_tracker(), MlflowTracker)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setattr(logging.getLogger("sslpipe"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="sslpipe"):
        tracker = default_tracker()
    assert isinstance(tracker, LocalTracker) and tracker.root == tmp_path / "runs"
    assert "MLflow is not installed" in caplog.text and str(tmp_path / "runs") in caplog.text


# --- every tracker -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local MLflow store in the environment, as the executor sets it."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # set_experiment sets it
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-tests")
        patch.setenv("SSLPIPE_ARTIFACT_ROOT", str(root / "mlartifacts"))
        yield uri
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or None)


@pytest.fixture(params=["local", "mlflow"])
def tracker(request: pytest.FixtureRequest, tmp_path: Path) -> Tracker:
    if request.param == "local":
        return LocalTracker(tmp_path / "runs")
    request.getfixturevalue("mlflow_store")
    return MlflowTracker()


def log_everything(tracker: Tracker, artifact: Path, run_id: str | None = None) -> str:
    tracker.configure()
    with tracker.start_run(run_name="step", run_id=run_id, tags={"sslpipe.step": "step"}) as run:
        if run_id is None:
            run.log_params({"lr": 0.1, "backbone": "resnet18"})
        run.log_metric("knn_top1", 0.5, step=0)
        run.log_metrics({"loss": 1.25, "lr": 0.1}, step=1 if run_id is None else 2)
        run.set_tags({"stopped_early": "false"})
        run.log_artifact(artifact, artifact_path="plots")
        return run.run_id


def test_a_continued_run_keeps_its_id(tracker: Tracker, tmp_path: Path) -> None:
    artifact = tmp_path / "curve.png"
    artifact.write_bytes(b"png")
    first = log_everything(tracker, artifact)
    assert log_everything(tracker, artifact, run_id=first) == first


def test_the_local_tracker_writes_one_json_line_per_call(tmp_path: Path) -> None:
    artifact = tmp_path / "curve.png"
    artifact.write_bytes(b"png")
    tracker = LocalTracker(tmp_path / "runs")
    run_id = log_everything(tracker, artifact)
    log_everything(tracker, artifact, run_id=run_id)
    records = read_journal(tmp_path / "runs" / run_id / RUN_LOG)
    kinds = ["start", "metrics", "metrics", "tags", "artifact", "end"]
    assert [r["kind"] for r in records] == [*kinds[:1], "params", *kinds[1:], *kinds]
    assert records[0] == {**records[0], "run_name": "step", "tags": {"sslpipe.step": "step"}}
    assert records[1]["params"] == {"lr": 0.1, "backbone": "resnet18"}
    assert records[3] == {**records[3], "step": 1, "metrics": {"loss": 1.25, "lr": 0.1}}
    assert (tmp_path / "runs" / run_id / "artifacts" / "plots" / "curve.png").read_bytes() == b"png"


def test_a_local_run_that_raises_ends_failed(tmp_path: Path) -> None:
    tracker = LocalTracker(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), tracker.start_run(run_name="x") as run:
        raise RuntimeError("boom")
    assert read_journal(tmp_path / run.run_id / RUN_LOG)[-1]["status"] == "FAILED"


def test_the_mlflow_tracker_logs_to_the_configured_store(
    mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("SSLPIPE_MLFLOW_PARENT_RUN_ID", "parent-1")
    artifact = tmp_path / "curve.png"
    artifact.write_bytes(b"png")
    run_id = log_everything(MlflowTracker(), artifact)
    client = MlflowClient(mlflow_store)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "tracking-tests"
    assert run.data.params == {"lr": "0.1", "backbone": "resnet18"}
    assert run.data.metrics == {"knn_top1": 0.5, "loss": 1.25, "lr": 0.1}
    assert run.data.tags["sslpipe.step"] == "step" and run.data.tags["stopped_early"] == "false"
    assert run.data.tags["mlflow.parentRunId"] == "parent-1"
    assert run.info.run_name == "step" and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/curve.png"]
