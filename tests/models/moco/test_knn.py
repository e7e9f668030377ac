"""Specification of the weighted kNN monitor."""

from __future__ import annotations

import math

import pytest
import torch

from sslpipe.models.moco import knn_predict, knn_top1, leave_one_out_knn_top1


def _clusters(per_class: int, num_classes: int = 3, dim: int = 8, seed: int = 0):
    """Tight clusters around orthogonal directions: trivially separable by cosine."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(dim)[:num_classes] * 10
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centers[labels] + 0.5 * torch.randn(len(labels), dim, generator=g)
    return features, labels


def _angles(*degrees: float) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_well_separated_clusters_are_classified_perfectly() -> None:
    train, train_labels = _clusters(20, seed=0)
    test, test_labels = _clusters(10, seed=1)
    assert knn_top1(train, train_labels, test, test_labels, k=5) == 1.0


def test_predictions_have_one_label_per_query() -> None:
    train, labels = _clusters(5)
    predictions = knn_predict(train, labels, train[:4], k=3, num_classes=3)
    assert predictions.shape == (4,)
    assert predictions.dtype == torch.long


def test_similar_neighbours_outvote_a_larger_number_of_dissimilar_ones() -> None:
    # One very close neighbour of class 1 against two far ones of class 0; with exp(sim / T)
    # weights at a small temperature the close one wins, whereas a plain majority would not.
    train = _angles(5, 80, 85)
    labels = torch.tensor([1, 0, 0])
    query = _angles(0)
    assert knn_predict(train, labels, query, k=3, num_classes=2, temperature=0.07).item() == 1
    assert knn_predict(train, labels, query, k=3, num_classes=2, temperature=100.0).item() == 0


def test_k_larger_than_the_training_set_is_clamped() -> None:
    train, labels = _clusters(2)
    predictions = knn_predict(train, labels, train, k=1000, num_classes=3)
    assert predictions.shape == (6,)


def test_leave_one_out_never_uses_a_sample_as_its_own_neighbour() -> None:
    # On a circle: A (0 deg, class 0), B (10 deg, class 1), C (25 deg, class 1). With k=1 each
    # sample's nearest *other* sample is: A -> B (wrong), B -> A (wrong), C -> B (right).
    # If a sample could see itself, every prediction would be right.
    features = _angles(0, 10, 25)
    labels = torch.tensor([0, 1, 1])
    assert leave_one_out_knn_top1(features, labels, k=1) == pytest.approx(1 / 3)
    assert knn_top1(features, labels, features, labels, k=1) == 1.0


def test_leave_one_out_is_perfect_on_well_separated_clusters() -> None:
    features, labels = _clusters(10)
    assert leave_one_out_knn_top1(features, labels, k=5) == 1.0


def test_leave_one_out_clamps_k_to_the_other_samples() -> None:
    features = _angles(0, 10, 100)
    labels = torch.tensor([0, 0, 1])
    # k=50 becomes k=2: every other sample votes, weighted by similarity.
    assert leave_one_out_knn_top1(features, labels, k=50) == pytest.approx(2 / 3)


def test_chunked_prediction_matches_a_single_chunk() -> None:
    features, labels = _clusters(30, seed=3)
    query = torch.randn(50, 8, generator=torch.Generator().manual_seed(4))
    whole = knn_predict(features, labels, query, k=7, num_classes=3)
    chunked = knn_predict(features, labels, query, k=7, num_classes=3, chunk_size=7)
    assert torch.equal(whole, chunked)


def test_labels_that_do_not_match_the_features_are_rejected_by_argument_name() -> None:
    features, labels = _clusters(4)
    with pytest.raises(ValueError, match=r"train_labels must have shape \(12,\).*got \(11,\)"):
        knn_predict(features, labels[:-1], features, num_classes=3)
    with pytest.raises(ValueError, match=r"test_labels must have shape \(12,\)"):
        knn_top1(features, labels, features, labels[:-1])
    with pytest.raises(ValueError, match=r"labels must have shape \(12,\)"):
        leave_one_out_knn_top1(features, labels[:-1])


def test_feature_width_mismatch_is_rejected() -> None:
    features, labels = _clusters(4)
    with pytest.raises(ValueError, match="query_features has dim 5 but train_features has dim 8"):
        knn_predict(features, labels, torch.randn(2, 5), num_classes=3)


def test_labels_outside_num_classes_are_rejected() -> None:
    features, labels = _clusters(4)
    with pytest.raises(ValueError, match="num_classes=2"):
        knn_predict(features, labels, features, num_classes=2)
