"""Test helpers for the classifier's evaluation, serving and registry (not a test module).

``make_classifier`` builds a real ``sslpipe.classifier/v1`` folder (resnet18, small stem, 16 px)
whose head is set by hand to a nearest-prototype rule on the random backbone's features of
solid-colour images: a solid red image is labelled "red", and so on. Predictions are therefore
known in advance without any training, and the metrics of a test split can be checked against
scikit-learn on those known predictions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import torch
from PIL import Image

from sslpipe.models.backbone_io import save_backbone
from sslpipe.models.classifier.model import ClassifierHead, ImageClassifier, save_classifier
from sslpipe.models.moco.backbone import BackboneSpec, build_backbone
from sslpipe.models.moco.preprocessing import eval_transform

REPO = Path(__file__).resolve().parents[1]
COLORS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}
CLASSES = sorted(COLORS)
IMAGE_SIZE = 16
SPEC = BackboneSpec("resnet18", small_stem=True)
LINEAGE = {
    "backbone": {
        "source": "moco-backbone@latest",
        "kind": "registry",
        "name": "moco-backbone",
        "version": "7",
        "uri": "models:/moco-backbone/7",
    },
    "filter": {"exclude_blurred": True, "labelled": "labelled"},
    "num_images": {"train": 6, "val": 3, "test": 9},
    "mlflow_run_id": "abc123",
}
FILTER = {"exclude_blurred": True, "sortout": ["Keep"], "labelled": "labelled"}


def write_image(path: Path, color: str, size: tuple[int, int] = (18, 16)) -> Path:
    """A solid-colour PNG (lossless, so that every image of a colour gets the same features)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLORS[color]).save(path, format="PNG")
    return path


def write_corrupt(path: Path) -> Path:
    """A file named like a JPEG whose content is not an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return path


@torch.no_grad()
def make_classifier(
    folder: Path, *, classes: Iterable[str] = CLASSES, lineage: dict[str, Any] | None = None
) -> Path:
    """A classifier folder that labels a solid-colour image by its colour's name."""
    classes = list(classes)
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone(SPEC)
    backbone.eval()
    transform = eval_transform(IMAGE_SIZE)
    prototypes = backbone(
        torch.stack([transform(Image.new("RGB", (16, 16), COLORS[c])) for c in classes])
    )
    hidden = len(classes) + 2
    head = ClassifierHead(feature_dim, len(classes), hidden_dim=hidden, dropout=0.5)
    first, last = head[0], head[3]
    # logit_c = relu(f . p_c - |p_c|^2 / 2): largest for the nearest prototype p_c.
    first.weight.zero_()
    first.bias.zero_()
    first.weight[: len(classes)] = prototypes
    first.bias[: len(classes)] = -0.5 * (prototypes**2).sum(dim=1)
    scale = 10.0 / float(first.bias.abs().max())
    first.weight.mul_(scale)
    first.bias.mul_(scale)
    last.weight.zero_()
    last.bias.zero_()
    last.weight[:, : len(classes)] = torch.eye(len(classes))
    model = ImageClassifier(backbone, head).eval()
    save_classifier(
        folder,
        model,
        spec=SPEC,
        classes=classes,
        hidden_dim=hidden,
        dropout=0.5,
        image_size=IMAGE_SIZE,
        lineage=LINEAGE if lineage is None else lineage,
    )
    for name, content in (
        ("history.json", "[]"),
        ("train_metrics.json", "{}"),
    ):
        (folder / name).write_text(content)
    return folder


def make_backbone(folder: Path) -> Path:
    torch.manual_seed(0)
    backbone, _ = build_backbone(SPEC)
    save_backbone(folder, backbone, SPEC, image_size=IMAGE_SIZE, lineage={"test": True})
    return folder


# (id, colour of the image, label in the manifest, split); two test images are mislabelled so
# that the metrics are not all 1.0: the classifier (by colour) disagrees with their labels.
DATA_ROWS = [
    *[(f"tr{i}", c, c, "train") for i, c in enumerate(CLASSES * 2)],
    *[(f"va{i}", c, c, "val") for i, c in enumerate(CLASSES)],
    ("t0", "red", "red", "test"),
    ("t1", "red", "red", "test"),
    ("t2", "red", "green", "test"),  # predicted red
    ("t3", "green", "green", "test"),
    ("t4", "green", "green", "test"),
    ("t5", "blue", "blue", "test"),
    ("t6", "blue", "red", "test"),  # predicted blue
    ("t7", "blue", "blue", "test"),
    ("t8", "green", "green", "test"),
]


def expected_test_labels() -> tuple[list[str], list[str]]:
    """(true labels, the classifier's predictions) of the test split of DATA_ROWS."""
    test = [r for r in DATA_ROWS if r[3] == "test"]
    return [r[2] for r in test], [r[1] for r in test]


def make_data(folder: Path, rows: list[tuple[str, str, str, str]] = DATA_ROWS) -> Path:
    """A labelled data_prep-shaped folder: images/, manifest.csv, labels.json, selection.json."""
    records = []
    for image_id, color, label, split in rows:
        write_image(folder / "images" / f"{image_id}.png", color)
        records.append((image_id, f"images/{image_id}.png", label, 18, 16, split, 1))
    pd.DataFrame(
        records, columns=["id", "path", "label", "width", "height", "split", "repeats"]
    ).to_csv(folder / "manifest.csv", index=False)
    classes = sorted({r[2] for r in rows})
    (folder / "labels.json").write_text(
        json.dumps(
            {
                "classes": classes,
                "index": {c: i for i, c in enumerate(classes)},
                "level": 1,
                "class_weights": None,
            }
        )
    )
    (folder / "selection.json").write_text(
        json.dumps({"filter": FILTER, "num_selected": len(rows), "metadata_store": "sqlite"})
    )
    return folder


def image_folder(folder: Path) -> Path:
    """Images to predict: two red, one green (in a subfolder), one blue, one corrupt file."""
    write_image(folder / "a_red.png", "red")
    write_image(folder / "b_red.png", "red", size=(30, 20))
    write_image(folder / "sub" / "c_green.png", "green")
    write_image(folder / "d_blue.png", "blue")
    write_corrupt(folder / "e_broken.jpg")
    (folder / "notes.txt").write_text("not an image, and not named like one")
    return folder


@contextmanager
def tracking_store(root: Path) -> Iterator[str]:
    """A local MLflow store under ``root``, in the environment like the executor sets it."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
        patch.setenv("SSLPIPE_ARTIFACT_ROOT", str(root / "mlartifacts"))
        patch.delenv("SSLPIPE_MLFLOW_PARENT_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        yield uri
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or None)
