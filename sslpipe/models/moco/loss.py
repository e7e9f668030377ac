"""InfoNCE loss with a queue of negatives, as in MoCo (He et al., 2020, Eq. 1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_temperature(temperature: float, where: str) -> None:
    if not isinstance(temperature, int | float) or not math.isfinite(temperature):
        raise ValueError(f"{where}: temperature must be a finite float, got {temperature!r}.")
    if temperature <= 0:
        raise ValueError(
            f"{where}: temperature must be > 0, got {temperature}. MoCo v2 uses 0.2, MoCo 0.07."
        )


def moco_logits(
    q: Tensor, k: Tensor, queue: Tensor, temperature: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Logits and targets of the (1+K)-way classification task of MoCo.

    Args:
        q: (N, D) queries. L2-normalised here, so raw projections may be passed.
        k: (N, D) positive keys, row i is the positive of ``q[i]``. L2-normalised here.
        queue: (K, D) negative keys, expected already L2-normalised (as :class:`KeyQueue`
            holds them); not normalised here because it is the same tensor for every step.
        temperature: Softmax temperature tau > 0.
        mask: Optional bool, (N, K) or (1, K): True where queue key j is not a negative of
            query i (see :meth:`KeyQueue.negatives_mask`); its logit becomes -inf, so it takes
            no part in the softmax. The positive is never masked.

    Returns:
        ``(logits, labels)``: logits (N, 1+K) whose column 0 is ``q_i . k_i / tau`` and columns
        1..K are ``q_i . queue_j / tau``; labels (N,) long zeros, since the positive is class 0.
    """
    _check_temperature(temperature, "moco_logits")
    if q.ndim != 2:
        raise ValueError(f"moco_logits: q must have shape (N, D), got {tuple(q.shape)}.")
    if k.shape != q.shape:
        raise ValueError(
            f"moco_logits: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}. "
            "Pass one positive key per query."
        )
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"moco_logits: queue must have shape (K, {q.shape[1]}), got {tuple(queue.shape)}. "
            "The queue width must equal the projection output width."
        )
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    positives = torch.einsum("nd,nd->n", q, k).unsqueeze(1)  # (N, 1)
    negatives = q @ queue.to(q.dtype).T  # (N, K)
    if mask is not None:
        if mask.dtype != torch.bool or mask.ndim != 2 or mask.shape[1] != queue.shape[0]:
            raise ValueError(
                f"moco_logits: mask must be bool of shape (N, {queue.shape[0]}) or "
                f"(1, {queue.shape[0]}), got {mask.dtype} {tuple(mask.shape)}."
            )
        negatives = negatives.masked_fill(mask, float("-inf"))
    logits = torch.cat([positives, negatives], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return logits, labels


class InfoNCELoss(nn.Module):
    """Contrastive loss of MoCo: cross-entropy of :func:`moco_logits` with target 0.

    Args:
        temperature: Softmax temperature; 0.2 in MoCo v2 (Chen et al., 2020), 0.07 in MoCo v1.

    Shapes:
        forward(q (N, D), k (N, D), queue (K, D)) -> scalar, the mean over the N queries.
    """

    def __init__(self, *, temperature: float = 0.2) -> None:
        super().__init__()
        _check_temperature(temperature, "InfoNCELoss")
        self.temperature = float(temperature)

    def forward(self, q: Tensor, k: Tensor, queue: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean InfoNCE loss of the queries ``q`` against keys ``k`` and the negatives of
        ``queue`` that ``mask`` leaves (all of them without a mask)."""
        logits, labels = moco_logits(q, k, queue, self.temperature, mask)
        return F.cross_entropy(logits, labels)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
