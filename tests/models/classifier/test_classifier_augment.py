"""Classifier augmentations: their own recipe (not MoCo's), sizes, flips, and the eval transform."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from sslpipe.models.classifier.augment import eval_transform, train_transform
from sslpipe.models.moco.preprocessing import eval_transform as moco_eval_transform


def steps(transform: T.Compose) -> list[type]:
    return [type(step) for step in transform.transforms]


def test_the_training_transform_crops_rotates_jitters_flips_and_normalises() -> None:
    kinds = steps(train_transform(32))
    for kind in (
        T.RandomResizedCrop,
        T.RandomRotation,
        T.ColorJitter,
        T.RandomHorizontalFlip,
        T.Normalize,
    ):
        assert kind in kinds, kind
    assert T.RandomVerticalFlip not in kinds  # off unless asked for
    # Not MoCo's views: no grayscale and no blur, which could erase what a label depends on.
    assert T.RandomGrayscale not in kinds and T.RandomApply not in kinds
    rotation = train_transform(32).transforms[kinds.index(T.RandomRotation)]
    assert rotation.degrees == [-10.0, 10.0]


def test_vertical_flips_are_optional() -> None:
    assert T.RandomVerticalFlip in steps(train_transform(32, vertical_flip_p=0.5))


def test_any_image_becomes_a_normalised_square_of_image_size() -> None:
    torch.manual_seed(0)
    image = Image.new("L", (50, 30), 128)  # grayscale and not square
    out = train_transform(24)(image)
    assert out.shape == (3, 24, 24)
    assert out.dtype == torch.float32
    assert out.abs().max() < 5  # normalised, not raw 0..255


def test_training_views_are_random_and_seeded() -> None:
    image = Image.effect_noise((40, 40), 50).convert("RGB")
    transform = train_transform(16)
    torch.manual_seed(1)
    a = transform(image)
    torch.manual_seed(1)
    assert torch.equal(a, transform(image))
    assert not torch.equal(a, transform(image))


def test_evaluation_uses_the_deterministic_moco_eval_transform() -> None:
    image = Image.effect_noise((40, 30), 50).convert("RGB")
    assert eval_transform is moco_eval_transform
    assert torch.equal(eval_transform(16)(image), eval_transform(16)(image))


@pytest.mark.parametrize(
    "kwargs",
    [{"image_size": 4}, {"min_scale": 0.0}, {"rotation_degrees": 200}, {"vertical_flip_p": 2}],
)
def test_bad_arguments_are_refused(kwargs: dict[str, float]) -> None:
    arguments = {"image_size": 16, **kwargs}
    with pytest.raises(ValueError, match="train_transform"):
        train_transform(**arguments)  # type: ignore[arg-type]
