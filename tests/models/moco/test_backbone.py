"""Specification of BackboneSpec and build_backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslpipe.models.moco import BACKBONES, BackboneSpec, build_backbone


def test_resnet18_with_small_stem_maps_32px_images_to_512_features() -> None:
    backbone, dim = build_backbone(BackboneSpec("resnet18", small_stem=True))
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 32, 32))
    assert dim == 512
    assert out.shape == (2, 512)


def test_small_stem_is_a_3x3_stride_1_convolution_without_max_pool() -> None:
    backbone, _ = build_backbone(BackboneSpec("resnet18", small_stem=True))
    conv1 = backbone.conv1
    assert isinstance(conv1, nn.Conv2d)
    assert conv1.kernel_size == (3, 3)
    assert conv1.stride == (1, 1)
    assert conv1.padding == (1, 1)
    assert conv1.bias is None
    assert isinstance(backbone.maxpool, nn.Identity)


def test_normal_stem_keeps_the_imagenet_7x7_stride_2_convolution_and_max_pool() -> None:
    backbone, _ = build_backbone(BackboneSpec("resnet18"))
    assert backbone.conv1.kernel_size == (7, 7)
    assert backbone.conv1.stride == (2, 2)
    assert isinstance(backbone.maxpool, nn.MaxPool2d)


def test_resnet18_with_normal_stem_maps_64px_images_to_512_features() -> None:
    backbone, dim = build_backbone(BackboneSpec("resnet18"))
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 64, 64))
    assert (dim, tuple(out.shape)) == (512, (2, 512))


def test_classifier_is_replaced_by_identity() -> None:
    backbone, _ = build_backbone(BackboneSpec("resnet34"))
    assert isinstance(backbone.fc, nn.Identity)


def test_resnet50_has_2048_features() -> None:
    backbone, dim = build_backbone(BackboneSpec("resnet50", small_stem=True))
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 16, 16))
    assert (dim, tuple(out.shape)) == (2048, (1, 2048))


def test_backbones_are_randomly_initialised_from_the_global_seed() -> None:
    torch.manual_seed(0)
    a, _ = build_backbone(BackboneSpec("resnet18"))
    torch.manual_seed(0)
    b, _ = build_backbone(BackboneSpec("resnet18"))
    torch.manual_seed(1)
    c, _ = build_backbone(BackboneSpec("resnet18"))
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_unknown_name_is_rejected_with_the_list_of_choices() -> None:
    with pytest.raises(ValueError, match=r"'resnet101'.*resnet18, resnet34, resnet50"):
        BackboneSpec("resnet101")


def test_non_bool_small_stem_is_rejected() -> None:
    with pytest.raises(ValueError, match="small_stem must be a bool"):
        BackboneSpec("resnet18", small_stem="yes")  # type: ignore[arg-type]


def test_spec_round_trips_through_a_plain_dict() -> None:
    spec = BackboneSpec("resnet34", small_stem=True)
    assert spec.to_dict() == {"name": "resnet34", "small_stem": True}
    assert BackboneSpec.from_dict(spec.to_dict()) == spec


def test_from_dict_fills_missing_keys_with_defaults() -> None:
    assert BackboneSpec.from_dict({}) == BackboneSpec()


def test_from_dict_rejects_unknown_keys_by_name() -> None:
    with pytest.raises(ValueError, match=r"Unknown BackboneSpec key\(s\) \['depth'\]"):
        BackboneSpec.from_dict({"name": "resnet18", "depth": 18})


def test_every_listed_backbone_name_is_accepted() -> None:
    assert BACKBONES == ("resnet18", "resnet34", "resnet50")
    for name in BACKBONES:
        assert BackboneSpec(name).name == name
