"""classifier_train in two processes (torchrun, Gloo on CPU): one replica, rank 0 writes, resume.

The module is also the worker that torchrun starts (``python -m
tests.steps.test_classifier_train_ddp OUT CRASH_AT -- FLAGS``): it runs the component's entry
point with ``FLAGS`` and then saves the classifier each process ended with to
``OUT/rank<RANK>.pt``, so that the test can compare the processes' weights; with CRASH_AT > 0
every process fails in that (1-based) training epoch, as a preempted job would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch

from sslpipe.core.config import ClassifierConfig
from sslpipe.models.classifier import load_classifier_dir
from sslpipe.models.classifier.augment import eval_transform
from sslpipe.models.classifier.train import (
    LabelledImageDataset,
    make_criterion,
    predict,
    read_labelled_data,
    scores,
)
from sslpipe.models.training.distributed import DistEnv
from sslpipe.steps import classifier_train as step
from sslpipe.steps.classifier_train import (
    CHECKPOINT_FILE,
    CURVES_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    run_classifier_train,
)

REPO = Path(__file__).resolve().parents[2]
COMPONENT = REPO / "components" / "classifier_train" / "component.yaml"
WORLD = 2
# Two head epochs then one fine-tuning epoch (BN statistics move), 4 images per process and
# step: 24 training images give 12 per process, 3 steps per epoch; 12 validation images.
DDP: dict[str, Any] = {
    "backbone": "torchvision:resnet18",
    "image_size": 16,
    "batch_size": 4,
    "hidden_dim": 32,
    "dropout": 0.1,
    "lr": 3e-3,
    "num_workers": 0,
    "mode": "two_stage",
    "epochs": 2,
    "finetune_epochs": 1,
    "patience": 5,
    "processes_per_node": WORLD,
}
MODEL_FILES = ["classifier.json", "classifier.pt", CURVES_FILE, HISTORY_FILE, METRICS_FILE]


def worker(argv: list[str]) -> None:
    """torchrun's entry point: the component, then this process's final weights to OUT."""
    from components.classifier_train import main as component
    from sslpipe.cli.component import run_component

    out, crash_at, separator, *flags = argv
    assert separator == "--", argv
    built: list[torch.nn.Module] = []
    real_build, real_train_epoch = step.build_classifier, step.train_epoch

    def build_and_keep(*args: Any, **kwargs: Any) -> Any:
        built.append(real_build(*args, **kwargs))
        return built[-1]

    epochs: list[int] = []

    def train_epoch_or_crash(*args: Any, **kwargs: Any) -> tuple[float, float]:
        epochs.append(1)
        if len(epochs) == int(crash_at):
            raise RuntimeError("simulated preemption")
        return real_train_epoch(*args, **kwargs)

    step.build_classifier = build_and_keep
    step.train_epoch = train_epoch_or_crash
    run_component(COMPONENT, component.main, flags)
    state = {k: v.detach().cpu() for k, v in built[0].state_dict().items()}
    torch.save(state, Path(out) / f"rank{os.environ['RANK']}.pt")


def launch(
    tmp_path: Path, env: dict[str, str], name: str, *, crash_at: int = 0
) -> subprocess.CompletedProcess[str]:
    """The worker in two processes under torchrun, writing to ``tmp_path / name``."""
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    flags = ["--data", str(tmp_path / "data"), "--model", str(out / "model")]
    flags += ["--checkpoint", str(out / "checkpoint")]
    for key, value in ClassifierConfig(**DDP).model_dump().items():
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={WORLD}", "-m", "tests.steps.test_classifier_train_ddp"]
    command += [str(out), str(crash_at), "--", *flags]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def weights(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(path, weights_only=True)
    return state


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted two-process run ("straight") and one preempted in epoch 3 and resumed."""
    from tests.steps.test_classifier_train import make_labelled_data

    tmp_path = tmp_path_factory.mktemp("ddp")
    make_labelled_data(tmp_path / "data", per_split={"train": 8, "val": 4})
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_EXPERIMENT_NAME": "ddp",
        "SSLPIPE_ARTIFACT_ROOT": str(tmp_path / "mlartifacts"),
        "TORCH_HOME": str(tmp_path / "torch-home"),  # random init, no cached weights
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    straight = ok(launch(tmp_path, env, "straight"))
    preempted = launch(tmp_path, env, "resumed", crash_at=3)
    after_crash = torch.load(
        tmp_path / "resumed" / "checkpoint" / CHECKPOINT_FILE, weights_only=True
    )
    model_after_crash = (tmp_path / "resumed" / "model").exists()
    resumed = ok(launch(tmp_path, env, "resumed"))
    return {
        "root": tmp_path,
        "env": env,
        "straight": straight,
        "preempted": preempted,
        "after_crash": after_crash,
        "model_after_crash": model_after_crash,
        "resumed": resumed,
    }


