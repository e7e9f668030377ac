"""The pieces of classifier training: labelled data, freezing, one epoch, validation, stopping.

:mod:`sslpipe.steps.classifier_train` puts them together; evaluation code can reuse
:func:`read_labelled_data`, :class:`LabelledImageDataset`, :func:`predict` and
:func:`macro_f1` to score a saved classifier on the same manifest.

The labelled data is a data_prep output folder::

    manifest.csv   id, path, label, width, height, split (train | val | test), repeats
    labels.json    {"classes": [sorted labels], "index": {label: i}, "level": n,
                    "class_weights": {label: w} | null}
    selection.json lineage of the selection (filter, ...)
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import f1_score
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sslpipe.core import progress
from sslpipe.core.io import atomic_path, read_csv, read_json
from sslpipe.models.classifier.model import ImageClassifier

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST_COLUMNS: tuple[str, ...] = ("id", "path", "label", "split")


# --- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledData:
    """A data_prep folder's labelled rows, with the class index of each row in ``target``.

    ``frame`` holds only rows whose split is train, val or test; ``repeats`` is 1 where the
    manifest has no such column.
    """

    root: Path
    classes: list[str]
    frame: pd.DataFrame
    class_weights: list[float] | None
    level: int | None
    ignored_rows: int = 0

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name]

    def counts(self) -> dict[str, int]:
        """Images per split (train counted once per image, before ``repeats``)."""
        return {name: int((self.frame["split"] == name).sum()) for name in SPLITS}


def read_labelled_data(data_dir: Path) -> LabelledData:
    """Read ``manifest.csv`` and ``labels.json`` of a labelled data_prep folder and check them.

    Raises:
        ValueError: labels.json is missing or malformed, a manifest label is not in it, the
            manifest has no train or no val rows, or ``repeats`` is not a positive integer.
        FileNotFoundError: manifest.csv is missing.
    """
    data_dir = Path(data_dir)
    manifest_path, labels_path = data_dir / "manifest.csv", data_dir / "labels.json"
    frame = read_csv(manifest_path, required=MANIFEST_COLUMNS)
    if not labels_path.is_file():
        raise ValueError(
            f"{labels_path} is missing: classifier_train needs a labelled data_prep output"
        )
    labels = read_json(labels_path)
    classes = labels.get("classes") if isinstance(labels, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{labels_path}: expected {{'classes': [label, ...], ...}}")
    index = labels.get("index") or {c: i for i, c in enumerate(classes)}
    if index != {c: i for i, c in enumerate(classes)}:
        raise ValueError(f"{labels_path}: 'index' does not number 'classes' in order")
    if len(classes) < 2:
        raise ValueError(f"{labels_path}: a classifier needs at least 2 classes, found {classes}")

    frame = frame.assign(split=frame["split"].astype(str).str.strip())
    in_splits = frame["split"].isin(SPLITS)
    ignored = int((~in_splits).sum())
    frame = frame[in_splits].reset_index(drop=True)
    missing = sorted(set(frame["label"]) - set(classes))
    if missing:
        raise ValueError(
            f"{manifest_path}: label(s) {missing} are not in {labels_path} "
            f"(classes: {classes}); the manifest and the label map do not belong together"
        )
    for name in ("train", "val"):
        if not (frame["split"] == name).any():
            raise ValueError(
                f"{manifest_path} has no {name!r} rows; classifier_train needs train and val "
                "images (check labels.split and the number of labelled images)"
            )
    if "repeats" in frame.columns:
        repeats = pd.to_numeric(frame["repeats"], errors="coerce")
        bad = frame["split"].eq("train") & ~(repeats.notna() & (repeats >= 1) & (repeats % 1 == 0))
        if bad.any():
            rows = frame.loc[bad, "id"].head(5).tolist()
            raise ValueError(
                f"{manifest_path}: 'repeats' must be a positive integer on train rows; "
                f"see ids {rows}"
            )
        frame = frame.assign(repeats=repeats.fillna(1).clip(lower=1).astype(int))
    else:
        frame = frame.assign(repeats=1)
    frame = frame.assign(target=frame["label"].map(index).astype(int))

    weights = labels.get("class_weights")
    class_weights = None
    if weights is not None:
        absent = [c for c in classes if c not in weights]
        if absent:
            raise ValueError(f"{labels_path}: class_weights has no weight for {absent}")
        class_weights = [float(weights[c]) for c in classes]
        if not all(math.isfinite(w) and w > 0 for w in class_weights):
            raise ValueError(f"{labels_path}: class_weights must be positive, got {weights}")
    level = labels.get("level")
    return LabelledData(
        data_dir, list(classes), frame, class_weights, int(level) if level else None, ignored
    )


def expand_repeats(frame: pd.DataFrame) -> pd.DataFrame:
    """Each row ``repeats`` times (random oversampling of the minority classes), in order."""
    repeats = frame["repeats"].to_numpy(dtype=int) if "repeats" in frame else None
    if repeats is None:
        return frame.reset_index(drop=True)
    return frame.loc[frame.index.repeat(repeats)].reset_index(drop=True)


def class_weight_tensor(class_weights: Sequence[float] | None) -> Tensor | None:
    """The ``weight`` argument of CrossEntropyLoss, in class index order (None: unweighted)."""
    return None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)


def make_criterion(class_weights: Sequence[float] | None) -> nn.CrossEntropyLoss:
    """Cross-entropy, weighted per class when ``class_weights`` is given."""
    return nn.CrossEntropyLoss(weight=class_weight_tensor(class_weights))


class LabelledImageDataset(Dataset[tuple[Tensor, int]]):
    """``(transform(image), class index)`` for each row of a manifest frame, opened lazily."""

    def __init__(self, root: Path, frame: pd.DataFrame, transform: Any) -> None:
        self.root = Path(root)
        self.paths = [str(p) for p in frame["path"]]
        self.targets = [int(t) for t in frame["target"]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        with Image.open(self.root / self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.targets[index]


# --- freezing and epochs -----------------------------------------------------------------------


def set_backbone_trainable(model: ImageClassifier, trainable: bool) -> None:
    """Freeze (``requires_grad`` False) or unfreeze the backbone; the head always trains."""
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(trainable)
    for parameter in model.head.parameters():
        parameter.requires_grad_(True)


def set_train_mode(model: ImageClassifier, *, backbone_frozen: bool) -> None:
    """Training mode; a frozen backbone stays in eval mode so its BN statistics do not move."""
    model.train()
    if backbone_frozen:
        model.backbone.eval()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _to_device(device: torch.device | None, tensor: Tensor) -> Tensor:
    return tensor if device is None else tensor.to(device, non_blocking=True)


def train_epoch(
    model: ImageClassifier,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    *,
    backbone_frozen: bool,
    trained: nn.Module | None = None,
    device: torch.device | None = None,
    desc: str = "training",
) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy) on the training batches.

    With ``backbone_frozen`` the backbone runs in eval mode under ``torch.no_grad()`` and only
    the head sees gradients.

    Args:
        trained: What computes the trained part: by default ``model.head`` with a frozen
            backbone and ``model`` otherwise; under data-parallel training, the
            ``DistributedDataParallel`` wrapper of that module, which averages the gradients
            over the processes.
        device: Where the batches go (the model must be there); None leaves them as loaded.
        desc: What the progress display (:mod:`sslpipe.core.progress`) calls the pass.
    """
    set_train_mode(model, backbone_frozen=backbone_frozen)
    if trained is None:
        trained = model.head if backbone_frozen else model
    total_loss, correct, seen = 0.0, 0, 0
    for batch_images, batch_targets in progress.bar(loader, desc=desc, unit="batch"):
        images, targets = _to_device(device, batch_images), _to_device(device, batch_targets)
        if backbone_frozen:
            with torch.no_grad():
                features = model.backbone(images)
            logits = trained(features)
        else:
            logits = trained(images)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(targets)
        correct += int((logits.detach().argmax(dim=1) == targets).sum())
        seen += len(targets)
    if seen == 0:
        raise ValueError("the training loader produced no batch")
    return total_loss / seen, correct / seen


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader[Any],
    device: torch.device | None = None,
    desc: str = "predicting",
) -> tuple[Tensor, Tensor]:
    """Logits (N, C) and targets (N,) of every item of ``loader``, model in eval mode.

    With a ``device`` the batches are computed there and the results returned on the CPU.
    ``desc`` names the pass in the progress display (:mod:`sslpipe.core.progress`).
    """
    model.eval()
    logits, targets = [], []
    for images, batch_targets in progress.bar(loader, desc=desc, unit="batch"):
        batch_logits = model(_to_device(device, images))
        logits.append(batch_logits if device is None else batch_logits.cpu())
        targets.append(torch.as_tensor(batch_targets))
    return torch.cat(logits), torch.cat(targets)


