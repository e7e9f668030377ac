"""MoCo v2 building blocks: backbones, heads, queue, loss, model, augmentations, kNN and DDP."""

from sslpipe.moco.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoCropsTransform,
    eval_transform,
    moco_v2_transform,
)
from sslpipe.moco.backbone import BACKBONES, BackboneSpec, build_backbone
from sslpipe.moco.ddp import BN_MODES, BatchNormMode, CPUSyncBatchNorm, convert_sync_batchnorm
from sslpipe.moco.heads import ProjectionHead
from sslpipe.moco.knn import knn_predict, knn_top1, leave_one_out_knn_top1
from sslpipe.moco.loss import InfoNCELoss, moco_logits
from sslpipe.moco.model import MoCo, update_momentum
from sslpipe.moco.queue import KeyQueue

__all__ = [
    "BACKBONES",
    "BN_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneSpec",
    "BatchNormMode",
    "CPUSyncBatchNorm",
    "InfoNCELoss",
    "KeyQueue",
    "MoCo",
    "ProjectionHead",
    "TwoCropsTransform",
    "build_backbone",
    "convert_sync_batchnorm",
    "eval_transform",
    "knn_predict",
    "knn_top1",
    "leave_one_out_knn_top1",
    "moco_logits",
    "moco_v2_transform",
    "update_momentum",
]
