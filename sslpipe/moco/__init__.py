"""MoCo v2 building blocks: backbones, heads, queue, loss, model, augmentations and kNN."""

from sslpipe.moco.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoCropsTransform,
    eval_transform,
    moco_v2_transform,
)
from sslpipe.moco.backbone import BACKBONES, BackboneSpec, build_backbone
from sslpipe.moco.heads import ProjectionHead
from sslpipe.moco.knn import knn_predict, knn_top1, leave_one_out_knn_top1
from sslpipe.moco.loss import InfoNCELoss, moco_logits
from sslpipe.moco.model import MoCo, update_momentum
from sslpipe.moco.queue import KeyQueue

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneSpec",
    "InfoNCELoss",
    "KeyQueue",
    "MoCo",
    "ProjectionHead",
    "TwoCropsTransform",
    "build_backbone",
    "eval_transform",
    "knn_predict",
    "knn_top1",
    "leave_one_out_knn_top1",
    "moco_logits",
    "moco_v2_transform",
    "update_momentum",
]
