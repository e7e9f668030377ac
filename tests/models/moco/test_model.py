"""Specification of the MoCo model and the momentum update.

Most tests use a tiny conv net as backbone: they are about MoCo's logic, not about ResNets.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from sslpipe.models.moco import BackboneSpec, MoCo, build_backbone, update_momentum


def _tiny_backbone() -> nn.Module:
    """(N, 3, H, W) -> (N, 32); has BatchNorm, like the real backbones."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _tiny_moco(**kwargs: float) -> MoCo:
    options: dict = {"projection_hidden_dim": 64, "projection_dim": 16, "queue_size": 32}
    options.update(kwargs)
    return MoCo(_tiny_backbone(), 32, **options)


def _queue_of_other_images(model: MoCo) -> MoCo:
    """Mark every queue slot as a key of some other image, so that all are negatives."""
    model.queue.ids.copy_(torch.arange(model.queue.size) + 10_000)
    return model


def _query_params(model: MoCo) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.query_parameters()]


def _key_params(model: MoCo) -> list[torch.Tensor]:
    modules = (model.key_backbone, model.key_projection_head)
    return [p.detach().clone() for m in modules for p in m.parameters()]


# --- update_momentum ---------------------------------------------------------------------


def test_momentum_update_equals_an_independent_numpy_computation() -> None:
    torch.manual_seed(0)
    model, ema = nn.Linear(4, 3), nn.Linear(4, 3)
    m = 0.9
    expected = [
        m * p_ema.detach().numpy() + (1 - m) * p.detach().numpy()
        for p, p_ema in zip(model.parameters(), ema.parameters(), strict=True)
    ]
    update_momentum(model, ema, m)
    for p_ema, want in zip(ema.parameters(), expected, strict=True):
        np.testing.assert_allclose(p_ema.detach().numpy(), want, rtol=1e-6)


def test_momentum_one_leaves_the_key_encoder_unchanged() -> None:
    model, ema = nn.Linear(4, 3), nn.Linear(4, 3)
    before = copy.deepcopy(ema.state_dict())
    update_momentum(model, ema, 1.0)
    for name, value in ema.state_dict().items():
        assert torch.equal(value, before[name])


def test_momentum_zero_copies_the_query_encoder() -> None:
    model, ema = nn.Linear(4, 3), nn.Linear(4, 3)
    update_momentum(model, ema, 0.0)
    for p, p_ema in zip(model.parameters(), ema.parameters(), strict=True):
        assert torch.equal(p, p_ema)


def test_momentum_update_leaves_batchnorm_running_statistics_alone() -> None:
    model, ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    model.running_mean.fill_(5.0)
    update_momentum(model, ema, 0.0)
    assert torch.equal(ema.running_mean, torch.zeros(3))


@pytest.mark.parametrize("m", [-0.1, 1.1, float("nan")])
def test_momentum_outside_zero_one_is_rejected(m: float) -> None:
    with pytest.raises(ValueError, match="momentum must be"):
        update_momentum(nn.Linear(2, 2), nn.Linear(2, 2), m)


def test_modules_with_different_architectures_are_rejected() -> None:
    with pytest.raises(ValueError, match="same architecture"):
        update_momentum(nn.Linear(2, 2), nn.Linear(3, 2), 0.5)


# --- MoCo ---------------------------------------------------------------------------------


def test_key_encoder_starts_equal_to_the_query_encoder_and_has_no_gradients() -> None:
    model = _tiny_moco()
    for q, k in zip(_query_params(model), _key_params(model), strict=True):
        assert torch.equal(q, k)
    modules = (model.key_backbone, model.key_projection_head)
    assert all(not p.requires_grad for m in modules for p in m.parameters())
    assert all(p.requires_grad for p in model.query_parameters())
    # Separate tensors, not shared ones: training the query must not move the key directly.
    assert model.key_backbone[0].weight is not model.backbone[0].weight