def macro_f1(targets: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray) -> float:
    """scikit-learn's macro-averaged F1 over the classes present in targets or predictions."""
    return float(f1_score(targets, predictions, average="macro", zero_division=0))


def evaluate(
    model: nn.Module,
    loader: DataLoader[Any],
    criterion: nn.Module,
    device: torch.device | None = None,
    desc: str = "validation",
) -> dict[str, float]:
    """``{"loss", "accuracy", "macro_f1"}`` of ``model`` on ``loader`` (``desc``: the pass's
    name in the progress display)."""
    logits, targets = predict(model, loader, device, desc=desc)
    return scores(logits, targets, criterion)


def scores(logits: Tensor, targets: Tensor, criterion: nn.Module) -> dict[str, float]:
    """``{"loss", "accuracy", "macro_f1"}`` of CPU ``logits`` (N, C) against ``targets`` (N,)."""
    predictions = logits.argmax(dim=1)
    return {
        "loss": float(criterion(logits, targets)),
        "accuracy": float((predictions == targets).float().mean()),
        "macro_f1": macro_f1(targets.numpy(), predictions.numpy()),
    }


# --- early stopping ----------------------------------------------------------------------------


@dataclass
class EarlyStopping:
    """Keeps the best score (higher is better) and counts epochs without improvement.

    ``should_stop`` turns true after ``patience`` consecutive epochs that did not beat the best
    score strictly.
    """

    patience: int
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict[str, Tensor] | None = field(default=None, repr=False)

    def step(self, score: float, epoch: int, model: nn.Module | None = None) -> bool:
        """Record ``score`` of ``epoch``; returns True (and keeps a copy of ``model``'s
        weights) when it is a new best."""
        if score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            if model is not None:
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def reset_patience(self) -> None:
        self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.best_state = copy.copy(state["best_state"])


