"""Where the classifier's backbone comes from: a backbone folder, the registry or torchvision.

Three sources, in this order of precedence:

* a **backbone folder** (``backbone_dir``), the ``model`` output of moco_train (format in
  :mod:`sslpipe.models.backbone_io`): how the ``full`` pipeline hands the freshly pre-trained
    backbone
  to the classifier;
* a **registry reference**: ``name`` (latest version), ``name/3`` or ``name@alias``, loaded with
  :func:`sslpipe.models.registry.load_backbone` from the MLflow registry that tracking points at;
* ``torchvision:<resnet18|resnet34|resnet50>[:small]``: the **supervised baseline**, the same
  network without pre-training (``:small`` = the 3x3 stride-1 stem without max-pool).

Every source returns the backbone (eval mode), its :class:`BackboneSpec` and a lineage dict
that says where the weights came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

from sslpipe.core.logs import get_logger
from sslpipe.models.backbone_io import load_backbone_dir
from sslpipe.models.moco.backbone import BACKBONES, BackboneSpec, build_backbone
from sslpipe.models.registry import (
    ModelReferenceError,
    load_backbone,
    resolve_version,
)

log = get_logger("classifier")

TORCHVISION_PREFIX = "torchvision:"
RANDOM_INIT = "random init"


def resolve_backbone(
    source: str, *, backbone_dir: Path | None = None
) -> tuple[nn.Module, BackboneSpec, dict[str, Any]]:
    """The backbone to train a classifier on, its spec and its lineage.

    Args:
        source: A registry reference (``name``, ``name/3``, ``name@alias``; ``name@latest`` is
            the highest version) or ``torchvision:<resnet18|resnet34|resnet50>[:small]``.
            Ignored when ``backbone_dir`` is given.
        backbone_dir: A backbone folder written by moco_train (``backbone.json`` +
            ``backbone.pt``). When given it wins over ``source``.

    ``torchvision:`` backbones are randomly initialised (the supervised baseline). Only when
    torchvision's ImageNet checkpoint of that architecture is already in the local torch hub
    cache (``$TORCH_HOME/hub/checkpoints/``) and the ImageNet stem is used, those weights are
    loaded instead (``weights=DEFAULT``); nothing is ever downloaded. The lineage's ``init``
    says which of the two happened.

    Returns:
        ``(backbone, spec, lineage)``; the backbone is in eval mode and maps (N, 3, H, W) to
        (N, spec.feature_dim).

    Raises:
        ValueError: for an unknown torchvision architecture, a malformed reference, a registered
            model name, version or alias that does not exist, or a backbone folder that is not
            one or whose weights do not fit its spec. The message names the culprit.
    """
    if backbone_dir is not None:
        return _from_folder(Path(backbone_dir), ignored_source=source)
    source = source.strip()
    if source.startswith(TORCHVISION_PREFIX):
        return _from_torchvision(source)
    return _from_registry(source)


def parse_torchvision_source(source: str) -> BackboneSpec:
    """``torchvision:resnet18`` / ``torchvision:resnet18:small`` -> its :class:`BackboneSpec`."""
    parts = source.strip().split(":")
    if parts[0] != TORCHVISION_PREFIX.rstrip(":") or len(parts) not in (2, 3):
        raise ValueError(
            f"backbone {source!r} is not of the form 'torchvision:<name>' or "
            "'torchvision:<name>:small'"
        )
    name = parts[1]
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r} in {source!r}; expected one of {', '.join(BACKBONES)}"
        )
    if len(parts) == 3 and parts[2] != "small":
        raise ValueError(
            f"backbone {source!r}: unknown variant {parts[2]!r}; the only variant is ':small'"
        )
    return BackboneSpec(name, small_stem=len(parts) == 3)


def cached_torchvision_checkpoint(name: str) -> Path | None:
    """The local file of torchvision's default ImageNet weights for ``name``, if cached."""
    weights = models.get_model_weights(name).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return path if path.is_file() else None


def _from_torchvision(source: str) -> tuple[nn.Module, BackboneSpec, dict[str, Any]]:
    spec = parse_torchvision_source(source)
    backbone, _ = build_backbone(spec)
    lineage: dict[str, Any] = {
        "source": source,
        "kind": "torchvision",
        "backbone": spec.to_dict(),
        "init": RANDOM_INIT,
    }
    checkpoint = None if spec.small_stem else cached_torchvision_checkpoint(spec.name)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            backbone.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"backbone {source!r}: the cached ImageNet weights {checkpoint} do not fit: {err}"
            ) from None
        lineage["init"] = f"torchvision ImageNet weights ({checkpoint.name}, local cache)"
    log.info("backbone %s: %s", source, lineage["init"])
    return backbone.eval(), spec, lineage


def _from_folder(
    folder: Path, *, ignored_source: str
) -> tuple[nn.Module, BackboneSpec, dict[str, Any]]:
    backbone, config = load_backbone_dir(folder)  # ValueError when it does not fit
    spec = BackboneSpec.from_dict(config["backbone"])
    pretraining = config.get("lineage") or {}
    lineage = {
        "source": "backbone_dir",
        "kind": "folder",
        "path": str(folder),
        "backbone": spec.to_dict(),
        "init": "pre-trained backbone folder",
        "pretraining": pretraining,
    }
    log.info(
        "backbone from folder %s (%s; the configured backbone %r is not used)",
        folder,
        spec.name,
        ignored_source,
    )
    return backbone, spec, lineage


def registered_version(reference: str) -> tuple[str, str]:
    """``(name, version)`` a registry reference points at now.

    ``name@latest`` (the configuration's default) is the highest version, like ``name``.

    Raises:
        ValueError: malformed reference, unknown model name, version or alias.
    """
    try:
        return resolve_version(reference)
    except ModelReferenceError as err:
        raise ValueError(f"unknown backbone {reference!r}: {err}") from None


def _from_registry(reference: str) -> tuple[nn.Module, BackboneSpec, dict[str, Any]]:
    name, version = registered_version(reference)
    # Loading the resolved version (not the alias again) keeps lineage and weights in step even
    # when the alias moves meanwhile.
    backbone, config = load_backbone(f"{name}/{version}")
    spec = BackboneSpec.from_dict(config["backbone"])
    lineage = {
        "source": reference,
        "kind": "registry",
        "name": name,
        "version": version,
        "uri": f"models:/{name}/{version}",
        "backbone": spec.to_dict(),
        "init": "registered backbone",
        "pretraining": config.get("lineage") or {},
    }
    log.info("backbone %s -> models:/%s/%s (%s)", reference, name, version, spec.name)
    return backbone, spec, lineage


__all__ = [
    "RANDOM_INIT",
    "TORCHVISION_PREFIX",
    "cached_torchvision_checkpoint",
    "parse_torchvision_source",
    "registered_version",
    "resolve_backbone",
]
