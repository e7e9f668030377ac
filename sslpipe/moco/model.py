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

from sslpipe.moco.heads import ProjectionHead
from sslpipe.moco.loss import InfoNCELoss
from sslpipe.moco.queue import KeyQueue


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


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MoCo: {name} must be a positive int, got {value!r}.")


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
    ) -> None:
        super().__init__()
        _check_positive_int(feature_dim, "feature_dim")
        _check_positive_int(projection_hidden_dim, "projection_hidden_dim")
        _check_positive_int(projection_dim, "projection_dim")
        _check_positive_int(queue_size, "queue_size")
        _check_momentum(key_momentum, "MoCo key_momentum")
        self.feature_dim = feature_dim
        self.key_momentum = float(key_momentum)

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
        """L2-normalised query embeddings (N, projection_dim); gradients flow."""
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
        # A multi-GPU subclass overrides this to add shuffle-BN (shuffle the batch across
        # processes before the key encoder, unshuffle after, so BN statistics cannot leak which
        # key is the positive) and to all-gather the keys before they are enqueued.
        return F.normalize(self.key_projection_head(self.key_backbone(x_key)), dim=1)

    def forward(self, x_query: Tensor, x_key: Tensor) -> Tensor:
        """Loss of one MoCo step on two augmented views of the same N images.

        In training mode the key encoder is first moved towards the query encoder and the keys
        of this batch are enqueued after the loss is computed, so a query's own positive key is
        never among its negatives. In eval mode neither happens, so a validation pass leaves the
        model state untouched.

        Args:
            x_query: (N, 3, H, W) first views.
            x_key: (N, 3, H, W) second views, row i from the same image as ``x_query[i]``.

        Returns:
            Scalar loss tensor.
        """
        if x_query.shape[0] != x_key.shape[0]:
            raise ValueError(
                f"MoCo.forward: x_query has {x_query.shape[0]} images but x_key has "
                f"{x_key.shape[0]}; pass two views of the same batch."
            )
        q = self.encode_queries(x_query)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            k = self.encode_keys(x_key)
        # Snapshot of the negatives: enqueue below writes into the buffer in place.
        negatives = self.queue.keys.clone().detach()
        loss: Tensor = self.criterion(q, k, negatives)
        if self.training:
            self.queue.enqueue(k)
        return loss
