"""classifier_train: data checks, freezing, early stopping, outputs, resume and the component."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from azure.ai.ml import load_component
from PIL import Image

from sslpipe.cli.component import build_parser, load_spec, run_component
from sslpipe.core.config import ClassifierConfig, EvaluateConfig
from sslpipe.execution.local import format_value, resolve_command
from sslpipe.models.backbone_io import save_backbone
from sslpipe.models.classifier import CLASSIFIER_FORMAT, load_classifier_dir
from sslpipe.models.classifier.augment import eval_transform
from sslpipe.models.classifier.train import (
    LabelledImageDataset,
    macro_f1,
    predict,
    read_labelled_data,
)
from sslpipe.models.moco.backbone import BackboneSpec, build_backbone
from sslpipe.models.registry import configure_tracking
from sslpipe.steps import classifier_train as step
from sslpipe.steps.classifier_train import CHECKPOINT_FILE, run_classifier_train

REPO = Path(__file__).resolve().parents[2]
COMPONENT = REPO / "components" / "classifier_train" / "component.yaml"
COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}
# Small and fast: 16 px crops, the ImageNet stem (4x4 after it), a short schedule.
FAST = {"image_size": 16, "batch_size": 8, "hidden_dim": 32, "num_workers": 0, "patience": 3}


def make_labelled_data(
    folder: Path,
    *,
    per_split: dict[str, int] | None = None,
    classes: tuple[str, ...] = ("blue", "green", "red"),
    repeats: dict[str, int] | None = None,
    class_weights: dict[str, float] | None = None,
    extra_rows: list[dict[str, Any]] | None = None,
    size: int = 20,
    seed: int = 0,
) -> Path:
    """A labelled data_prep output: images/, manifest.csv, labels.json, selection.json.

    Each class is a noisy image of its own colour, so that even a random frozen backbone lets
    the head separate them. ``per_split`` is the number of images per class and split;
    ``repeats`` the train ``repeats`` of a class (1 otherwise).
    """
    per_split = per_split or {"train": 8, "val": 4, "test": 4}
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for label in classes:
        for split, count in per_split.items():
            for i in range(count):
                image_id = f"{label}-{split}-{i}.png"
                base = np.array(COLOURS.get(label, (128, 128, 128)), dtype=np.int16)
                noise = rng.integers(-40, 40, size=(size, size, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / "images" / image_id)
                rows.append(
                    {
                        "id": image_id,
                        "path": f"images/{image_id}",
                        "label": label,
                        "width": size,
                        "height": size,
                        "split": split,
                        "repeats": (repeats or {}).get(label, 1) if split == "train" else 1,
                    }
                )
    rows += extra_rows or []
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    labels = sorted(classes)
    (folder / "labels.json").write_text(
        json.dumps(
            {
                "classes": labels,
                "index": {label: i for i, label in enumerate(labels)},
                "level": 1,
                "class_weights": class_weights,
            }
        )
    )
    (folder / "selection.json").write_text(
        json.dumps({"filter": {"labelled": "labelled", "limit": None}, "metadata_store": "test"})
    )
    return folder


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One local MLflow store for the module: creating a sqlite store takes seconds."""
    root = tmp_path_factory.mktemp("mlflow")
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_EXPERIMENT_NAME": "tests",
        "SSLPIPE_ARTIFACT_ROOT": str(root / "mlartifacts"),
    }
    before = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        configure_tracking()
        yield env
    mlflow.set_tracking_uri(before)  # type: ignore[arg-type]  # None: back to the default


