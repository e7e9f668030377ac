"""Shuffle-BN in one process: batch normalisation over groups of the batch (split BN).

MoCo's shuffle-BN (He et al., 2020, Sec. 3.3) needs several processes: each normalises its own
share of the batch, and the keys are shuffled across processes so that a key is normalised with
other images than its query. In one process (one GPU, or the CPU) every BatchNorm layer would
see the whole batch, queries and keys alike with the statistics of the same images, and the
network could match a query to its key through those statistics instead of through the content.
The official MoCo CIFAR-10 demo emulates several processes with a split BatchNorm: the batch is
cut into groups that are normalised separately, and the key batch is shuffled before the key
encoder (:func:`shuffled_order`), so a key lands in another group than its query.

:class:`SplitBatchNorm2d` has the parameters and buffers of the BatchNorm2d it replaces (the
``state_dict`` keys do not change, and an exported backbone loads into a plain ResNet); in eval
mode it is plain BatchNorm with the running statistics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over ``splits`` contiguous groups.

    A batch whose size ``splits`` does not divide is split into ``gcd(size, splits)`` groups.
    The running statistics move towards the mean over the groups of their statistics.
    """

    def __init__(self, num_features: int, splits: int, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.splits = splits

    def forward(self, input: Tensor) -> Tensor:
        groups = math.gcd(int(input.shape[0]), self.splits)
        if not self.training or groups <= 1:
            out: Tensor = super().forward(input)
            return out
        return self._split_forward(input, groups)

    def _split_forward(self, x: Tensor, groups: int) -> Tensor:
        n, c, h, w = x.shape
        # Splitting the batch dimension is a view whatever the memory format.
        grouped = x.view(groups, n // groups, c, h, w)
        var, mean = torch.var_mean(grouped, dim=(1, 3, 4), keepdim=True, correction=0)
        out = (grouped - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.view(1, 1, c, 1, 1) + self.bias.view(1, 1, c, 1, 1)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean, var, count=(n // groups) * h * w)
        return out.view(n, c, h, w)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / max(1, count - 1))
        self.running_mean.mul_(1 - factor).add_(mean.flatten(1).mean(0), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.flatten(1).mean(0), alpha=factor)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, splits={self.splits}"


def convert_split_batchnorm(module: nn.Module, splits: int) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by a :class:`SplitBatchNorm2d`.

    The new layers take over the old ones' parameter and buffer objects, so the ``state_dict``
    is unchanged. Converts in place where it can; use the returned module.
    """
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"convert_split_batchnorm: splits must be an int >= 1, got {splits!r}")
    converted = module
    if type(module) is nn.BatchNorm2d:
        converted = SplitBatchNorm2d(
            module.num_features,
            splits,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_split_batchnorm(child, splits))
    return converted


def set_splits(module: nn.Module, splits: int) -> None:
    """Set the number of groups of every :class:`SplitBatchNorm2d` in ``module``."""
    for layer in module.modules():
        if isinstance(layer, SplitBatchNorm2d):
            layer.splits = splits


def auto_splits(batch_size: int, group_size: int = 32) -> int:
    """BN groups for a batch: about ``group_size`` images each (the per-GPU batch of MoCo on
    ImageNet), at least 2 so that a shuffled key can leave its query's group, and a divisor of
    ``batch_size``."""
    splits = max(2, batch_size // group_size)
    while splits > 1 and batch_size % splits:
        splits -= 1
    return splits


@torch.no_grad()
def shuffled_order(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """A random permutation of ``n`` and its inverse, drawn on the CPU generator (so that a
    seeded run is reproducible on any device)."""
    permutation = torch.randperm(n)
    return permutation.to(device), torch.argsort(permutation).to(device)


__all__ = [
    "SplitBatchNorm2d",
    "auto_splits",
    "convert_split_batchnorm",
    "set_splits",
    "shuffled_order",
]
