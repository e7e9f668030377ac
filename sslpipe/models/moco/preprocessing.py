"""Image preprocessing shared by training, embedding and serving: statistics, RGB, eval views.

The random MoCo v2 training recipe is :mod:`sslpipe.models.moco.batch_augment`; this module holds
what every image path agrees on: the ImageNet normalisation statistics, the conversion of any
PIL mode to RGB, and the deterministic transform used for embeddings and the kNN monitor.
"""

from __future__ import annotations

from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ConvertRGB:
    """Convert a PIL image to RGB (catalogs mix grayscale, palette and RGBA files).

    A class rather than a lambda so that the transform can be pickled into DataLoader workers.
    """

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_image_size(image_size: int, where: str) -> None:
    """Raise ValueError, naming ``where``, unless ``image_size`` is an int >= 8 (pixels)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(
            f"{where}: image_size must be an int >= 8 (pixels), got {image_size!r}. "
            "Typical values are 32 (small stem), 96 or 224."
        )


def eval_transform(image_size: int) -> T.Compose:
    """Deterministic transform for embeddings and the kNN monitor.

    Resizes the shorter side to ``image_size``, takes the central square crop and normalises:
    PIL image -> (3, image_size, image_size) float tensor.
    """
    check_image_size(image_size, "eval_transform")
    return T.Compose(
        [
            ConvertRGB(),
            T.Resize(image_size),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ConvertRGB", "check_image_size", "eval_transform"]