def test_both_processes_end_with_the_same_weights_and_rank_0_alone_writes(
    runs: dict[str, Any],
) -> None:
    root, log = runs["root"], runs["straight"]
    ranks = [weights(root / "straight" / f"rank{r}.pt") for r in range(WORLD)]
    assert_same(ranks[0], ranks[1])  # fine-tuned backbone and BN statistics included
    assert_same(ranks[0], weights(root / "straight" / "model" / "classifier.pt"))

    assert "data parallel over 2 processes (cpu)" in log and "global batch 8" in log
    assert log.count("epoch 3 (finetune 1/1)") == 1  # only rank 0 logs
    assert sorted(p.name for p in (root / "straight" / "checkpoint").iterdir()) == [CHECKPOINT_FILE]
    assert sorted(p.name for p in (root / "straight" / "model").iterdir()) == sorted(MODEL_FILES)
    history = json.loads((root / "straight" / "model" / HISTORY_FILE).read_text())
    assert [(row["epoch"], row["stage"]) for row in history] == [
        (1, "head"),
        (2, "head"),
        (3, "finetune"),
    ]
    client = mlflow.MlflowClient(tracking_uri=runs["env"]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("ddp")
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id])
    # One run per training, not per process: straight, and preempted then resumed.
    assert len(found) == 2
    assert {run.data.params["world_size"] for run in found} == {"2"}
    assert {run.data.params["global_batch_size"] for run in found} == {"8"}


def test_validation_scores_are_those_of_the_whole_val_split_in_order(
    runs: dict[str, Any],
) -> None:
    """The sharded validation, regathered, scores the saved (best) model like one process."""
    root = runs["root"]
    metrics = json.loads((root / "straight" / "model" / METRICS_FILE).read_text())
    model, _ = load_classifier_dir(root / "straight" / "model")
    data = read_labelled_data(root / "data")
    val = LabelledImageDataset(root / "data", data.split("val"), eval_transform(16))
    logits, targets = predict(model, torch.utils.data.DataLoader(val, batch_size=64))
    expected = scores(logits, targets, make_criterion(data.class_weights))
    assert metrics["best_val_macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-9)
    assert metrics["best_val_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert metrics["best_val_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert expected["accuracy"] > 0.5  # the model tells the classes apart: order matters


def test_a_preempted_run_resumes_on_both_processes_to_the_same_weights(
    runs: dict[str, Any],
) -> None:
    root = runs["root"]
    assert runs["preempted"].returncode != 0
    assert "simulated preemption" in runs["preempted"].stderr
    crash = runs["after_crash"]
    assert (crash["epoch"], crash["stage"], crash["stage_epoch"]) == (2, 1, 0)
    assert not runs["model_after_crash"]

    log = runs["resumed"]
    # Rank 0 alone logs; that every process resumed shows in the weights below.
    assert log.count("resuming from") == 1 and "after epoch 2" in log
    assert "epoch 1 (head 1/2)" not in log and "epoch 2 (head 2/2)" not in log
    assert log.count("epoch 3 (finetune 1/1)") == 1
    ranks = [weights(root / "resumed" / f"rank{r}.pt") for r in range(WORLD)]
    assert_same(ranks[0], ranks[1])
    assert_same(weights(root / "straight" / "model" / "classifier.pt"), ranks[0])
    assert_same(ranks[0], weights(root / "resumed" / "model" / "classifier.pt"))
    straight, resumed = (
        json.loads((root / name / "model" / HISTORY_FILE).read_text())
        for name in ("straight", "resumed")
    )
    assert [{**r, "seconds": 0} for r in resumed] == [{**r, "seconds": 0} for r in straight]


def test_a_world_size_other_than_the_configured_one_is_refused(tmp_path: Path) -> None:
    config = ClassifierConfig(**DDP)
    with pytest.raises(ValueError, match=r"1 node\(s\) x 2 process\(es\) = 2, but it runs in 1"):
        run_classifier_train(
            data_dir=tmp_path,
            model_dir=tmp_path / "m",
            checkpoint_dir=tmp_path / "c",
            config=config,
            env=DistEnv(),
        )


if __name__ == "__main__":
    worker(sys.argv[1:])
