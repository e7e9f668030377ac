"""Training pieces: head, freezing, repeats, class weights, metrics, early stopping, curves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sslpipe.models.classifier import ClassifierHead, ImageClassifier
from sslpipe.models.classifier.train import (
    EarlyStopping,
    class_weight_tensor,
    evaluate,
    expand_repeats,
    macro_f1,
    make_criterion,
    plot_curves,
    set_backbone_trainable,
    train_epoch,
    trainable_parameters,
)
from sslpipe.models.moco.backbone import BackboneSpec, build_backbone


def tiny_classifier(num_classes: int = 3) -> ImageClassifier:
    torch.manual_seed(0)
    backbone, dim = build_backbone(BackboneSpec("resnet18"))
    return ImageClassifier(backbone, ClassifierHead(dim, num_classes, hidden_dim=16, dropout=0.5))


def batches(n: int = 16, num_classes: int = 3) -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 16, 16, generator=generator) * 2 + 1  # far from N(0, 1): BN moves
    targets = torch.arange(n) % num_classes
    return DataLoader(TensorDataset(images, targets), batch_size=8)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_the_head_is_linear_relu_dropout_linear() -> None:
    head = ClassifierHead(512, 4, hidden_dim=32, dropout=0.3)
    assert [type(layer) for layer in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    first, _, dropout, last = head
    assert (first.in_features, first.out_features) == (512, 32)
    assert (last.in_features, last.out_features) == (32, 4)
    assert dropout.p == 0.3


def test_a_frozen_backbone_keeps_parameters_and_bn_buffers_bit_identical() -> None:
    model = tiny_classifier()
    before, head_before = snapshot(model.backbone), snapshot(model.head)
    set_backbone_trainable(model, False)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-2)
    for _ in range(2):
        train_epoch(model, batches(), optimizer, nn.CrossEntropyLoss(), backbone_frozen=True)
    after = snapshot(model.backbone)
    assert before.keys() == after.keys()
    assert any("running_mean" in k for k in after) and any(
        "num_batches_tracked" in k for k in after
    )
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.training  # kept in eval mode while the head trains
    assert model.head.training
    assert any(not torch.equal(head_before[k], v) for k, v in snapshot(model.head).items())


def test_an_unfrozen_backbone_changes_parameters_and_bn_buffers() -> None:
    model = tiny_classifier()
    before = snapshot(model.backbone)
    set_backbone_trainable(model, True)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-3)
    train_epoch(model, batches(), optimizer, nn.CrossEntropyLoss(), backbone_frozen=False)
    after = snapshot(model.backbone)
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert int(after["bn1.num_batches_tracked"]) == 2


def test_rows_are_expanded_by_their_repeats() -> None:
    frame = pd.DataFrame(
        {"id": ["a", "b", "c", "d"], "label": ["x", "x", "y", "z"], "repeats": [1, 1, 3, 2]}
    )
    expanded = expand_repeats(frame)
    assert len(expanded) == 7
    assert expanded["id"].tolist() == ["a", "b", "c", "c", "c", "d", "d"]
    assert expanded["label"].value_counts().to_dict() == {"y": 3, "x": 2, "z": 2}


def test_class_weights_become_the_loss_weights_in_class_order() -> None:
    assert class_weight_tensor(None) is None
    criterion = make_criterion([0.5, 2.0])
    assert criterion.weight is not None
    assert criterion.weight.tolist() == [0.5, 2.0]
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    targets = torch.tensor([0, 1, 1])
    per_row = nn.functional.cross_entropy(logits, targets, reduction="none")
    weights = torch.tensor([0.5, 2.0, 2.0])
    expected = (per_row * weights).sum() / weights.sum()
    torch.testing.assert_close(criterion(logits, targets), expected)
    assert not torch.isclose(criterion(logits, targets), per_row.mean())
    assert make_criterion(None).weight is None


def test_macro_f1_is_the_unweighted_mean_over_classes() -> None:
    # class 0: P=1, R=0.5 -> F1=2/3; class 1: P=0.5, R=1 -> F1=2/3; class 2: F1=1.
    assert macro_f1([0, 0, 1, 2], [0, 1, 1, 2]) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert macro_f1([0, 1], [0, 1]) == 1.0


def test_evaluate_reports_loss_accuracy_and_macro_f1() -> None:
    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :2]  # logits are the inputs

    inputs = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [3.0, 0.0]])
    targets = torch.tensor([0, 1, 1, 0])
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=3)
    result = evaluate(Fixed(), loader, nn.CrossEntropyLoss())
    assert result["accuracy"] == 0.75
    assert result["macro_f1"] == pytest.approx(macro_f1([0, 1, 1, 0], [0, 1, 0, 0]))
    assert result["loss"] == pytest.approx(float(nn.CrossEntropyLoss()(inputs, targets)))


def test_early_stopping_stops_after_patience_epochs_without_improvement() -> None:
    stopper = EarlyStopping(patience=2)
    model = nn.Linear(1, 1)
    scores = [0.3, 0.6, 0.6, 0.5]  # a tie is no improvement
    improved = []
    for epoch, score in enumerate(scores, start=1):
        nn.init.constant_(model.weight, epoch)
        improved.append(stopper.step(score, epoch, model))
    assert improved == [True, True, False, False]
    assert stopper.should_stop
    assert (stopper.best_epoch, stopper.best_score) == (2, 0.6)
    assert stopper.best_state is not None
    assert float(stopper.best_state["weight"]) == 2.0  # a copy of epoch 2, not a reference
    stopper.reset_patience()
    assert not stopper.should_stop


def test_curves_are_one_png_with_loss_and_accuracy(tmp_path: Path) -> None:
    history = [
        {
            "epoch": e,
            "stage": "head" if e < 3 else "finetune",
            "train_loss": 1.0 / e,
            "val_loss": 1.2 / e,
            "train_accuracy": 0.2 * e,
            "val_accuracy": 0.15 * e,
            "val_macro_f1": 0.1 * e,
            "best": e == 3,
        }
        for e in range(1, 5)
    ]
    plot_curves(tmp_path / "curves.png", history)
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG"
        assert image.width > image.height  # two panels side by side
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
