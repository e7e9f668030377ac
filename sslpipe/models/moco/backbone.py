"""ResNet backbones for MoCo, built from torchvision with random initialisation.

The backbone is the part of the network that is exported after pre-training: it maps an image
batch of shape (N, 3, H, W) to a feature batch of shape (N, feature_dim). The classification
layer ``fc`` is replaced by :class:`torch.nn.Identity` so that the output is the globally
average-pooled feature, as in MoCo (He et al., 2020) and MoCo v2 (Chen et al., 2020).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn
from torchvision import models

from sslpipe.core.architectures import BACKBONES

# Width of the pooled feature of each architecture (torchvision's ``fc.in_features``).
_FEATURE_DIMS: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}

_CONSTRUCTORS: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
}


@dataclass(frozen=True)
class BackboneSpec:
    """Which backbone to build.

    Attributes:
        name: One of :data:`BACKBONES`.
        small_stem: Replace the ImageNet stem (7x7 stride-2 conv + max-pool, a 4x down-sampling)
            by a 3x3 stride-1 conv without max-pool. This is the CIFAR variant used by the MoCo
            CIFAR-10 demo and by SimCLR for images of about 32 px, where the ImageNet stem would
            throw away most of the spatial resolution before the first residual block.
    """

    name: str = "resnet18"
    small_stem: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError if the spec does not describe a buildable backbone."""
        if not isinstance(self.name, str) or self.name not in BACKBONES:
            raise ValueError(
                f"Unknown backbone name {self.name!r}; expected one of {', '.join(BACKBONES)}. "
                "Set BackboneSpec.name to one of these."
            )
        if not isinstance(self.small_stem, bool):
            raise ValueError(
                f"BackboneSpec.small_stem must be a bool, got {type(self.small_stem).__name__} "
                f"({self.small_stem!r}). Use True or False."
            )

    @property
    def feature_dim(self) -> int:
        """Width of the backbone output, 512 for resnet18/34 and 2048 for resnet50."""
        return _FEATURE_DIMS[self.name]

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, suitable for JSON/YAML configs and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackboneSpec:
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys raise."""
        if not isinstance(d, Mapping):
            raise ValueError(
                f"BackboneSpec.from_dict expects a mapping, got {type(d).__name__}. "
                "Pass a dict such as {'name': 'resnet18', 'small_stem': False}."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"Unknown BackboneSpec key(s) {unknown}; expected only {sorted(known)}. "
                "Remove or rename these keys."
            )
        return cls(**dict(d))


def _small_stem_conv() -> nn.Conv2d:
    conv = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same initialisation torchvision's ResNet applies to every other convolution.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def build_backbone(spec: BackboneSpec) -> tuple[nn.Module, int]:
    """Build a randomly initialised ResNet feature extractor.

    Args:
        spec: Architecture and stem choice.

    Returns:
        ``(backbone, feature_dim)``: the module maps (N, 3, H, W) to (N, feature_dim).
    """
    # weights=None: pre-training starts from scratch (and nothing is downloaded).
    resnet = _CONSTRUCTORS[spec.name](weights=None)
    feature_dim = resnet.fc.in_features
    if feature_dim != spec.feature_dim:  # guards the table above against torchvision changes
        raise ValueError(
            f"torchvision {spec.name} has fc.in_features={feature_dim}, expected "
            f"{spec.feature_dim}; update _FEATURE_DIMS in sslpipe/models/moco/backbone.py."
        )
    resnet.fc = nn.Identity()
    if spec.small_stem:
        resnet.conv1 = _small_stem_conv()
        resnet.maxpool = nn.Identity()
    return resnet, feature_dim


__all__ = ["BACKBONES", "BackboneSpec", "build_backbone"]
