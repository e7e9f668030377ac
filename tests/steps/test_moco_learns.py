"""MoCo learns: the real moco_train step, with its default recipe, on real images.

The digits are scikit-learn's 1,797 real handwritten digits, drawn as the demo catalog draws
them (dark ink on white paper, upscaled). Before the queue masked its unwritten slots the loss
of this very run climbed to ln(K + 1), chance, within two epochs: every embedding had collapsed
onto one direction.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sslpipe.core.config import MocoConfig
from sslpipe.steps.moco_train import run_moco_train

IMAGE_SIZE = 32
QUEUE = 512


def digits_folder(folder: Path) -> Path:
    """A data_prep-shaped folder of the digits, every one labelled (for the kNN monitor)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        grey = Image.fromarray(np.uint8(255 - pixels * (255.0 / 16.0)))
        image = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC).convert("RGB")
        image.save(folder / "images" / f"{i:04d}.png")
        rows.append((f"{i:04d}", f"images/{i:04d}.png", str(label), IMAGE_SIZE, IMAGE_SIZE))
    pd.DataFrame(rows, columns=["id", "path", "label", "width", "height"]).to_csv(
        folder / "manifest.csv", index=False
    )
    return folder


@pytest.fixture()
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    monkeypatch.setenv("SSLPIPE_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))


def test_the_default_recipe_drives_the_loss_well_below_chance_on_real_digits(
    tmp_path: Path, tracking: None
) -> None:
    # Only the budget is set here: the recipe (augmentations, lr, temperature, BN) is the
    # default, and the data path is the step's own (loader crops, batched augmentation).
    config = MocoConfig(image_size=IMAGE_SIZE, epochs=4, batch_size=64, queue_size=QUEUE)
    result = run_moco_train(
        data_dir=digits_folder(tmp_path / "data"),
        model_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "checkpoint",
        config=config,
        resume=False,
        register=False,
    )
    losses = result["metrics"]["losses"]
    chance = math.log(QUEUE + 1)  # 6.24: every logit alike
    # Before the fix the losses of this run were 5.75, 6.23, 6.24, 6.24: chance.
    assert losses[-1] < 0.88 * chance, losses
