"""The registered backbone as an MLflow pyfunc: images in, embeddings out."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from PIL import Image

from sslpipe.models.backbone_io import load_backbone_dir
from sslpipe.models.moco.preprocessing import eval_transform


def to_pil(item: Any) -> Image.Image:
    """An image path, bytes or HxWxC uint8 array as an RGB PIL image."""
    if isinstance(item, str | Path):
        with Image.open(item) as image:
            return image.convert("RGB")
    if isinstance(item, bytes | bytearray):
        return Image.open(io.BytesIO(item)).convert("RGB")
    if isinstance(item, np.ndarray):
        return Image.fromarray(item.astype(np.uint8)).convert("RGB")
    raise TypeError(f"cannot read an image from {type(item).__name__}; pass a path, bytes or array")


def images_of(model_input: Any) -> list[Any]:
    """The list of images in a pyfunc input: a DataFrame column, a list, or one image."""
    if isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, list | tuple):
        return list(model_input)
    return [model_input]


class BackboneEmbedder(PythonModel):
    """``predict(images) -> ndarray (N, feature_dim)`` of L2-normalised embeddings."""

    def load_context(self, context: Any) -> None:
        self.model, self.config = load_backbone_dir(Path(context.artifacts["backbone"]))
        self.transform = eval_transform(int(self.config["image_size"]))

    @torch.no_grad()
    def embed(self, images: Iterable[Any], batch_size: int = 64) -> np.ndarray:
        batch: list[torch.Tensor] = []
        out: list[np.ndarray] = []
        for item in images:
            batch.append(self.transform(to_pil(item)))
            if len(batch) == batch_size:
                out.append(self._forward(batch))
                batch = []
        if batch:
            out.append(self._forward(batch))
        return np.concatenate(out) if out else np.zeros((0, int(self.config["feature_dim"])))

    def _forward(self, batch: list[torch.Tensor]) -> np.ndarray:
        features = self.model(torch.stack(batch))
        return torch.nn.functional.normalize(features, dim=1).numpy()

    # No type hints on predict's input: MLflow would turn them into a schema that rejects the
    # mix of paths, bytes and arrays accepted here.
    def predict(self, context, model_input, params=None):
        """Embeddings (N, feature_dim) for image paths, bytes or arrays (list or DataFrame)."""
        return self.embed(images_of(model_input))
