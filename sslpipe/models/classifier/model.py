"""The image classifier: backbone plus the seed's head, and its model folder.

Format ``sslpipe.classifier/v1``::

    classifier.pt    state_dict of :class:`ImageClassifier` ("backbone.*", "head.*"); tensors
                     only, loaded with weights_only=True
    classifier.json  {"format", "backbone": BackboneSpec, "feature_dim", "hidden_dim",
                      "dropout", "classes": [label, ...] (index order), "image_size",
                      "mean", "std", "lineage": {...}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sslpipe.core.io import read_folder_config
from sslpipe.models.backbone_io import load_weights, preprocessing, write_model_folder
from sslpipe.models.moco.backbone import BackboneSpec, build_backbone

CLASSIFIER_FORMAT = "sslpipe.classifier/v1"
WEIGHTS_FILE = "classifier.pt"
CONFIG_FILE = "classifier.json"


class ClassifierHead(nn.Sequential):
    """Linear -> ReLU -> Dropout -> Linear, the seed's head (chapter 5.2).

    Input (N, feature_dim), output logits (N, num_classes).
    """

    def __init__(
        self, feature_dim: int, num_classes: int, *, hidden_dim: int = 256, dropout: float = 0.5
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, found {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), found {dropout}")
        super().__init__(
            nn.Linear(feature_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )


class ImageClassifier(nn.Module):
    """``head(backbone(x))``: images (N, 3, H, W) -> logits (N, num_classes)."""

    def __init__(self, backbone: nn.Module, head: ClassifierHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(self.backbone(x))
        return logits


def save_classifier(
    folder: Path,
    model: ImageClassifier,
    *,
    spec: BackboneSpec,
    classes: list[str],
    hidden_dim: int,
    dropout: float,
    image_size: int,
    lineage: dict[str, Any],
) -> dict[str, Any]:
    """Write the classifier folder; the JSON config is written last (its presence = complete)."""
    config = {
        "format": CLASSIFIER_FORMAT,
        "backbone": spec.to_dict(),
        "feature_dim": spec.feature_dim,
        "hidden_dim": hidden_dim,
        "dropout": dropout,
        "classes": list(classes),
        **preprocessing(image_size),
        "lineage": lineage,
    }
    return write_model_folder(
        folder, model, config, weights_file=WEIGHTS_FILE, config_file=CONFIG_FILE
    )


def load_classifier_dir(folder: Path) -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild a classifier (eval mode) from its folder.

    Raises:
        ValueError: when the folder is not a classifier folder, or the label map does not match
            the head's output size.
    """
    config = read_folder_config(folder, CONFIG_FILE, CLASSIFIER_FORMAT, "classifier")
    backbone, feature_dim = build_backbone(BackboneSpec.from_dict(config["backbone"]))
    classes = config["classes"]
    head = ClassifierHead(
        feature_dim, len(classes), hidden_dim=config["hidden_dim"], dropout=config["dropout"]
    )
    model = ImageClassifier(backbone, head)
    state = load_weights(Path(folder) / WEIGHTS_FILE)
    out_features = state.get("head.3.weight", torch.empty(0)).shape[0]
    if out_features != len(classes):
        raise ValueError(
            f"{folder}: the label map has {len(classes)} classes but the head predicts "
            f"{out_features}; the classifier folder is inconsistent"
        )
    model.load_state_dict(state)
    return model.eval(), config
