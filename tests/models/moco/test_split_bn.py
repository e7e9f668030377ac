"""Specification of split BatchNorm, the one-process emulation of MoCo's shuffle-BN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslpipe.models.moco import MoCo
from sslpipe.models.moco.split_bn import (
    SplitBatchNorm2d,
    auto_splits,
    convert_split_batchnorm,
    set_splits,
)


def _pair(splits: int) -> tuple[nn.BatchNorm2d, SplitBatchNorm2d]:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    split = convert_split_batchnorm(nn.Sequential(plain), splits)[0]
    assert isinstance(split, SplitBatchNorm2d)
    return plain, split


def test_each_group_of_the_batch_is_normalised_with_its_own_statistics() -> None:
    _, split = _pair(2)
    reference = nn.BatchNorm2d(3)
    reference.load_state_dict(split.state_dict())
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    out = split(x)
    torch.testing.assert_close(out[:4], reference(x[:4]))
    torch.testing.assert_close(out[4:], reference(x[4:]))


def test_channels_last_batches_give_the_same_result() -> None:
    _, split = _pair(4)
    x = torch.randn(8, 3, 5, 5)
    expected = split(x)
    torch.testing.assert_close(split(x.contiguous(memory_format=torch.channels_last)), expected)


def test_running_statistics_move_towards_the_mean_of_the_groups_statistics() -> None:
    _, split = _pair(2)
    x = torch.randn(8, 3, 4, 4)
    split(x)
    groups = x.view(2, 4, 3, 4, 4)
    mean = groups.mean(dim=(1, 3, 4)).mean(0)
    var = groups.var(dim=(1, 3, 4), unbiased=True).mean(0)
    torch.testing.assert_close(split.running_mean, 0.1 * mean)
    torch.testing.assert_close(split.running_var, 0.9 + 0.1 * var)


def test_in_eval_mode_it_is_plain_batchnorm_with_running_statistics() -> None:
    plain, split = _pair(2)
    split(torch.randn(8, 3, 4, 4))
    plain.eval(), split.eval()
    x = torch.randn(3, 3, 4, 4)
    torch.testing.assert_close(split(x), plain(x))  # they share the buffers


def test_conversion_keeps_the_parameters_buffers_and_state_dict_keys() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    keys, weight = list(net.state_dict()), net[1].weight
    converted = convert_split_batchnorm(net, 2)
    assert isinstance(converted[1], SplitBatchNorm2d)
    assert converted[1].weight is weight
    assert list(converted.state_dict()) == keys
    set_splits(converted, 1)
    assert converted[1].splits == 1


def test_a_batch_the_splits_do_not_divide_uses_their_greatest_common_divisor() -> None:
    _, split = _pair(4)
    reference = nn.BatchNorm2d(3)
    reference.load_state_dict(split.state_dict())
    x = torch.randn(6, 3, 4, 4)
    torch.testing.assert_close(split(x)[3:], reference(x[3:]))


@pytest.mark.parametrize(("batch", "splits"), [(64, 2), (256, 8), (128, 4), (48, 2), (2, 2)])
def test_automatic_splits_hold_about_32_images_and_at_least_two_groups(
    batch: int, splits: int
) -> None:
    assert auto_splits(batch) == splits


def _moco(bn: str, splits: int) -> MoCo:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return MoCo(
        backbone,
        8,
        projection_hidden_dim=16,
        projection_dim=8,
        queue_size=8,
        bn=bn,
        bn_splits=splits,
    )  # type: ignore[arg-type]


def test_one_process_shuffle_bn_normalises_a_key_with_other_images_than_its_query() -> None:
    model = _moco("shuffle", 2)
    assert isinstance(model.backbone[1], SplitBatchNorm2d)
    assert isinstance(model.key_backbone[1], SplitBatchNorm2d)
    x = torch.randn(8, 3, 6, 6)
    torch.manual_seed(7)
    keys = model._keys(x)[0]
    torch.manual_seed(7)
    permutation = torch.randperm(8)
    expected = model.encode_keys(x[permutation])[torch.argsort(permutation)]
    torch.testing.assert_close(keys, expected)
    # Not what the query encoder's grouping (images 0-3, 4-7 in order) gives.
    assert not torch.allclose(keys, model.encode_keys(x))


def test_without_shuffle_bn_the_backbone_keeps_plain_batchnorm() -> None:
    model = _moco("none", 2)
    assert type(model.backbone[1]) is nn.BatchNorm2d
    assert model.bn_splits == 1
