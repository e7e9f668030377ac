"""Specification of the MoCo v2 augmentations (torchvision's reference, the two-crop wrapper,
the blur kernel) and the evaluation transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from sslpipe.models.moco import TwoCropsTransform, eval_transform
from sslpipe.models.moco.batch_augment import blur_kernel_size
from tests.models.moco.torchvision_moco_v2 import moco_v2_transform


def _image(width: int = 48, height: int = 40, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB").convert(mode)


def test_moco_v2_transform_returns_a_normalised_float_tensor_of_the_requested_size() -> None:
    view = moco_v2_transform(32)(_image())
    assert view.shape == (3, 32, 32)
    assert view.dtype == torch.float32
    # Normalised with ImageNet statistics, so values leave [0, 1].
    assert view.min() < 0


def test_grayscale_and_rgba_images_become_three_channel_views() -> None:
    transform = moco_v2_transform(16)
    assert transform(_image(mode="L")).shape == (3, 16, 16)
    assert transform(_image(mode="RGBA")).shape == (3, 16, 16)


def test_two_crops_transform_returns_two_different_views_of_one_image() -> None:
    torch.manual_seed(0)
    query, key = TwoCropsTransform(moco_v2_transform(32))(_image())
    assert query.shape == key.shape == (3, 32, 32)
    assert not torch.equal(query, key)


def test_default_pipeline_is_the_moco_v2_recipe_without_the_optional_extras() -> None:
    steps = moco_v2_transform(224).transforms
    types = [type(s) for s in steps]
    assert T.RandomResizedCrop in types
    assert T.RandomVerticalFlip not in types
    assert T.RandomRotation not in types
    crop = next(s for s in steps if isinstance(s, T.RandomResizedCrop))
    assert crop.scale == (0.2, 1.0)
    jitter = steps[types.index(T.RandomApply)].transforms[0]
    assert isinstance(jitter, T.ColorJitter)
    assert jitter.brightness == (0.6, 1.4)
    assert jitter.hue == pytest.approx((-0.1, 0.1))


def test_optional_vertical_flip_and_rotation_are_added_when_enabled() -> None:
    steps = moco_v2_transform(32, vertical_flip_p=0.5, rotation_degrees=90).transforms
    types = [type(s) for s in steps]
    assert T.RandomVerticalFlip in types
    assert T.RandomRotation in types


def test_blur_kernel_is_odd_about_a_tenth_of_the_image_and_at_least_3() -> None:
    assert blur_kernel_size(224) == 23
    assert blur_kernel_size(32) == 3
    assert blur_kernel_size(8) == 3
    assert all(blur_kernel_size(s) % 2 == 1 for s in range(8, 300))


def test_eval_transform_is_deterministic_and_center_crops_to_the_requested_size() -> None:
    transform = eval_transform(24)
    a, b = transform(_image()), transform(_image())
    assert a.shape == (3, 24, 24)
    assert torch.equal(a, b)


@pytest.mark.parametrize("image_size", [0, 7, -32])
def test_image_size_below_8_pixels_is_rejected(image_size: int) -> None:
    with pytest.raises(ValueError, match=rf"image_size must be an int >= 8.*got {image_size}"):
        moco_v2_transform(image_size)
    with pytest.raises(ValueError, match="image_size must be an int >= 8"):
        eval_transform(image_size)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_scale": 0.0}, "min_scale must be in"),
        ({"jitter_p": 1.5}, "jitter_p must be a probability"),
        ({"blur_sigma": (2.0, 0.1)}, "blur_sigma must be"),
        ({"rotation_degrees": -5.0}, "rotation_degrees must be in"),
        ({"jitter_strength": 3.0}, "jitter_strength must be in"),
    ],
)
def test_invalid_options_are_rejected_by_name(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        moco_v2_transform(32, **kwargs)  # type: ignore[arg-type]