def test_default_hyperparameters_follow_small_data_moco_v2_practice() -> None:
    model = MoCo(_tiny_backbone(), 32)
    assert model.queue.size == 4096
    assert model.queue.dim == 128
    assert model.key_momentum == 0.99
    assert model.criterion.temperature == 0.2
    assert model.projection_head.hidden_dim == 2048


def test_a_training_step_changes_the_query_encoder_and_moves_the_key_encoder_by_momentum() -> None:
    torch.manual_seed(0)
    model = _queue_of_other_images(_tiny_moco(key_momentum=0.9))
    # Make the encoders differ, so the momentum update is visible.
    with torch.no_grad():
        for p in model.query_parameters():
            p.add_(0.1 * torch.randn_like(p))
    query_before, key_before = _query_params(model), _key_params(model)
    optimizer = torch.optim.SGD(model.query_parameters(), lr=0.1)
    x = torch.rand(8, 3, 16, 16)

    loss = model(x + 0.05 * torch.randn_like(x), x + 0.05 * torch.randn_like(x))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    query_after, key_after = _query_params(model), _key_params(model)
    assert any(not torch.equal(a, b) for a, b in zip(query_before, query_after, strict=True))
    # The key encoder moved towards the query encoder as it was *before* the optimizer step.
    for k_new, k_old, q_old in zip(key_after, key_before, query_before, strict=True):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q_old)
    modules = (model.key_backbone, model.key_projection_head)
    assert all(p.grad is None for m in modules for p in m.parameters())


def test_the_queue_receives_the_normalised_keys_of_the_batch() -> None:
    torch.manual_seed(0)
    model = _tiny_moco()
    x_query, x_key = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    model(x_query, x_key)
    # The key encoder is not updated again by encode_keys, so it reproduces the batch's keys.
    keys = model.encode_keys(x_key)
    torch.testing.assert_close(model.queue.keys[:8], keys)
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(8))
    assert int(model.queue.ptr) == 8


def test_the_loss_uses_the_queue_as_it_was_before_the_batch_was_enqueued() -> None:
    torch.manual_seed(0)
    model = _queue_of_other_images(_tiny_moco(queue_size=8))
    x_query, x_key = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    negatives_before = model.queue.keys.clone()
    loss = model(x_query, x_key)
    # queue_size == batch size: after the step the queue holds exactly this batch's keys, so a
    # loss computed against it would include each positive among the negatives.
    keys = model.queue.keys.clone()
    queries = model.encode_queries(x_query)
    expected = model.criterion(queries, keys, negatives_before)
    leaky = model.criterion(queries, keys, keys)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, leaky)


