"""The registered image classifier as an MLflow pyfunc: images in, labels and probabilities out.

``predict`` returns a pandas DataFrame with one row per input image, in input order:

=================  ====================================================================
``label``          the predicted class (str), or None when the image could not be read
``confidence``     the probability of ``label`` (float), NaN for an unreadable image
``prob_<class>``   one float column per class, in the classifier's class order
                   (``classes`` in classifier.json); NaN for an unreadable image
``error``          None, or why the image could not be read (missing file, not an image,
                   corrupt data, unsupported input type); the other rows are unaffected
=================  ====================================================================

Separate ``prob_<class>`` columns (rather than one dict column) keep the output a flat table
that serialises to CSV, JSON and MLflow's scoring server without nested objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from sslpipe.models.classifier.model import ImageClassifier, load_classifier_dir
from sslpipe.models.moco.preprocessing import eval_transform
from sslpipe.models.serving.embedder import images_of, to_pil

PROB_PREFIX = "prob_"
DEFAULT_BATCH_SIZE = 64


def prob_column(label: str) -> str:
    """The output column holding the probability of class ``label``."""
    return f"{PROB_PREFIX}{label}"


def model_inputs(model_input: Any) -> list[Any]:
    """The images of a pyfunc input: a DataFrame column, a Series, a list, a (N, H, W, C)
    array, a 1-D array of paths, or one image."""
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, np.ndarray) and (
        model_input.ndim == 4 or (model_input.ndim == 1 and model_input.dtype == object)
    ):
        return list(model_input)
    return images_of(model_input)


def describe_error(err: BaseException) -> str:
    """One line saying why an input could not be read."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class ClassifierPredictor:
    """A loaded classifier folder that labels images; the pyfunc and the evaluate step share it,
    so that the registered model and its evaluation see the same preprocessing."""

    def __init__(
        self, model: ImageClassifier, config: dict[str, Any], *, batch_size: int = 64
    ) -> None:
        self.model = model.eval()
        self.config = config
        self.classes: list[str] = [str(c) for c in config["classes"]]
        self.transform = eval_transform(int(config["image_size"]))
        self.batch_size = batch_size

    @classmethod
    def from_dir(cls, folder: Path, *, batch_size: int = DEFAULT_BATCH_SIZE) -> ClassifierPredictor:
        model, config = load_classifier_dir(folder)
        return cls(model, config, batch_size=batch_size)

    @property
    def columns(self) -> list[str]:
        return ["label", "confidence", *(prob_column(c) for c in self.classes), "error"]

    @torch.no_grad()
    def _probabilities(self, batch: list[torch.Tensor]) -> np.ndarray:
        logits = self.model(torch.stack(batch))
        return torch.softmax(logits.float(), dim=1).numpy()

    def predict_proba(self, images: Iterable[Any]) -> tuple[np.ndarray, list[str | None]]:
        """Probabilities (N, num_classes), NaN rows for unreadable images, and the errors."""
        items = list(images)
        probs = np.full((len(items), len(self.classes)), np.nan, dtype=np.float64)
        errors: list[str | None] = [None] * len(items)
        batch: list[torch.Tensor] = []
        rows: list[int] = []

        def flush() -> None:
            if batch:
                probs[rows] = self._probabilities(batch)
                batch.clear()
                rows.clear()

        for index, item in enumerate(items):
            try:
                tensor = self.transform(to_pil(item))
            # One unreadable input (missing, truncated, not an image, wrong type) must not cost
            # the others their predictions; its row carries the reason instead.
            except Exception as err:
                errors[index] = describe_error(err)
                continue
            batch.append(tensor)
            rows.append(index)
            if len(batch) == self.batch_size:
                flush()
        flush()
        return probs, errors

    def predict(self, images: Iterable[Any]) -> pd.DataFrame:
        """One row per image: label, confidence, ``prob_<class>`` columns, error."""
        probs, errors = self.predict_proba(images)
        return self.frame(probs, errors)

    def frame(self, probs: np.ndarray, errors: Sequence[str | None]) -> pd.DataFrame:
        ok = np.array([e is None for e in errors], dtype=bool)
        best = np.where(ok, np.nan_to_num(probs, nan=-1.0).argmax(axis=1), -1)
        labels = [self.classes[i] if i >= 0 else None for i in best]
        confidence = np.where(ok, np.nan_to_num(probs, nan=0.0).max(axis=1), np.nan)
        data: dict[str, Any] = {
            "label": pd.Series(labels, dtype=object),
            "confidence": confidence,
        }
        for column, label in enumerate(self.classes):
            data[prob_column(label)] = probs[:, column]
        data["error"] = pd.Series(list(errors), dtype=object)
        return pd.DataFrame(data, columns=self.columns)


class ImageClassifierModel(PythonModel):
    """``predict(images) -> DataFrame`` (label, confidence, ``prob_<class>``..., error)."""

    def load_context(self, context: Any) -> None:
        self.predictor = ClassifierPredictor.from_dir(Path(context.artifacts["classifier"]))

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    # No type hints on predict's input: MLflow would turn them into a schema that rejects the
    # mix of paths, bytes and arrays accepted here.
    def predict(self, context, model_input, params=None):
        """Labels for image paths, bytes or HxWxC uint8 arrays (list, Series or DataFrame)."""
        return self.predictor.predict(model_inputs(model_input))
