"""MoCo v2 building blocks: backbones, heads, queue, loss, model, augmentations, kNN and DDP."""

from sslpipe.models.moco.backbone import BACKBONES, BackboneSpec, build_backbone
from sslpipe.models.moco.batch_augment import BatchMoCoV2Augment, TwoCropsTransform, crop_transform
from sslpipe.models.moco.ddp import (
    BN_MODES,
    BatchNormMode,
    CPUSyncBatchNorm,
    convert_sync_batchnorm,
)
from sslpipe.models.moco.heads import ProjectionHead
from sslpipe.models.moco.knn import knn_predict, knn_top1, leave_one_out_knn_top1
from sslpipe.models.moco.loss import InfoNCELoss, moco_logits
from sslpipe.models.moco.model import MoCo, update_momentum
from sslpipe.models.moco.preprocessing import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from sslpipe.models.moco.queue import KeyQueue

__all__ = [
    "BACKBONES",
    "BN_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneSpec",
    "BatchMoCoV2Augment",
    "BatchNormMode",
    "CPUSyncBatchNorm",
    "InfoNCELoss",
    "KeyQueue",
    "MoCo",
    "ProjectionHead",
    "TwoCropsTransform",
    "build_backbone",
    "convert_sync_batchnorm",
    "crop_transform",
    "eval_transform",
    "knn_predict",
    "knn_top1",
    "leave_one_out_knn_top1",
    "moco_logits",
    "update_momentum",
]