# --- curves ------------------------------------------------------------------------------------


def plot_curves(path: Path, history: list[dict[str, Any]], *, title: str = "classifier") -> None:
    """Loss (train, val) and accuracy (train, val, plus val macro-F1) per epoch in one PNG."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], marker="s", label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title(f"{title}: loss")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], marker="o", label="train accuracy")
    ax_acc.plot(epochs, [r["val_accuracy"] for r in history], marker="s", label="val accuracy")
    ax_acc.plot(
        epochs,
        [r["val_macro_f1"] for r in history],
        linestyle="--",
        marker=".",
        label="val macro-F1",
    )
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy / macro-F1")
    ax_acc.set_title(f"{title}: accuracy")
    for ax in (ax_loss, ax_acc):
        for prev, row in itertools.pairwise(history):
            if row["stage"] != prev["stage"]:
                ax.axvline(prev["epoch"] + 0.5, color="grey", linestyle=":", label="fine-tuning")
        best = [r["epoch"] for r in history if r.get("best")]
        if best:
            ax.axvline(best[-1], color="tab:green", alpha=0.3, linewidth=4, label="best epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


__all__ = [
    "SPLITS",
    "EarlyStopping",
    "LabelledData",
    "LabelledImageDataset",
    "class_weight_tensor",
    "evaluate",
    "expand_repeats",
    "macro_f1",
    "make_criterion",
    "plot_curves",
    "predict",
    "read_labelled_data",
    "scores",
    "set_backbone_trainable",
    "set_train_mode",
    "train_epoch",
    "trainable_parameters",
]