def test_eval_mode_neither_moves_the_key_encoder_nor_fills_the_queue() -> None:
    torch.manual_seed(0)
    model = _tiny_moco(key_momentum=0.5)
    with torch.no_grad():
        for p in model.query_parameters():
            p.add_(1.0)
    key_before, queue_before = _key_params(model), model.queue.keys.clone()
    model.eval()
    with torch.no_grad():
        loss = model(torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16))
    assert loss.ndim == 0
    for a, b in zip(key_before, _key_params(model), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(model.queue.keys, queue_before)
    assert int(model.queue.ptr) == 0


def test_key_encoder_follows_the_model_into_train_mode() -> None:
    model = _tiny_moco()
    model.eval()
    model.train()
    assert model.key_backbone.training
    assert model.key_projection_head.training


def test_embed_returns_backbone_features() -> None:
    model = _tiny_moco()
    model.eval()
    with torch.no_grad():
        features = model.embed(torch.rand(3, 3, 16, 16))
    assert features.shape == (3, 32)


def test_the_loss_falls_on_a_tiny_dataset_within_a_few_dozen_steps() -> None:
    torch.manual_seed(0)
    # 64 distinct images in 4 fixed batches of 16, queue of 32: the negatives are always the
    # two previous batches, i.e. other images. (With fewer images than queue + batch, an image's
    # own earlier keys would sit in the queue as negatives and the task could not be learned.)
    # Embeddings of 32 dims: with fewer dims than negatives some seeds stall at chance level.
    images = torch.rand(64, 3, 16, 16)
    model = _tiny_moco(queue_size=32, projection_dim=32, key_momentum=0.9)
    optimizer = torch.optim.SGD(model.query_parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(60):
        batch = images[(step % 4) * 16 : (step % 4 + 1) * 16]
        loss = model(batch + 0.1 * torch.randn_like(batch), batch + 0.1 * torch.randn_like(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Steps 2-3 are the first with a queue full of real keys: loss near chance, log(33) ~ 3.5.
    early, late = np.mean(losses[2:4]), np.mean(losses[-8:])
    assert early > 2.5, losses
    assert late < 0.5 * early, losses


def test_the_first_step_has_no_negatives_so_random_queue_slots_cannot_steer_training() -> None:
    torch.manual_seed(0)
    model = _tiny_moco()
    loss = model(torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16), torch.arange(8))
    assert float(loss.detach()) == 0.0
    assert model.queue.filled == 8


def test_an_images_own_earlier_keys_are_not_among_its_negatives() -> None:
    torch.manual_seed(0)
    model = _tiny_moco(queue_size=16)
    model(torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16), torch.arange(8))  # images 0-7
    model(torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16), torch.arange(8, 16))  # 8-15
    negatives, ids = model.queue.keys.clone(), torch.tensor([3, 12, 20, 21])
    x_query, x_key = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    model.eval()  # the same encoders for the step and the check below
    with torch.no_grad():
        loss = model(x_query, x_key, ids)
        q, k = model.encode_queries(x_query), model.encode_keys(x_key)
    others = [model.criterion(q[i : i + 1], k[i : i + 1], negatives) for i in (2, 3)]
    own = [
        model.criterion(q[i : i + 1], k[i : i + 1], negatives[torch.arange(16) != j])
        for i, j in ((0, 3), (1, 12))
    ]
    torch.testing.assert_close(loss, torch.stack(own + others).mean())


def test_ids_of_another_length_than_the_batch_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"ids must have shape \(4,\)"):
        _tiny_moco()(torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16), torch.arange(3))


def _train_three_steps(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = _tiny_moco()
    optimizer = torch.optim.SGD(model.query_parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x = torch.rand(8, 3, 16, 16)
        loss = model(x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def test_two_runs_with_the_same_seed_give_identical_weights_queue_and_pointer() -> None:
    a, b = _train_three_steps(0), _train_three_steps(0)
    assert a.keys() == b.keys()
    assert "queue.keys" in a and "queue.ptr" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    c = _train_three_steps(1)
    assert not torch.equal(a["backbone.0.weight"], c["backbone.0.weight"])


def test_moco_with_a_small_stem_resnet18_trains_on_32px_images() -> None:
    torch.manual_seed(0)
    backbone, dim = build_backbone(BackboneSpec("resnet18", small_stem=True))
    model = MoCo(backbone, dim, projection_hidden_dim=128, projection_dim=32, queue_size=16)
    x = torch.rand(4, 3, 32, 32)
    loss = model(x, x.flip(3))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.backbone.conv1.weight.grad is not None
    assert model.embed(x).shape == (4, 512)
    assert model.queue.keys.shape == (16, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queue_size": 0}, "queue_size must be a positive int"),
        ({"key_momentum": 1.5}, "momentum must be in"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"projection_dim": -1}, "projection_dim must be a positive int"),
    ],
)
def test_invalid_hyperparameters_are_rejected_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoCo(_tiny_backbone(), 32, **kwargs)


def test_views_of_different_batch_sizes_are_rejected() -> None:
    model = _tiny_moco()
    with pytest.raises(ValueError, match="x_query has 4 images but x_key has 3"):
        model(torch.rand(4, 3, 16, 16), torch.rand(3, 3, 16, 16))
