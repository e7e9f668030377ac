"""The backbone model folder: weights plus the JSON config that rebuilds the network.

Format ``sslpipe.backbone/v1``::

    backbone.pt    state_dict of the backbone (tensors only; loaded with weights_only=True)
    backbone.json  {"format", "backbone": BackboneSpec, "feature_dim", "image_size",
                    "mean", "std", "lineage": {...}}
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslpipe.core.io import atomic_path, read_folder_config, write_json
from sslpipe.models.moco.backbone import BackboneSpec, build_backbone
from sslpipe.models.moco.preprocessing import IMAGENET_MEAN, IMAGENET_STD

BACKBONE_FORMAT = "sslpipe.backbone/v1"
WEIGHTS_FILE = "backbone.pt"
CONFIG_FILE = "backbone.json"


def write_model_folder(
    folder: Path, module: nn.Module, config: dict[str, Any], *, weights_file: str, config_file: str
) -> dict[str, Any]:
    """Write a module's tensors, then its JSON config, each atomically.

    The config is written last, so its presence means the folder is complete.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / weights_file) as tmp:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, tmp)
    write_json(folder / config_file, config)
    return config


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict saved by :func:`write_model_folder`, read with ``weights_only=True``.

    Raises:
        ValueError: when the file holds anything but tensors and plain containers (a pickled
            object's code is never run), or is no torch file at all.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = (str(err).strip().splitlines() or ["no reason given"])[0]
        raise ValueError(
            f"{path}: refusing to load: not a tensors-only weights file ({first[:200]})"
        ) from None
    except (RuntimeError, EOFError) as err:  # torch's own messages for a truncated or foreign file
        raise ValueError(f"{path}: not a torch weights file ({err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict, found {type(state).__name__}")
    return state


def preprocessing(image_size: int) -> dict[str, Any]:
    """The input size and normalisation a saved model expects, as stored in its config."""
    return {"image_size": image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def save_backbone(
    folder: Path,
    backbone: nn.Module,
    spec: BackboneSpec,
    *,
    image_size: int,
    lineage: dict[str, Any],
) -> dict[str, Any]:
    """Write the backbone folder atomically file by file; the config is written last."""
    config = {
        "format": BACKBONE_FORMAT,
        "backbone": spec.to_dict(),
        "feature_dim": spec.feature_dim,
        **preprocessing(image_size),
        "lineage": lineage,
    }
    return write_model_folder(
        folder, backbone, config, weights_file=WEIGHTS_FILE, config_file=CONFIG_FILE
    )


def load_backbone_dir(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the backbone from a folder written by :func:`save_backbone` (eval mode).

    Raises:
        ValueError: when the folder is not a backbone folder or the weights do not fit.
    """
    config = read_folder_config(folder, CONFIG_FILE, BACKBONE_FORMAT, "backbone")
    backbone, _ = build_backbone(BackboneSpec.from_dict(config["backbone"]))
    state = load_weights(Path(folder) / WEIGHTS_FILE)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{folder}: the weights do not fit {config['backbone']}: {err}") from None
    return backbone.eval(), config