@pytest.fixture()
def tracking(
    tracking_store: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    for key, value in tracking_store.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SSLPIPE_RUN_ID", "run-42")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights
    monkeypatch.delenv("SSLPIPE_MLFLOW_PARENT_RUN_ID", raising=False)
    return tracking_store["MLFLOW_TRACKING_URI"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labelled_data(tmp_path_factory.mktemp("labelled") / "data")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 training images (one batch of 8 per epoch) and 6 validation images."""
    return make_labelled_data(
        tmp_path_factory.mktemp("small") / "data", per_split={"train": 4, "val": 2}
    )


def backbone_folder(folder: Path, *, small_stem: bool = False) -> dict[str, torch.Tensor]:
    """A moco_train-like backbone folder with seeded random weights; returns the weights."""
    torch.manual_seed(11)
    backbone, _ = build_backbone(BackboneSpec("resnet18", small_stem=small_stem))
    # Non-trivial BN statistics, as after pre-training, so that a moved buffer shows.
    for name, buffer in backbone.named_buffers():
        if name.endswith("running_mean"):
            buffer.uniform_(-0.1, 0.1)
    spec = BackboneSpec("resnet18", small_stem=small_stem)
    save_backbone(folder, backbone, spec, image_size=16, lineage={"mlflow_run_id": "pre"})
    return {k: v.clone() for k, v in backbone.state_dict().items()}


def train(
    tmp_path: Path,
    data: Path,
    name: str = "run",
    *,
    backbone_dir: Path | None = None,
    **config: Any,
) -> dict[str, Any]:
    return run_classifier_train(
        data_dir=data,
        model_dir=tmp_path / name / "model",
        checkpoint_dir=tmp_path / name / "checkpoint",
        config=ClassifierConfig(**{"backbone": "torchvision:resnet18", **FAST, **config}),
        backbone_dir=backbone_dir,
    )


def saved_backbone(model_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(model_dir / "classifier.pt", weights_only=True)
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


# --- end to end --------------------------------------------------------------------------------


def test_training_writes_a_classifier_that_reloads_and_beats_chance(
    tmp_path: Path, tracking: str, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = mlflow.get_experiment_by_name("tests")
    assert experiment is not None
    parent = mlflow.MlflowClient().create_run(experiment.experiment_id).info.run_id
    monkeypatch.setenv("SSLPIPE_MLFLOW_PARENT_RUN_ID", parent)
    result = run_classifier_train(
        data_dir=data,
        model_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "checkpoint",
        config=ClassifierConfig(
            **{**FAST, "batch_size": 4, "hidden_dim": 64, "patience": 4},
            backbone="torchvision:resnet18",
            epochs=3,
            lr=3e-3,
            dropout=0.1,
        ),
    )
    model_dir = tmp_path / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "classifier.json",
        "classifier.pt",
        "curves.png",
        "history.json",
        "train_metrics.json",
    ]
    assert [p.name for p in (tmp_path / "checkpoint").iterdir()] == [CHECKPOINT_FILE]
    with Image.open(model_dir / "curves.png") as image:
        assert image.format == "PNG"

    model, config = load_classifier_dir(model_dir)
    assert config["format"] == CLASSIFIER_FORMAT
    assert config["classes"] == ["blue", "green", "red"]
    assert config["backbone"] == {"name": "resnet18", "small_stem": False}
    lineage = config["lineage"]
    assert lineage["backbone"]["init"] == "random init"
    assert lineage["backbone"]["source"] == "torchvision:resnet18"
    assert lineage["filter"] == {"labelled": "labelled", "limit": None}
    assert lineage["num_images"] == {
        "train": 24,
        "val": 12,
        "test": 12,
        "train_drawn_per_epoch": 24,
    }
    assert len(lineage["data_fingerprint"]) == 16
    assert lineage["pipeline_run_id"] == "run-42"
    assert lineage["mlflow_run_id"] == result["metrics"]["mlflow_run_id"]
    assert not (model_dir / "registered_model.json").exists()  # evaluate registers it

    history = json.loads((model_dir / "history.json").read_text())
    metrics = json.loads((model_dir / "train_metrics.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, len(history) + 1))
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1"} <= set(
        history[0]
    )
    assert metrics["best_val_macro_f1"] == max(row["val_macro_f1"] for row in history)

    # The reloaded model scores the recorded best val macro-F1 and beats chance on test.
    data_set = read_labelled_data(data)
    scores = {}
    for split in ("val", "test"):
        dataset = LabelledImageDataset(data, data_set.split(split), eval_transform(16))
        logits, targets = predict(model, torch.utils.data.DataLoader(dataset, batch_size=64))
        scores[split] = macro_f1(targets.numpy(), logits.argmax(1).numpy())
    assert scores["val"] == pytest.approx(metrics["best_val_macro_f1"])
    assert scores["test"] > 0.6  # chance is 1/3

    run = mlflow.get_run(result["metrics"]["mlflow_run_id"])
    assert run.data.metrics["val_macro_f1"] == history[-1]["val_macro_f1"]
    assert run.data.metrics["best_val_macro_f1"] == metrics["best_val_macro_f1"]
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["backbone_init"] == "random init"


def test_head_mode_leaves_the_backbone_and_its_bn_buffers_bit_identical(
    tmp_path: Path, tracking: str, data: Path
) -> None:
    weights = backbone_folder(tmp_path / "backbone")
    train(tmp_path, data, epochs=2, backbone_dir=tmp_path / "backbone")
    saved = saved_backbone(tmp_path / "run" / "model")
    assert saved.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(saved[key], value), key
    config = json.loads((tmp_path / "run" / "model" / "classifier.json").read_text())
    assert config["lineage"]["backbone"]["source"] == "backbone_dir"
    assert config["lineage"]["backbone"]["pretraining"] == {"mlflow_run_id": "pre"}


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class ScriptedValidation:
    """Stands in for ``evaluate``: returns scripted macro-F1 values and snapshots the model."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def __call__(self, model: torch.nn.Module, loader: Any, criterion: Any) -> dict[str, float]:
        self.snapshots.append(state_of(model))
        score = self.scores[len(self.snapshots) - 1]
        return {"loss": 1.0 - score, "accuracy": score, "macro_f1": score}


def test_two_stage_fine_tunes_from_the_best_head_and_moves_the_backbone_and_bn(
    tmp_path: Path, tracking: str, small_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = backbone_folder(tmp_path / "backbone")
    # Epoch 2 does not beat epoch 1 (patience 1): the head stage stops early; fine-tuning wins.
    scripted = ScriptedValidation([0.5, 0.3, 0.6, 0.7])
    monkeypatch.setattr(step, "evaluate", scripted)
    stage_starts: list[dict[str, torch.Tensor]] = []
    real = step.set_backbone_trainable

    def spy(model: Any, trainable: bool) -> None:
        stage_starts.append(state_of(model))
        real(model, trainable)

    monkeypatch.setattr(step, "set_backbone_trainable", spy)
    result = train(
        tmp_path,
        small_data,
        mode="two_stage",
        epochs=5,
        finetune_epochs=2,
        finetune_lr=1e-3,
        patience=1,
        backbone_dir=tmp_path / "backbone",
    )
    metrics = result["metrics"]
    assert [row["stage"] for row in result["history"]] == ["head", "head", "finetune", "finetune"]
    assert metrics["stopped_early_stages"] == ["head"]
    assert [s["epochs_run"] for s in metrics["stages"]] == [2, 2]
    assert (metrics["best_epoch"], metrics["best_stage"]) == (4, "finetune")

    # Fine-tuning started from epoch 1's model (the best head), not from epoch 2's.
    assert len(stage_starts) == 2
    for key, value in stage_starts[1].items():
        assert torch.equal(value, scripted.snapshots[0][key]), key
    assert not torch.equal(stage_starts[1]["head.0.weight"], scripted.snapshots[1]["head.0.weight"])
    # The frozen stage left the backbone alone; fine-tuning moved weights and BN statistics.
    for key, value in weights.items():
        assert torch.equal(scripted.snapshots[1][f"backbone.{key}"], value), key
    saved = saved_backbone(tmp_path / "run" / "model")
    assert saved.keys() == weights.keys()
    for key in ("conv1.weight", "layer4.1.conv2.weight", "bn1.running_mean", "bn1.running_var"):
        assert not torch.equal(saved[key], weights[key]), key
    # 12 training images, batch 8: one BN update per fine-tuning epoch, none while frozen.
    assert int(saved["bn1.num_batches_tracked"]) == int(weights["bn1.num_batches_tracked"]) + 2


def test_early_stopping_stops_after_patience_and_saves_the_best_epoch(
    tmp_path: Path, tracking: str, small_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted = ScriptedValidation([0.2, 0.5, 0.5, 0.4, 0.9, 0.95])
    monkeypatch.setattr(step, "evaluate", scripted)
    result = train(
        tmp_path, small_data, epochs=6, patience=2, backbone="torchvision:resnet18:small"
    )
    metrics = result["metrics"]
    # Epochs 3 (a tie) and 4 do not beat epoch 2: stop after epoch 4; 0.9 is never reached.
    assert len(result["history"]) == 4 == metrics["epochs_run"]
    assert metrics["stopped_early"] is True
    assert metrics["best_epoch"] == 2 and metrics["best_val_macro_f1"] == 0.5
    assert [row["best"] for row in result["history"]] == [True, True, False, False]

    model, config = load_classifier_dir(tmp_path / "run" / "model")
    assert config["lineage"]["best_epoch"] == 2
    assert config["backbone"] == {"name": "resnet18", "small_stem": True}
    saved = model.state_dict()
    best, last = scripted.snapshots[1], scripted.snapshots[3]
    for key in saved:
        assert torch.equal(saved[key], best[key]), key
    assert not torch.equal(saved["head.0.weight"], last["head.0.weight"])


def test_an_interrupted_run_resumes_to_the_same_weights(
    tmp_path: Path, tracking: str, small_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config: dict[str, Any] = {"mode": "two_stage", "epochs": 1, "finetune_epochs": 2, "patience": 5}
    straight = train(tmp_path, small_data, "straight", **config)
    real = step.train_epoch
    calls = []

    def train_until_crash(*args: Any, **kwargs: Any) -> tuple[float, float]:
        calls.append(1)
        if len(calls) == 3:  # epoch 3, the second fine-tuning epoch
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "train_epoch", train_until_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path, small_data, "resumed", **config)
    checkpoint = torch.load(
        tmp_path / "resumed" / "checkpoint" / CHECKPOINT_FILE, weights_only=True
    )
    assert (checkpoint["epoch"], checkpoint["stage"], checkpoint["stage_epoch"]) == (2, 1, 1)
    assert checkpoint["optimizer"] is not None  # Adam's moments of the fine-tuning stage
    assert not (tmp_path / "resumed" / "model").exists()
    monkeypatch.setattr(step, "train_epoch", real)
    resumed = train(tmp_path, small_data, "resumed", **config)

    assert [{**row, "seconds": 0} for row in resumed["history"]] == [
        {**row, "seconds": 0} for row in straight["history"]
    ]
    a = torch.load(tmp_path / "straight" / "model" / "classifier.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model" / "classifier.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    assert resumed["metrics"]["mlflow_run_id"] != straight["metrics"]["mlflow_run_id"]
    assert resumed["metrics"]["mlflow_run_id"] == checkpoint["mlflow_run_id"]  # the same run

    with pytest.raises(ValueError, match="different configuration"):
        train(tmp_path, small_data, "resumed", **{**config, "lr": 0.5})


# --- balance -----------------------------------------------------------------------------------


def test_repeats_and_class_weights_reach_the_training(
    tmp_path: Path, tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_labelled_data(
        tmp_path / "data",
        classes=("blue", "red"),
        per_split={"train": 3, "val": 2},
        repeats={"red": 3},
        class_weights={"blue": 0.75, "red": 1.5},
    )
    seen: dict[str, Any] = {}
    real_loader = step.batches

    def spy_loader(dataset: Any, batch: int, workers: int, *, seed: int | None) -> Any:
        if seed is not None:
            seen["train_labels"] = list(dataset.targets)
        return real_loader(dataset, batch, workers, seed=seed)

    real_criterion = step.make_criterion

    def spy_criterion(weights: Any) -> Any:
        seen["weights"] = weights
        return real_criterion(weights)

    monkeypatch.setattr(step, "batches", spy_loader)
    monkeypatch.setattr(step, "make_criterion", spy_criterion)
    result = train(tmp_path, data, epochs=1)
    assert sorted(seen["train_labels"]) == [0, 0, 0] + [1] * 9  # red drawn 3 times per image
    assert seen["weights"] == [0.75, 1.5]
    lineage = result["lineage"]
    assert lineage["num_images"] == {"train": 6, "val": 4, "test": 0, "train_drawn_per_epoch": 12}
    assert lineage["balance"] == "class_weight"
    assert result["metrics"]["class_weighted_loss"] is True


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f[f["split"] != "val"], "has no 'val' rows"),
        (lambda f: f[f["split"] != "train"], "has no 'train' rows"),
        (lambda f: f.assign(label=f["label"].replace("red", "purple")), r"\['purple'\]"),
    ],
    ids=["no-val", "no-train", "unknown-label"],
)
def test_bad_data_is_one_clear_error(
    tmp_path: Path,
    tracking: str,
    change: Callable[[pd.DataFrame], pd.DataFrame],
    message: str,
) -> None:
    data = make_labelled_data(tmp_path / "data", per_split={"train": 2, "val": 1})
    frame = pd.read_csv(data / "manifest.csv")
    change(frame).to_csv(data / "manifest.csv", index=False)
    with pytest.raises(ValueError, match=message):
        train(tmp_path, data, epochs=1)
    assert not (tmp_path / "run" / "model").exists()


def test_an_unknown_backbone_is_one_clear_error(tmp_path: Path, tracking: str) -> None:
    data = make_labelled_data(tmp_path / "data", per_split={"train": 2, "val": 1})
    with pytest.raises(ValueError, match="no registered model named 'nope'"):
        train(tmp_path, data, backbone="nope@champion")
    with pytest.raises(ValueError, match="'resnet7'"):
        train(tmp_path, data, backbone="torchvision:resnet7")


def test_a_backbone_folder_that_does_not_fit_is_one_clear_error(
    tmp_path: Path, tracking: str
) -> None:
    data = make_labelled_data(tmp_path / "data", per_split={"train": 2, "val": 1})
    backbone, _ = build_backbone(BackboneSpec("resnet18", small_stem=True))
    save_backbone(tmp_path / "bb", backbone, BackboneSpec("resnet18"), image_size=16, lineage={})
    with pytest.raises(ValueError, match="weights do not fit"):
        train(tmp_path, data, backbone_dir=tmp_path / "bb")


def test_rows_outside_the_three_splits_are_ignored(tmp_path: Path) -> None:
    extra = {"id": "x", "path": "images/x.png", "label": "", "width": 1, "height": 1}
    data = make_labelled_data(
        tmp_path / "data",
        per_split={"train": 2, "val": 1},
        extra_rows=[{**extra, "split": "", "repeats": 1}],
    )
    labelled = read_labelled_data(data)
    assert labelled.ignored_rows == 1
    assert labelled.counts() == {"train": 6, "val": 3, "test": 0}


# --- the component -----------------------------------------------------------------------------

YAML_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}
PLACEHOLDER = re.compile(r"\$\{\{(inputs|outputs)\.(\w+)\}\}")


def test_the_component_inputs_mirror_the_classifier_config() -> None:
    spec = load_spec(COMPONENT)
    inputs = spec["inputs"]
    step_inputs = {"data", "backbone_model", "resume", "skip_unchanged", "model_name"}
    assert set(inputs) == set(ClassifierConfig.model_fields) | step_inputs
    assert (inputs["skip_unchanged"]["type"], inputs["skip_unchanged"]["default"]) == (
        "boolean",
        False,
    )
    assert inputs["model_name"]["default"] == EvaluateConfig().model_name
    assert inputs["data"]["type"] == "uri_folder"
    assert inputs["backbone_model"]["optional"] is True
    assert inputs["backbone_model"]["type"] == "uri_folder"
    for name, field in ClassifierConfig.model_fields.items():
        meta = inputs[name]
        assert meta["default"] == field.default, name
        if typing.get_origin(field.annotation) is typing.Literal:
            assert meta["type"] == "string", name
            assert meta["enum"] == list(typing.get_args(field.annotation)), name
        else:
            assert meta["type"] == YAML_TYPES[field.annotation], name  # type: ignore[index]
        bounds = {type(m).__name__: m for m in field.metadata}
        if "min" in meta:
            assert meta["min"] == bounds["Ge"].ge, name
        if "max" in meta:
            assert meta["max"] == bounds["Le"].le, name
    assert set(spec["outputs"]) == {"model", "checkpoint"}


def test_the_component_loads_with_azure_ml_and_uses_every_input_once() -> None:
    component = load_component(source=COMPONENT)
    spec = load_spec(COMPONENT)
    assert component.name == "sslpipe_classifier_train"
    assert set(component.inputs) == set(spec["inputs"])
    used = PLACEHOLDER.findall(spec["command"])
    for kind in ("inputs", "outputs"):
        assert sorted(n for k, n in used if k == kind) == sorted(spec[kind]), kind
    pairs = re.findall(r"--(\w+) \$\{\{(?:inputs|outputs)\.(\w+)\}\}", spec["command"])
    assert len(pairs) == len(used) and all(flag == value for flag, value in pairs)
    assert "$[[--backbone_model ${{inputs.backbone_model}}]]" in spec["command"]
    assert spec["command"].startswith("python -m components.classifier_train.main ")


def load_main(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``components/classifier_train/main.py`` with the step replaced by a recorder."""
    calls: list[dict[str, Any]] = []
    stub = types.ModuleType("sslpipe.steps.classifier_train")
    stub.run_classifier_train = lambda **kwargs: calls.append(kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sslpipe.steps.classifier_train", stub)
    spec = importlib.util.spec_from_file_location(
        "_main_classifier_train", COMPONENT.with_name("main.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.calls = calls  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("backbone_model", [None, "/mnt/azureml/backbone"])
def test_the_rendered_command_reaches_the_step(
    monkeypatch: pytest.MonkeyPatch, backbone_model: str | None
) -> None:
    spec = load_spec(COMPONENT)
    values: dict[str, str | None] = {
        f"inputs.{name}": format_value(meta["default"])
        for name, meta in spec["inputs"].items()
        if "default" in meta
    }
    values |= {"inputs.data": "/mnt/data", "inputs.backbone_model": backbone_model}
    values |= {"inputs.epochs": "7", "inputs.mode": "two_stage"}
    values |= {"outputs.model": "/out/model", "outputs.checkpoint": "/out/ckpt"}
    argv = resolve_command(spec["command"], values)[3:]
    assert ("--backbone_model" in argv) is (backbone_model is not None)
    assert set(vars(build_parser(spec).parse_args(argv))) == set(spec["inputs"]) | {
        "model",
        "checkpoint",
    }
    module = load_main(monkeypatch)
    run_component(COMPONENT, module.main, argv)
    (call,) = module.calls
    assert call["config"] == ClassifierConfig(epochs=7, mode="two_stage")
    assert call["backbone_dir"] == (Path(backbone_model) if backbone_model else None)
    assert call["resume"] is True
    assert (call["skip_unchanged"], call["model_name"]) == (False, "image-classifier")
    assert (call["data_dir"], call["model_dir"], call["checkpoint_dir"]) == (
        Path("/mnt/data"),
        Path("/out/model"),
        Path("/out/ckpt"),
    )


# --- the retraining guard ----------------------------------------------------------------------


def test_the_retraining_guard_skips_until_the_data_or_the_backbone_changes(
    tmp_path: Path, tracking: str
) -> None:
    from sslpipe.steps.evaluate import run_evaluate

    name = "guarded-classifier"
    data = make_labelled_data(tmp_path / "data", per_split={"train": 4, "val": 2, "test": 2})
    config = ClassifierConfig(**{"backbone": "torchvision:resnet18", **FAST, "epochs": 1})

    def guarded(run: str, backbone_dir: Path | None = None) -> tuple[dict[str, Any], Any]:
        trained = run_classifier_train(
            data_dir=data,
            model_dir=tmp_path / run / "model",
            checkpoint_dir=tmp_path / run / "checkpoint",
            config=config,
            backbone_dir=backbone_dir,
            skip_unchanged=True,
            model_name=name,
        )
        evaluated = run_evaluate(
            model_dir=tmp_path / run / "model",
            data_dir=data,
            output_dir=tmp_path / run / "report",
            model_name=name,
        )
        return trained, evaluated

    first, evaluated = guarded("first")
    assert "skipped" not in first and evaluated["registered"]["version"] == "1"
    tags = mlflow.MlflowClient().get_model_version(name, "1").tags
    assert tags["lineage.data_fingerprint"] == first["lineage"]["data_fingerprint"]
    assert tags["lineage.setup_fingerprint"] == first["lineage"]["setup_fingerprint"]

    second, evaluated = guarded("second")  # nothing changed: nothing trained or registered
    assert f"unchanged since models:/{name}/1" in second["skipped"]
    assert evaluated["registered"] is None
    assert sorted(p.name for p in (tmp_path / "second" / "model").iterdir()) == ["skipped.json"]
    assert "Training skipped" in (tmp_path / "second" / "report" / "report.md").read_text()

    backbone_folder(tmp_path / "backbone")  # another backbone: the setup changed
    third, evaluated = guarded("third", backbone_dir=tmp_path / "backbone")
    assert "skipped" not in third and evaluated["registered"]["version"] == "2"

    manifest = pd.read_csv(data / "manifest.csv")
    manifest.loc[0, "label"] = "green" if manifest.loc[0, "label"] != "green" else "red"
    manifest.to_csv(data / "manifest.csv", index=False)  # a relabelled image: new data
    fourth, evaluated = guarded("fourth", backbone_dir=tmp_path / "backbone")
    assert "skipped" not in fourth and evaluated["registered"]["version"] == "3"
