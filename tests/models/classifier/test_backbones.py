"""Backbone sources: torchvision baseline, backbone folder, and a real local MLflow registry."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from torchvision import models

from sslpipe.models.backbone_io import save_backbone
from sslpipe.models.classifier.backbones import (
    RANDOM_INIT,
    cached_torchvision_checkpoint,
    resolve_backbone,
)
from sslpipe.models.moco.backbone import BackboneSpec, build_backbone
from sslpipe.models.registry import configure_tracking, register_backbone

NAME = "tiny-backbone"


@pytest.fixture(autouse=True)
def empty_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No cached torchvision weights unless a test puts them there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


def seeded_backbone_folder(folder: Path, seed: int, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    backbone, _ = build_backbone(spec)
    save_backbone(folder, backbone, spec, image_size=16, lineage={"mlflow_run_id": f"run-{seed}"})
    return {k: v.clone() for k, v in backbone.state_dict().items()}


def assert_weights(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# --- torchvision -------------------------------------------------------------------------------


def test_the_torchvision_baseline_is_randomly_initialised() -> None:
    backbone, spec, lineage = resolve_backbone("torchvision:resnet18:small", backbone_dir=None)
    assert spec == BackboneSpec("resnet18", small_stem=True)
    assert lineage["init"] == RANDOM_INIT
    assert lineage["source"] == "torchvision:resnet18:small"
    assert not backbone.training
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    # Two resolutions draw two different random initialisations: nothing was loaded.
    other, _, _ = resolve_backbone("torchvision:resnet18:small", backbone_dir=None)
    assert not torch.equal(
        backbone.state_dict()["conv1.weight"], other.state_dict()["conv1.weight"]
    )


def test_cached_torchvision_weights_are_used_only_when_already_on_disk(
    empty_torch_hub: Path,
) -> None:
    assert cached_torchvision_checkpoint("resnet18") is None
    _, _, lineage = resolve_backbone("torchvision:resnet18", backbone_dir=None)
    assert lineage["init"] == RANDOM_INIT

    torch.manual_seed(3)
    imagenet = models.resnet18(weights=None)
    url = models.ResNet18_Weights.DEFAULT.url
    path = empty_torch_hub / "hub" / "checkpoints" / Path(url).name
    path.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), path)
    assert cached_torchvision_checkpoint("resnet18") == path

    backbone, _, lineage = resolve_backbone("torchvision:resnet18", backbone_dir=None)
    assert "local cache" in lineage["init"]
    expected = {k: v for k, v in imagenet.state_dict().items() if not k.startswith("fc.")}
    assert_weights(backbone, expected)
    # The ImageNet stem does not fit the small stem: that one stays randomly initialised.
    _, _, small = resolve_backbone("torchvision:resnet18:small", backbone_dir=None)
    assert small["init"] == RANDOM_INIT


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ("torchvision:resnet99", "'resnet99'"),
        ("torchvision:resnet18:huge", "'huge'"),
        ("torchvision:", "''"),
    ],
)
def test_an_unknown_torchvision_backbone_is_one_clear_error(source: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        resolve_backbone(source, backbone_dir=None)


# --- backbone folder ---------------------------------------------------------------------------


def test_a_backbone_folder_wins_over_the_source(tmp_path: Path) -> None:
    spec = BackboneSpec("resnet18", small_stem=True)
    weights = seeded_backbone_folder(tmp_path / "bb", 5, spec)
    backbone, resolved, lineage = resolve_backbone("no-such-model@x", backbone_dir=tmp_path / "bb")
    assert resolved == spec
    assert_weights(backbone, weights)
    assert lineage["source"] == "backbone_dir"
    assert lineage["pretraining"] == {"mlflow_run_id": "run-5"}


def test_a_backbone_folder_whose_weights_do_not_fit_is_refused(tmp_path: Path) -> None:
    backbone, _ = build_backbone(BackboneSpec("resnet18", small_stem=True))
    # The config claims the ImageNet stem; the weights have the 3x3 one.
    save_backbone(tmp_path / "bb", backbone, BackboneSpec("resnet18"), image_size=16, lineage={})
    with pytest.raises(ValueError, match="weights do not fit"):
        resolve_backbone("torchvision:resnet18", backbone_dir=tmp_path / "bb")


def test_a_folder_that_is_not_a_backbone_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a backbone folder"):
        resolve_backbone("torchvision:resnet18", backbone_dir=tmp_path / "empty")


# --- registry ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """A local sqlite registry with two versions of NAME; alias 'champion' -> version 1."""
    root = tmp_path_factory.mktemp("registry")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
        patch.setenv("SSLPIPE_ARTIFACT_ROOT", str(root / "mlartifacts"))
        configure_tracking()
        spec = BackboneSpec("resnet18")
        weights = {}
        for seed in (1, 2):
            weights[str(seed)] = seeded_backbone_folder(root / f"bb{seed}", seed, spec)
            with mlflow.start_run():
                register_backbone(root / f"bb{seed}", name=NAME, tags={})
        MlflowClient().set_registered_model_alias(NAME, "champion", "1")
        yield weights
    mlflow.set_tracking_uri(before)  # type: ignore[arg-type]  # None: back to the default


@pytest.mark.parametrize(
    ("reference", "version"),
    [(f"{NAME}/1", "1"), (f"{NAME}@champion", "1"), (NAME, "2"), (f"{NAME}@latest", "2")],
)
def test_registry_references_resolve_to_that_version(
    registry: dict[str, dict[str, torch.Tensor]], reference: str, version: str
) -> None:
    backbone, spec, lineage = resolve_backbone(reference, backbone_dir=None)
    assert spec == BackboneSpec("resnet18")
    assert_weights(backbone, registry[version])
    assert lineage["source"] == reference
    assert (lineage["name"], lineage["version"]) == (NAME, version)
    assert lineage["uri"] == f"models:/{NAME}/{version}"
    assert lineage["pretraining"] == {"mlflow_run_id": f"run-{version}"}


def test_an_unknown_alias_is_one_clear_error_naming_it(registry: object) -> None:
    with pytest.raises(ValueError) as err:
        resolve_backbone(f"{NAME}@production", backbone_dir=None)
    message = str(err.value)
    assert message.startswith(f"unknown backbone '{NAME}@production': ")
    assert "no alias 'production'" in message
    assert "champion" in message  # what does exist
    assert "\n" not in message


@pytest.mark.parametrize(
    ("reference", "named"),
    [
        ("no-such-backbone", "no registered model named 'no-such-backbone'"),
        ("no-such-backbone@champion", "no registered model named 'no-such-backbone'"),
        (f"{NAME}/9", "has no version 9"),
        ("not a reference!", "not valid"),
    ],
)
def test_an_unknown_backbone_name_or_version_is_one_clear_error(
    registry: object, reference: str, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        resolve_backbone(reference, backbone_dir=None)
