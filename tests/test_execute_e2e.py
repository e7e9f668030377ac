"""End to end: ``python execute.py --pipeline moco`` on the embedded default, tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "filter.limit=64",
    "data_prep.image_size=36",
    "moco.image_size=32",
    "moco.epochs=1",
    "moco.batch_size=32",
    "moco.projection_hidden_dim=128",
    "moco.num_workers=0",
]

pytestmark = pytest.mark.e2e


def execute(
    workspace: Path, *extra: str, sets: list[str] = TINY
) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "execute.py", "--pipeline", "moco", "--set", f"workspace={workspace}"]
    for item in sets:
        args += ["--set", item]
    return subprocess.run(
        [*args, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture(scope="module")
def first_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    workspace = tmp_path_factory.mktemp("workspace")
    return workspace, execute(workspace)


def test_first_run_builds_the_demo_catalog_and_registers_a_backbone(first_run) -> None:
    workspace, result = first_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "building the DEMO catalog" in result.stdout
    assert "registered model moco-backbone version 1" in result.stdout
    # The run ends with what pre-training bought, from the kNN monitor's first and last epoch.
    metrics = next(workspace.glob("runs/*/moco_train/outputs/model/metrics.json"))
    knn = json.loads(metrics.read_text())
    assert (
        f"moco_train: kNN top-1 on the labelled images: random init {knn['knn_top1'][0]:.3f}, "
        f"after pre-training {knn['knn_top1'][-1]:.3f}"
    ) in result.stdout
    records = list((workspace / "runs").glob("*/run.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["status"] == "completed"
    assert list(record["steps"]) == ["connect_db", "data_prep", "moco_train"]
    assert all(step["status"] == "completed" for step in record["steps"].values())


def test_every_step_line_is_prefixed_and_kept_in_the_step_log(first_run) -> None:
    workspace, result = first_run
    assert "[connect_db] " in result.stdout and "[moco_train] " in result.stdout
    logs = {p.parent.name: p.read_text() for p in (workspace / "runs").glob("*/*/log.txt")}
    assert "selected 64 of 1797 documents" in logs["connect_db"]
    assert "epoch 1/1" in logs["moco_train"]


def test_the_console_says_why_each_step_runs_and_the_log_keeps_the_command(first_run) -> None:
    workspace, result = first_run
    assert "[moco_train] running (no earlier run of this step)" in result.stdout
    assert "components.moco_train.main" not in result.stdout  # the ~1,000-character command
    log = next(workspace.glob("runs/*/moco_train/log.txt")).read_text()
    assert "# command: " in log and "components.moco_train.main --data " in log


@pytest.fixture(scope="module")
def second_run(
    first_run,
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """A dry run after the first run, then the second run it describes."""
    workspace, _ = first_run
    return execute(workspace, "--dry-run"), execute(workspace)


def test_second_run_reuses_the_unchanged_steps_and_says_so(first_run, second_run) -> None:
    workspace, _ = first_run
    _, result = second_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[data_prep] reused" in result.stdout
    assert "[moco_train] reused" in result.stdout
    assert "building the DEMO catalog" not in result.stdout
    latest = sorted((workspace / "runs").glob("*/run.json"))[-1]
    steps = json.loads(latest.read_text())["steps"]
    assert steps["connect_db"]["status"] == "completed"  # reads a live store: never reused
    assert steps["data_prep"]["status"] == steps["moco_train"]["status"] == "reused"


def test_the_dry_run_says_what_the_run_then_does_with_the_values_it_uses(
    first_run, second_run
) -> None:
    workspace, _ = first_run
    dry, result = second_run
    assert dry.returncode == result.returncode == 0, dry.stderr[-2000:]
    first_id, second_id = sorted(p.name for p in (workspace / "runs").iterdir())[:2]
    steps = json.loads((workspace / "runs" / second_id / "run.json").read_text())["steps"]
    planned = {
        line.split(":")[0].removeprefix("step "): line.split(": ", 1)[1]
        for line in dry.stdout.splitlines()
        if line.startswith("step ")
    }
    assert planned["connect_db"] == "run (is_deterministic: false, always runs)"
    for step in ("data_prep", "moco_train"):
        assert planned[step] == (
            f"reuse run {first_id}, if connect_db writes what it wrote in run {first_id}"
        )
        assert steps[step]["reused_from"] == first_id
    # The queue the run uses: 64 images cannot fill the configured 4096 keys.
    assert "    queue_size = 32 (configured 4096; 64 images support 32 keys" in dry.stdout


def test_a_reused_training_says_that_it_registered_nothing(first_run, second_run) -> None:
    workspace, _ = first_run
    _, result = second_run
    first_id = sorted(p.name for p in (workspace / "runs").iterdir())[0]
    assert "registered model moco-backbone version 1" not in result.stdout
    assert (
        f"[sslpipe] moco_train reused run {first_id}, so nothing was registered now; it reuses "
        "model moco-backbone version 1, registered by that run: models:/moco-backbone/1"
    ) in result.stdout


def test_registered_backbone_loads_in_a_fresh_process(first_run) -> None:
    workspace, _ = first_run
    images = sorted((workspace / "blobs" / "images").glob("*.jpeg"))[:3]
    script = (
        "import sys, mlflow\n"
        "from sslpipe.models.registry import load_backbone\n"
        "backbone, config = load_backbone('moco-backbone/1')\n"
        "assert config['lineage']['num_images'] == 64, config['lineage']\n"
        "embedder = mlflow.pyfunc.load_model('models:/moco-backbone/1')\n"
        "vectors = embedder.predict(sys.argv[1:])\n"
        "print('shape', vectors.shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, images)],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shape (3, 512)" in result.stdout


def test_a_config_typo_is_one_clear_line_and_runs_nothing(tmp_path: Path) -> None:
    result = execute(tmp_path, sets=["moco.epoch=2"])
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown configuration key 'moco.epoch'; did you mean 'moco.epochs'?"
    )
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_the_resolved_steps_and_runs_nothing(tmp_path: Path) -> None:
    result = execute(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    for step in ("connect_db", "data_prep", "moco_train"):
        assert f"step {step}" in result.stdout
    assert "epochs = 1" in result.stdout
    assert not (tmp_path / "metadata.db").exists()


def test_an_empty_store_without_the_demo_is_a_clear_error(tmp_path: Path) -> None:
    result = execute(tmp_path, "--no-demo")
    assert result.returncode == 2
    assert "is empty and --no-demo was given" in result.stderr


CLASSIFIER = [
    "data_prep.image_size=36",
    "classifier.image_size=32",
    "classifier.epochs=2",
    "classifier.batch_size=64",
    "evaluate.min_macro_f1=0.0",
]


def test_classifier_pipeline_on_the_registered_backbone_feeds_a_downstream_service(
    first_run, tmp_path: Path
) -> None:
    workspace, _ = first_run
    args = [sys.executable, "execute.py", "--pipeline", "classifier"]
    for item in [f"workspace={workspace}", "classifier.backbone=moco-backbone@latest", *CLASSIFIER]:
        args += ["--set", item]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "registered model image-classifier version 1 (alias @candidate)" in result.stdout
    report = next((workspace / "runs").glob("*/evaluate/outputs/report/report.md")).read_text()
    assert "| **macro avg** |" in report

    # A downstream service: a fresh process that knows only the registry and an alias.
    images = sorted((workspace / "blobs" / "images").glob("*.jpeg"))[:4]
    folder = tmp_path / "incoming"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    service = (
        "import sys, mlflow\n"
        "model = mlflow.pyfunc.load_model('models:/image-classifier@candidate')\n"
        "out = model.predict(sorted(sys.argv[1:]))\n"
        "print(out[['label', 'error']].to_csv(index=False))\n"
    )
    paths = sorted(str(p) for p in folder.iterdir())
    served = subprocess.run(
        [sys.executable, "-c", service, *paths],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"},
    )
    assert served.returncode == 0, served.stderr[-3000:]
    rows = served.stdout.strip().splitlines()[1:]
    assert len(rows) == 5
    assert sum(row.startswith(("Even,", "Odd,")) for row in rows) == 4
    assert sum(row.startswith(",") and row != "," for row in rows) == 1  # broken.jpg: an error


def test_a_failed_step_names_its_log_and_resume_continues_the_same_run(tmp_path: Path) -> None:
    strict = [*TINY, "data_prep.max_skipped_fraction=0"]
    assert execute(tmp_path, "--dry-run", sets=strict).returncode == 0
    # Build the demo catalog, then break every image so that data_prep must fail.
    assert execute(tmp_path, sets=[*strict, "filter.limit=0"]).returncode == 2  # invalid limit
    from sslpipe.cli.pipelines import prepare_workspace
    from sslpipe.core.config import load_config

    prepare_workspace(load_config(None, [f"workspace={tmp_path}"]), demo=True)
    blobs = sorted((tmp_path / "blobs" / "images").glob("*.jpeg"))
    originals = {blob: blob.read_bytes() for blob in blobs}
    for blob in blobs:
        blob.write_bytes(b"not a jpeg")

    failed = execute(tmp_path, sets=strict)
    assert failed.returncode == 1
    assert "step 'data_prep' failed with exit code 1" in failed.stdout
    log = next((tmp_path / "runs").glob("*/data_prep/log.txt"))
    assert str(log) in failed.stdout
    assert "could not be used" in log.read_text()
    record = json.loads(next((tmp_path / "runs").glob("*/run.json")).read_text())
    assert record["status"] == "failed"
    assert record["steps"]["moco_train"]["status"] == "skipped"

    for blob, data in originals.items():
        blob.write_bytes(data)
    resumed = execute(tmp_path, "--resume", sets=strict)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = list((tmp_path / "runs").glob("*/run.json"))
    assert len(runs) == 1  # the same run, continued in place
    record = json.loads(runs[0].read_text())
    assert record["status"] == "completed"
    assert record["steps"]["data_prep"]["status"] == "completed"
    assert "registered model moco-backbone version 1" in resumed.stdout


# A second version of the backbone, the way a new moco run registers one (same files here).
REGISTER_AGAIN = """
import mlflow
client = mlflow.MlflowClient()
first = client.get_model_version("moco-backbone", "1")
print(client.create_model_version("moco-backbone", first.source, run_id=first.run_id).version)
"""


def test_a_new_backbone_version_retrains_the_classifier_on_it(first_run) -> None:
    workspace, _ = first_run
    tracking = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"}
    registered = subprocess.run(
        [sys.executable, "-c", REGISTER_AGAIN], capture_output=True, text=True, env=tracking
    )
    assert registered.stdout.strip() == "2", registered.stderr[-2000:]
    args = [sys.executable, "execute.py", "--pipeline", "classifier"]
    for item in [f"workspace={workspace}", *CLASSIFIER]:  # classifier.backbone: @latest
        args += ["--set", item]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    latest = max((workspace / "runs").glob("*/run.json"), key=lambda p: p.stat().st_mtime)
    steps = json.loads(latest.read_text())["steps"]
    assert steps["classifier_train"]["status"] == steps["evaluate"]["status"] == "completed"
    assert steps["classifier_train"]["parameters"]["backbone"] == "moco-backbone/2"
    assert "[classifier_train] running (backbone moco-backbone/1 -> moco-backbone/2" in (
        result.stdout
    )
    assert "registered model image-classifier version 2" in result.stdout
