"""Specification of moco_logits and InfoNCELoss against independent NumPy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslpipe.models.moco import InfoNCELoss, moco_logits


def _inputs(n: int = 5, k: int = 7, d: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    keys = torch.randn(n, d, generator=g, dtype=torch.float64)
    queue = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    return q, keys, queue


def test_logits_have_one_positive_plus_one_column_per_queued_key() -> None:
    q, k, queue = _inputs(n=5, k=7)
    logits, labels = moco_logits(q, k, queue, 0.2)
    assert logits.shape == (5, 8)
    assert labels.shape == (5,)


def test_labels_are_zeros_because_the_positive_is_column_zero() -> None:
    q, k, queue = _inputs()
    _, labels = moco_logits(q, k, queue, 0.2)
    assert labels.dtype == torch.long
    assert torch.equal(labels, torch.zeros(5, dtype=torch.long))


def test_column_zero_is_the_query_key_similarity_and_the_rest_the_queue_similarities() -> None:
    q, k, queue = _inputs()
    temperature = 0.5
    logits, _ = moco_logits(q, k, queue, temperature)
    qn = q / q.norm(dim=1, keepdim=True)
    kn = k / k.norm(dim=1, keepdim=True)
    torch.testing.assert_close(logits[:, 0], torch.einsum("nc,nc->n", qn, kn) / temperature)
    torch.testing.assert_close(logits[:, 1:], torch.einsum("nc,kc->nk", qn, queue) / temperature)


def test_queries_and_keys_are_normalised_so_their_scale_does_not_matter() -> None:
    q, k, queue = _inputs()
    logits, _ = moco_logits(q, k, queue, 0.2)
    scaled, _ = moco_logits(10.0 * q, 0.1 * k, queue, 0.2)
    torch.testing.assert_close(logits, scaled)


def test_infonce_equals_an_independent_numpy_log_softmax() -> None:
    q, k, queue = _inputs(n=6, k=9, d=5)
    temperature = 0.2
    qn = q.numpy() / np.linalg.norm(q.numpy(), axis=1, keepdims=True)
    kn = k.numpy() / np.linalg.norm(k.numpy(), axis=1, keepdims=True)
    pos = np.sum(qn * kn, axis=1, keepdims=True)
    neg = qn @ queue.numpy().T
    z = np.concatenate([pos, neg], axis=1) / temperature
    log_softmax = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
    expected = -np.mean(log_softmax[:, 0])

    loss = InfoNCELoss(temperature=temperature)(q, k, queue)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_default_temperature_is_moco_v2s() -> None:
    assert InfoNCELoss().temperature == 0.2


def test_loss_is_lower_when_the_key_matches_the_query() -> None:
    q, k, queue = _inputs()
    criterion = InfoNCELoss()
    assert criterion(q, q, queue) < criterion(q, k, queue)


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan")])
def test_non_positive_temperature_is_rejected(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=temperature)


def test_mismatched_key_shape_is_rejected_with_both_shapes() -> None:
    q, _, queue = _inputs(n=5, d=4)
    with pytest.raises(ValueError, match=r"k must have the shape of q \(5, 4\), got \(3, 4\)"):
        moco_logits(q, torch.randn(3, 4, dtype=torch.float64), queue, 0.2)


def test_queue_of_the_wrong_width_is_rejected() -> None:
    q, k, _ = _inputs(d=4)
    with pytest.raises(ValueError, match=r"queue must have shape \(K, 4\)"):
        moco_logits(q, k, torch.randn(7, 3, dtype=torch.float64), 0.2)


def test_masked_negatives_take_no_part_in_the_loss() -> None:
    torch.manual_seed(0)
    q, k, queue = torch.randn(3, 8), torch.randn(3, 8), F.normalize(torch.randn(5, 8), dim=1)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[2, 4] = True
    masked = InfoNCELoss(temperature=0.2)(q, k, queue, mask)
    rows = [
        InfoNCELoss(temperature=0.2)(q[i : i + 1], k[i : i + 1], queue[~mask[i]]) for i in range(3)
    ]
    torch.testing.assert_close(masked, torch.stack(rows).mean())


def test_a_query_with_every_negative_masked_has_zero_loss() -> None:
    q, k, queue = torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4)
    loss = InfoNCELoss()(q, k, queue, torch.ones(1, 3, dtype=torch.bool))
    assert float(loss) == 0.0


def test_a_mask_of_the_wrong_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"mask must be bool of shape \(N, 3\)"):
        moco_logits(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4), 0.2, torch.ones(2, 4))
