"""MoCo v2: query encoder, momentum key encoder and queue of negatives.

References:
    He et al., 2020, "Momentum Contrast for Unsupervised Visual Representation Learning".
    Chen et al., 2020, "Improved Baselines with Momentum Contrastive Learning" (MoCo v2).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sslpipe.models.moco.checks import check_positive_int
from sslpipe.models.moco.ddp import (
    BN_MODES,
    BatchNormMode,
    convert_sync_batchnorm,
    shuffled_key_batch,
    unshuffled_global_keys,
)
from sslpipe.models.moco.heads import ProjectionHead
from sslpipe.models.moco.loss import InfoNCELoss
from sslpipe.models.moco.queue import KeyQueue
from sslpipe.models.moco.split_bn import convert_split_batchnorm, set_splits, shuffled_order
from sslpipe.models.training import distributed


def _check_momentum(m: float, where: str) -> None:
    if isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m):
        raise ValueError(f"{where}: momentum must be a float in [0, 1], got {m!r}.")
    if not 0.0 <= m <= 1.0:
        raise ValueError(
            f"{where}: momentum must be in [0, 1], got {m}. MoCo uses 0.999 on ImageNet; "
            "0.99 suits small datasets with fewer steps per epoch."
        )


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
    """Exponential moving average of parameters: ``theta_ema <- m * theta_ema + (1 - m) * theta``.

    Only parameters are averaged. Buffers such as BatchNorm running statistics are left alone:
    the key encoder keeps its own, computed from the batches it sees, as in the original MoCo.

    Args:
        model: Source module (the query encoder).
        model_ema: Target module (the key encoder), with the same parameter structure.
        m: Momentum in [0, 1]; 1 leaves ``model_ema`` unchanged, 0 copies ``model``.
    """
    _check_momentum(m, "update_momentum")
    params: list[Tensor] = [p.detach() for p in model.parameters()]
    ema_params: list[Tensor] = list(model_ema.parameters())
    if len(params) != len(ema_params):
        raise ValueError(
            f"update_momentum: model has {len(params)} parameter tensors but model_ema has "
            f"{len(ema_params)}; model_ema must be a copy of model (e.g. copy.deepcopy)."
        )
    for i, (p, p_ema) in enumerate(zip(params, ema_params, strict=True)):
        if p.shape != p_ema.shape:
            raise ValueError(
                f"update_momentum: parameter {i} has shape {tuple(p.shape)} in model but "
                f"{tuple(p_ema.shape)} in model_ema; the two modules must have the same "
                "architecture."
            )
    if not params:
        return
    # Fused multi-tensor ops: one kernel launch per op instead of one per parameter tensor.
    torch._foreach_mul_(ema_params, m)
    torch._foreach_add_(ema_params, params, alpha=1.0 - m)


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for an image batch laid out that way, else the default layout."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class _QueryEncoder(nn.Module):
    """Backbone + head as one module, the unit that DistributedDataParallel wraps."""

    def __init__(self, backbone: nn.Module, projection_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = projection_head

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.projection_head(self.backbone(x)), dim=1)


class MoCo(nn.Module):
    """MoCo v2 pre-training model; ``forward`` returns the loss of one step.

    The query encoder is ``backbone`` followed by a :class:`ProjectionHead`; the key encoder is
    a copy of it that is never trained by gradients, only moved towards the query encoder by
    :func:`update_momentum`. Negatives come from a :class:`KeyQueue` of past keys.

    Defaults follow common small-data practice rather than the ImageNet recipe (queue 65536,
    momentum 0.999): a queue of 4096 keys stays a small fraction of a catalog of tens of
    thousands of images, and momentum 0.99 lets the key encoder keep up when an epoch has few
    steps. Temperature 0.2 and the 2048-128 head are MoCo v2's.

    Args:
        backbone: Feature extractor, (N, 3, H, W) -> (N, feature_dim); see ``build_backbone``.
        feature_dim: Width of the backbone output.
        projection_hidden_dim: Hidden width of the projection head (2048 in MoCo v2).
        projection_dim: Width of the embeddings compared by the loss (128 in MoCo v2).
        queue_size: Number K of negative keys.
        key_momentum: Momentum m of the key encoder update, in [0, 1].
        temperature: Temperature of the InfoNCE loss.
        bn: How batch normalisation is kept from leaking the positive pair (see
            :mod:`sslpipe.models.moco.ddp`): ``"shuffle"`` (shuffle-BN, the MoCo paper's),
              ``"sync"``
            (SyncBatchNorm, several processes only) or ``"none"``. In one process, shuffle-BN
            is emulated with ``bn_splits`` groups (:mod:`sslpipe.models.moco.split_bn`).
        bn_splits: With ``bn="shuffle"`` in one process: the number of groups each batch is
            normalised in, the key batch shuffled across them; 1 turns the emulation off.

    Multi-process training: after moving the model to its device, call :meth:`distribute`
    in every process. The query encoder is then wrapped in DistributedDataParallel, and the
    keys of every process are all-gathered before they are enqueued, so all processes hold the
    same queue, which receives the global batch at every step.

    Attributes:
        backbone: Query backbone, the network exported after pre-training.
        projection_head: Query projection head.
        key_backbone, key_projection_head: Momentum copies; ``requires_grad`` is False.
        queue: Negative keys, (queue_size, projection_dim).
        criterion: The InfoNCE loss.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        queue_size: int = 4096,
        key_momentum: float = 0.99,
        temperature: float = 0.2,
        bn: BatchNormMode = "shuffle",
        bn_splits: int = 1,
    ) -> None:
        super().__init__()
        if bn not in BN_MODES:
            raise ValueError(
                f"MoCo: bn must be one of {', '.join(BN_MODES)}, got {bn!r}. 'shuffle' is the "
                "MoCo paper's shuffle-BN, 'sync' SyncBatchNorm."
            )
        check_positive_int(feature_dim, "MoCo: feature_dim")
        check_positive_int(projection_hidden_dim, "MoCo: projection_hidden_dim")
        check_positive_int(projection_dim, "MoCo: projection_dim")
        check_positive_int(queue_size, "MoCo: queue_size")
        check_positive_int(bn_splits, "MoCo: bn_splits")
        _check_momentum(key_momentum, "MoCo key_momentum")
        self.feature_dim = feature_dim
        self.key_momentum = float(key_momentum)
        self.bn: BatchNormMode = bn
        self.bn_splits = bn_splits if bn == "shuffle" else 1
        if self.bn_splits > 1:
            backbone = convert_split_batchnorm(backbone, self.bn_splits)

        self.backbone = backbone
        self.projection_head = ProjectionHead(
            feature_dim, hidden_dim=projection_hidden_dim, output_dim=projection_dim
        )
        # The key encoder starts as an exact copy (MoCo Alg. 1: "f_k.params = f_q.params").
        self.key_backbone = copy.deepcopy(backbone)
        self.key_projection_head = copy.deepcopy(self.projection_head)
        for p in self._key_parameters():
            p.requires_grad_(False)

        self.queue = KeyQueue(queue_size, projection_dim)
        self.criterion = InfoNCELoss(temperature=temperature)
        # Not a registered submodule: it shares the query encoder's parameters, and the
        # state_dict must keep the same keys whether or not the model is distributed.
        self._ddp: DistributedDataParallel | None = None

    @property
    def is_distributed(self) -> bool:
        """True after :meth:`distribute` in a process group of more than one process."""
        return self._ddp is not None

    def distribute(self, *, device_ids: list[int] | None = None) -> None:
        """Prepare to train in every process of the running ``torch.distributed`` group.

        Call it in every process, after the model is on its device and after a checkpoint was
        loaded. It applies ``bn="sync"`` (converting the BN layers of both encoders), makes
        rank 0's parameters, buffers and queue everyone's, and wraps the query encoder in
        DistributedDataParallel (``device_ids``: this process's GPU, None on CPU). Without a
        process group, or in a group of one, it does nothing.
        """
        if distributed.world_size() == 1:
            return
        if self._ddp is not None:
            raise RuntimeError("MoCo.distribute: the model is already distributed.")
        # Across processes shuffle-BN is real: each process normalises its own share whole.
        self.bn_splits = 1
        set_splits(self, 1)
        if self.bn == "sync":
            self.backbone = convert_sync_batchnorm(self.backbone)
            self.key_backbone = convert_sync_batchnorm(self.key_backbone)
            for head in (self.projection_head, self.key_projection_head):
                convert_sync_batchnorm(head)  # in place; MoCo v2's head has no BN anyway
        distributed.broadcast_(list(self.state_dict().values()), src=0)
        ddp = DistributedDataParallel(
            _QueryEncoder(self.backbone, self.projection_head), device_ids=device_ids
        )
        ddp.train(self.training)
        object.__setattr__(self, "_ddp", ddp)  # bypass nn.Module's submodule registration

    def train(self, mode: bool = True) -> MoCo:
        """Set the mode of the model (and of its DistributedDataParallel wrapper)."""
        super().train(mode)
        if self._ddp is not None:
            self._ddp.train(mode)
        return self

    def _key_parameters(self) -> list[nn.Parameter]:
        return [*self.key_backbone.parameters(), *self.key_projection_head.parameters()]

    def query_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the optimizer (query backbone and head, not the key copy)."""
        return [*self.backbone.parameters(), *self.projection_head.parameters()]

    def embed(self, x: Tensor) -> Tensor:
        """Backbone features of shape (N, feature_dim) for images of shape (N, 3, H, W).

        Runs in the module's current mode and does not disable autograd: call ``model.eval()``
        and wrap in ``torch.no_grad()`` to extract embeddings.
        """
        features: Tensor = self.backbone(x)
        return features

    def encode_queries(self, x_query: Tensor) -> Tensor:
        """L2-normalised query embeddings (N, projection_dim); gradients flow.

        When distributed and training, through DistributedDataParallel (gradients are averaged
        over the processes); in eval mode directly, so that one process alone may evaluate.
        """
        if self._ddp is not None and self.training:
            out: Tensor = self._ddp(x_query)
            return out
        return F.normalize(self.projection_head(self.backbone(x_query)), dim=1)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Move the key encoder towards the query encoder by ``key_momentum``."""
        update_momentum(self.backbone, self.key_backbone, self.key_momentum)
        update_momentum(self.projection_head, self.key_projection_head, self.key_momentum)

    @torch.no_grad()
    def encode_keys(self, x_key: Tensor) -> Tensor:
        """L2-normalised key embeddings (N, projection_dim), without gradients.

        The key encoder runs in the same mode as the model, so during training its BatchNorm
        layers use batch statistics, as in the original implementation.
        """
        return F.normalize(self.key_projection_head(self.key_backbone(x_key)), dim=1)

    def forward(self, x_query: Tensor, x_key: Tensor, ids: Tensor | None = None) -> Tensor:
        """Loss of one MoCo step on two augmented views of the same N images.

        In training mode the key encoder is first moved towards the query encoder and the keys
        of this batch are enqueued after the loss is computed, so a query's own positive key is
        never among its negatives. In eval mode neither happens, so a validation pass leaves the
        model state untouched. Queue slots never written, and keys of the same image from
        earlier steps (when ``ids`` are given), are left out of the negatives
        (:meth:`KeyQueue.negatives_mask`).

        Args:
            x_query: (N, 3, H, W) first views.
            x_key: (N, 3, H, W) second views, row i from the same image as ``x_query[i]``.
            ids: (N,) ids (>= 0) of the images, the same in every process for the same image;
                without them an image's earlier keys stay among its negatives.

        Returns:
            Scalar loss tensor.
        """
        if x_query.shape[0] != x_key.shape[0]:
            raise ValueError(
                f"MoCo.forward: x_query has {x_query.shape[0]} images but x_key has "
                f"{x_key.shape[0]}; pass two views of the same batch."
            )
        if ids is not None and ids.shape != (x_query.shape[0],):
            raise ValueError(
                f"MoCo.forward: ids must have shape ({x_query.shape[0]},), one per image, got "
                f"{tuple(ids.shape)}."
            )
        q = self.encode_queries(x_query)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            k, k_global = self._keys(x_key)
            ids_global = self._global_ids(ids)
        # Snapshots: enqueue below writes into the buffers in place.
        negatives = self.queue.keys.clone().detach()
        mask = self.queue.negatives_mask(ids)
        loss: Tensor = self.criterion(q, k, negatives, mask)
        if self.training:
            self.queue.enqueue(k_global, ids_global)
        return loss

    @torch.no_grad()
    def _global_ids(self, ids: Tensor | None) -> Tensor | None:
        """The ids of the global batch in rank order (those of ``ids`` in one process)."""
        if ids is None or self._ddp is None or not self.training:
            return ids
        return distributed.all_gather(ids.to(self.queue.ids.device))

    @torch.no_grad()
    def _split_shuffled_keys(self, x_key: Tensor) -> Tensor:
        """Keys of one process, encoded shuffled across the split-BN groups when emulating
        shuffle-BN, so that no key shares its query's normalisation group by construction."""
        if self.bn_splits == 1:
            return self.encode_keys(x_key)
        shuffle, unshuffle = shuffled_order(x_key.shape[0], x_key.device)
        x_shuffled = x_key[shuffle].contiguous(memory_format=_memory_format(x_key))
        return self.encode_keys(x_shuffled)[unshuffle]

    @torch.no_grad()
    def _keys(self, x_key: Tensor) -> tuple[Tensor, Tensor]:
        """(this process's keys, the global batch's keys in rank order) of one step.

        In one process, or in eval mode, both are the keys of ``x_key``. Distributed, the keys
        of every process are gathered (after shuffle-BN when ``bn="shuffle"``) so that every
        process enqueues the same global batch and the queues stay identical.
        """
        if self._ddp is None or not self.training:
            k = self._split_shuffled_keys(x_key) if self.training else self.encode_keys(x_key)
            return k, k
        if self.bn == "shuffle":
            x_shuffled, unshuffle = shuffled_key_batch(x_key)
            x_shuffled = x_shuffled.contiguous(memory_format=_memory_format(x_key))
            k_global = unshuffled_global_keys(self.encode_keys(x_shuffled), unshuffle)
        else:
            k_global = distributed.all_gather(self.encode_keys(x_key))
        if self.queue.size % k_global.shape[0]:
            raise ValueError(
                f"MoCo: queue_size {self.queue.size} is not a multiple of the global batch "
                f"{k_global.shape[0]} ({x_key.shape[0]} images x {distributed.world_size()} "
                "processes); every process must enqueue whole global batches. Choose a "
                "queue_size that is a multiple of batch_size x processes."
            )
        n, rank = x_key.shape[0], distributed.rank()
        return k_global[rank * n : (rank + 1) * n], k_global
