"""Weighted k-nearest-neighbour classifier on embeddings, used to monitor pre-training.

The vote is the one of Wu et al., 2018 (InstDisc, Eq. 7), also used by the kNN monitor of
the MoCo CIFAR-10 demo: each of the k nearest training samples (cosine similarity s) votes for
its label with weight exp(s / T).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_features(x: Tensor, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (num_samples, dim), got {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got dtype {x.dtype}.")


def _check_labels(labels: Tensor, features: Tensor, name: str, features_name: str) -> None:
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name} must have shape ({features.shape[0]},), one label per row of "
            f"{features_name}, got {tuple(labels.shape)}."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {labels.dtype}.")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{name} must be class indices >= 0, got min {int(labels.min())}.")


def _check_options(k: int, temperature: float, chunk_size: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    if not isinstance(temperature, int | float) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite float, got {temperature!r}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; 0.07 is usual.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")


def _vote(
    similarities: Tensor, neighbour_labels: Tensor, num_classes: int, temperature: float
) -> Tensor:
    """Predicted labels (M,) from top-k similarities (M, k) and their labels (M, k)."""
    weights = (similarities / temperature).exp()
    scores = torch.zeros(
        similarities.shape[0], num_classes, dtype=weights.dtype, device=weights.device
    )
    scores.scatter_add_(1, neighbour_labels, weights)
    return scores.argmax(dim=1)


def _predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    *,
    k: int,
    num_classes: int,
    temperature: float,
    chunk_size: int,
    exclude_self: bool,
) -> Tensor:
    train = F.normalize(train_features, dim=1)
    query = F.normalize(query_features.to(train.device, train.dtype), dim=1)
    labels = train_labels.to(train.device, torch.long)
    available = train.shape[0] - (1 if exclude_self else 0)
    k = min(k, available)
    predictions = []
    # Chunks bound the (chunk, N) similarity matrix, so large catalogs fit in memory.
    for start in range(0, query.shape[0], chunk_size):
        sim = query[start : start + chunk_size] @ train.T
        if exclude_self:
            # Row i of the chunk is sample start+i; -inf can never be among the top k <= N-1.
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = -math.inf
        top_sim, top_idx = sim.topk(k, dim=1)
        predictions.append(_vote(top_sim, labels[top_idx], num_classes, temperature))
    if not predictions:
        return torch.empty(0, dtype=torch.long, device=train.device)
    return torch.cat(predictions)


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    *,
    k: int = 20,
    num_classes: int,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Predict labels of ``query_features`` by a similarity-weighted vote of their k neighbours.

    Args:
        train_features: (N, D) reference embeddings (normalised here).
        train_labels: (N,) integer labels in [0, num_classes).
        query_features: (M, D) embeddings to classify (normalised here).
        k: Number of neighbours; 20 as in the MoCo CIFAR demo (200 in InstDisc). Clamped to N.
        num_classes: Number of classes C.
        temperature: T of the vote weight exp(similarity / T); 0.07 as in InstDisc.
        chunk_size: Queries processed at once, to bound memory.

    Returns:
        (M,) long tensor of predicted labels.
    """
    _check_features(train_features, "train_features")
    _check_features(query_features, "query_features")
    _check_labels(train_labels, train_features, "train_labels", "train_features")
    _check_options(k, temperature, chunk_size)
    if query_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"query_features has dim {query_features.shape[1]} but train_features has dim "
            f"{train_features.shape[1]}; embed both with the same model."
        )
    if train_features.shape[0] == 0:
        raise ValueError("train_features is empty; at least one reference sample is needed.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if int(train_labels.max()) >= num_classes:
        raise ValueError(
            f"train_labels contains {int(train_labels.max())} but num_classes={num_classes}; "
            "labels must lie in [0, num_classes)."
        )
    return _predict(
        train_features,
        train_labels,
        query_features,
        k=k,
        num_classes=num_classes,
        temperature=temperature,
        chunk_size=chunk_size,
        exclude_self=False,
    )


@torch.no_grad()
def knn_top1(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predict` on a labelled test set.

    Args:
        train_features: (N, D); train_labels: (N,); test_features: (M, D); test_labels: (M,).
    """
    _check_features(test_features, "test_features")
    _check_labels(test_labels, test_features, "test_labels", "test_features")
    if test_features.shape[0] == 0:
        raise ValueError("test_features is empty; accuracy is undefined without test samples.")
    _check_labels(train_labels, train_features, "train_labels", "train_features")
    num_classes = 1 + max(int(train_labels.max()), int(test_labels.max()))
    predictions = knn_predict(
        train_features,
        train_labels,
        test_features,
        k=k,
        num_classes=num_classes,
        temperature=temperature,
    )
    correct = predictions == test_labels.to(predictions.device, torch.long)
    return float(correct.float().mean())


@torch.no_grad()
def leave_one_out_knn_top1(
    features: Tensor,
    labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of predicting each sample from all the others.

    Useful when a catalog has no separate labelled split: a sample is never its own neighbour
    (which would make the accuracy trivially high for small k).

    Args:
        features: (N, D) embeddings, N >= 2.
        labels: (N,) integer labels.
        k: Number of neighbours, clamped to N - 1.
        temperature: T of the vote weight exp(similarity / T).
        chunk_size: Samples processed at once, to bound memory.
    """
    _check_features(features, "features")
    _check_labels(labels, features, "labels", "features")
    _check_options(k, temperature, chunk_size)
    if features.shape[0] < 2:
        raise ValueError(
            f"leave_one_out_knn_top1 needs at least 2 samples, got {features.shape[0]}."
        )
    predictions = _predict(
        features,
        labels,
        features,
        k=k,
        num_classes=1 + int(labels.max()),
        temperature=temperature,
        chunk_size=chunk_size,
        exclude_self=True,
    )
    correct = predictions == labels.to(predictions.device, torch.long)
    return float(correct.float().mean())
