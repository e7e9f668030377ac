"""Specification of KeyQueue: a FIFO ring buffer of negative keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslpipe.models.moco import KeyQueue
from sslpipe.models.moco.queue import EMPTY


def _rows(start: int, count: int, dim: int = 3) -> torch.Tensor:
    """Rows whose values identify them: row i is filled with float(start + i)."""
    return torch.arange(start, start + count, dtype=torch.float32).unsqueeze(1).repeat(1, dim)


def test_new_queue_holds_unit_norm_random_keys_and_points_at_row_zero() -> None:
    torch.manual_seed(0)
    queue = KeyQueue(10, 4)
    assert queue.keys.shape == (10, 4)
    assert queue.size == 10
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(10))
    assert int(queue.ptr) == 0
    assert queue.ptr.dtype == torch.long


def test_initial_keys_are_deterministic_under_manual_seed() -> None:
    torch.manual_seed(123)
    a = KeyQueue(8, 4)
    torch.manual_seed(123)
    b = KeyQueue(8, 4)
    assert torch.equal(a.keys, b.keys)


def test_enqueue_writes_a_batch_at_the_pointer_and_advances_it() -> None:
    queue = KeyQueue(10, 3)
    before = queue.keys.clone()
    queue.enqueue(_rows(100, 4))
    assert torch.equal(queue.keys[:4], _rows(100, 4))
    assert torch.equal(queue.keys[4:], before[4:])
    assert int(queue.ptr) == 4


def test_a_batch_that_does_not_divide_the_size_wraps_around_to_the_start() -> None:
    queue = KeyQueue(10, 3)
    queue.enqueue(_rows(100, 4))  # rows 0..3, ptr -> 4
    queue.enqueue(_rows(200, 4))  # rows 4..7, ptr -> 8
    queue.enqueue(_rows(300, 4))  # rows 8, 9 then 0, 1: wraps, ptr -> 2
    expected = torch.cat([_rows(302, 2), _rows(102, 2), _rows(200, 4), _rows(300, 2)])
    assert torch.equal(queue.keys, expected)
    assert int(queue.ptr) == 2


def test_pointer_advances_modulo_the_size_over_many_batches() -> None:
    queue = KeyQueue(7, 3)
    for step in range(1, 20):
        queue.enqueue(_rows(0, 3))
        assert int(queue.ptr) == (3 * step) % 7


def test_a_batch_larger_than_the_queue_keeps_only_its_last_keys_like_sequential_writes() -> None:
    queue = KeyQueue(5, 3)
    queue.enqueue(_rows(0, 2))  # ptr -> 2
    queue.enqueue(_rows(100, 12))  # only rows 107..111 survive
    reference = KeyQueue(5, 3)
    reference.enqueue(_rows(0, 2))
    for i in range(12):
        reference.enqueue(_rows(100 + i, 1))
    assert torch.equal(queue.keys, reference.keys)
    assert int(queue.ptr) == int(reference.ptr) == (2 + 12) % 5
    assert set(queue.keys[:, 0].tolist()) == {107.0, 108.0, 109.0, 110.0, 111.0}


def test_enqueue_does_not_track_gradients() -> None:
    queue = KeyQueue(4, 3)
    keys = torch.randn(2, 3, requires_grad=True)
    queue.enqueue(keys)
    assert not queue.keys.requires_grad
    assert queue.keys.grad_fn is None


def test_enqueue_rejects_keys_of_the_wrong_width() -> None:
    queue = KeyQueue(4, 3)
    with pytest.raises(ValueError, match=r"shape \(B, 3\), got \(2, 5\)"):
        queue.enqueue(torch.randn(2, 5))


def test_keys_and_pointer_survive_a_state_dict_round_trip() -> None:
    queue = KeyQueue(6, 3)
    queue.enqueue(_rows(100, 4))
    state = queue.state_dict()
    assert set(state) == {"keys", "ptr", "ids"}
    restored = KeyQueue(6, 3)
    restored.load_state_dict(state)
    assert torch.equal(restored.keys, queue.keys)
    assert torch.equal(restored.ids, queue.ids)
    assert int(restored.ptr) == 4
    # The restored queue continues exactly where the original left off.
    queue.enqueue(_rows(200, 3))
    restored.enqueue(_rows(200, 3))
    assert torch.equal(restored.keys, queue.keys)
    assert int(restored.ptr) == int(queue.ptr) == 1


@pytest.mark.parametrize(("size", "dim"), [(0, 3), (4, 0), (-1, 3)])
def test_non_positive_size_or_dim_is_rejected(size: int, dim: int) -> None:
    with pytest.raises(ValueError, match="must be a positive int"):
        KeyQueue(size, dim)


# --- image ids and the negatives mask -----------------------------------------------------


def test_a_new_queue_has_no_real_keys_so_every_slot_is_masked_out_of_the_negatives() -> None:
    queue = KeyQueue(5, 3)
    assert queue.filled == 0
    assert queue.negatives_mask().tolist() == [[True] * 5]
    assert queue.negatives_mask(torch.tensor([7, 8])).all()


def test_enqueue_keeps_the_image_id_of_every_key_and_wraps_like_the_keys() -> None:
    queue = KeyQueue(5, 3)
    queue.enqueue(_rows(0, 3), torch.tensor([10, 11, 12]))
    queue.enqueue(_rows(3, 3), torch.tensor([13, 14, 15]))  # 3, 4 then wraps to 0
    assert queue.ids.tolist() == [15, 11, 12, 13, 14]
    assert queue.filled == 5


def test_a_querys_own_image_keys_and_empty_slots_are_masked_and_nothing_else() -> None:
    queue = KeyQueue(4, 3)
    queue.enqueue(_rows(0, 3), torch.tensor([10, 11, 10]))  # image 10 twice, slot 3 empty
    mask = queue.negatives_mask(torch.tensor([10, 11, 99]))
    assert mask.tolist() == [
        [True, False, True, True],
        [False, True, False, True],
        [False, False, False, True],
    ]


def test_keys_enqueued_without_ids_are_negatives_of_every_query() -> None:
    queue = KeyQueue(3, 3)
    queue.enqueue(_rows(0, 3))
    assert not queue.negatives_mask(torch.tensor([0, 1, 2])).any()


@pytest.mark.parametrize(
    "ids", [torch.tensor([1, 2]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, -1, 2])]
)
def test_ids_that_are_not_one_non_negative_integer_per_key_are_rejected(ids: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="3 image ids >= 0, one per key"):
        KeyQueue(4, 3).enqueue(_rows(0, 3), ids)


def test_a_loaded_queue_writes_where_the_saved_one_stopped() -> None:
    saved = KeyQueue(8, 2)
    saved.enqueue(F.normalize(torch.ones(5, 2), dim=1), torch.arange(5))
    restored = KeyQueue(8, 2)
    restored.load_state_dict(saved.state_dict())
    restored.enqueue(F.normalize(torch.ones(2, 2), dim=1), torch.tensor([10, 11]))
    assert restored.ids.tolist() == [0, 1, 2, 3, 4, 10, 11, EMPTY]
    assert int(restored.ptr) == 7
