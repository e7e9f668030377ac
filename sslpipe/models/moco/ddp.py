"""What MoCo needs beyond plain DistributedDataParallel: shuffle-BN and synchronised BN.

Batch normalisation lets a contrastive model cheat: when a query and its positive key are
normalised with statistics of the same few images, the network can recognise the pair from
the statistics instead of from the content (He et al., 2020, Sec. 3.3, "Shuffling BN"). Two
remedies, chosen by ``MoCo(bn=...)``:

* ``"shuffle"`` (MoCo): the key batch is shuffled across processes before the key encoder and
  unshuffled after, so a key is normalised with other processes' images than its query is.
* ``"sync"`` (SimCLR, MoCo v3): BN statistics are computed over the global batch in every
  process, leaving no per-process statistic to exploit.

Both are meaningful only with more than one process; in one they change nothing. On CUDA
``"sync"`` uses :class:`torch.nn.SyncBatchNorm`; PyTorch's class (and DistributedDataParallel
around it) refuses CPU modules, so on CPU (Gloo) :class:`CPUSyncBatchNorm` takes its place.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sslpipe.models.training import distributed

BatchNormMode = Literal["shuffle", "sync", "none"]
BN_MODES: tuple[BatchNormMode, ...] = ("shuffle", "sync", "none")
"""``MoCo(bn=...)``: shuffle-BN (the MoCo paper's default), SyncBatchNorm, or nothing."""


@torch.no_grad()
def shuffled_key_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """This process's share of the global batch after a random permutation shared by all.

    Returns ``(x_shuffled, unshuffle)``: ``x_shuffled`` has ``x``'s shape but holds images from
    every process; ``unshuffle`` is the inverse permutation of the global batch, for
    :func:`unshuffled_global_keys`. Rank 0 draws the permutation and broadcasts it.
    """
    x_all = distributed.all_gather(x)
    world, rank = distributed.world_size(), distributed.rank()
    permutation = torch.randperm(x_all.shape[0], device=x.device)
    distributed.broadcast_([permutation], src=0)
    unshuffle = torch.argsort(permutation)
    mine = permutation.view(world, -1)[rank]
    return x_all[mine], unshuffle


@torch.no_grad()
def unshuffled_global_keys(k: Tensor, unshuffle: Tensor) -> Tensor:
    """Every process's keys of a shuffled batch, back in the global batch's original order.

    The result is what every process enqueues; rows ``rank * n : (rank + 1) * n`` are the keys
    of this process's own images (``n`` images per process).
    """
    return distributed.all_gather(k)[unshuffle]


class CPUSyncBatchNorm(_BatchNorm):
    """Batch normalisation with statistics over every process's batch, for CPU training.

    The CPU counterpart of :class:`torch.nn.SyncBatchNorm` (which only runs on GPUs): in
    training mode inside a process group, the mean and variance come from two differentiable
    all-reduces (sum and count, then the squared deviations, more accurate than a sum of
    squares), so gradients flow through the statistics as in PyTorch's CUDA kernel; the
    running statistics are updated with the global ones. Otherwise it is plain BatchNorm.
    Same parameters and buffers as the BatchNorm layer it replaces, for any input of at least
    two dimensions.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if self.training and distributed.world_size() > 1:
            return self._sync_forward(input)
        out: Tensor = super().forward(input)
        return out

    def _sync_forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)

        local_count = x.new_full((1,), x.numel() // channels)
        reduced = distributed.all_reduce_sum(torch.cat([x.sum(dims), local_count]))
        count = reduced[-1].detach()
        mean = reduced[:channels] / count
        centred = x - mean.view(shape)
        var = distributed.all_reduce_sum((centred * centred).sum(dims)) / count  # biased
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None and self.bias is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)

        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else float(self.momentum)
                )
                unbiased = var.detach() * count / torch.clamp(count - 1, min=1)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``module`` with every BatchNorm layer synchronised across processes.

    On CUDA (``device``, default: where ``module``'s parameters are) the layers become
    :class:`torch.nn.SyncBatchNorm`, elsewhere :class:`CPUSyncBatchNorm`. As with
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, the new layers take over the old
    ones' parameter and buffer objects, so an optimizer built before the conversion keeps
    training them and the ``state_dict`` keys are unchanged. Converts in place where it can;
    use the returned module.
    """
    if device is None:
        first = next(module.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    if device.type != "cpu":
        converted_gpu: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return converted_gpu
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        converted = CPUSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _convert_cpu(child))
    return converted


__all__ = [
    "BN_MODES",
    "BatchNormMode",
    "CPUSyncBatchNorm",
    "convert_sync_batchnorm",
    "shuffled_key_batch",
    "unshuffled_global_keys",
]
