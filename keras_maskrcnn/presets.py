"""Named model configurations."""
from __future__ import annotations

from typing import Any, Dict


def small_model_config(image_size: int = 256) -> Dict[str, Any]:
    """A small, fast Mask R-CNN for small images and training from scratch on a CPU.

    ResNet-18 with trainable batch norm, a 64-channel FPN, anchors one octave smaller than COCO's,
    fewer proposals, 64 sampled RoIs per image and a mask head of two 64-channel convolutions.
    Images are used at ``image_size`` (short and long side).

    The narrow heads are what makes float32 training affordable where bfloat16 is not native:
    at 256 x 256, batch 8, a training step costs 4.3 CPU-seconds against 9.2 with torchvision's
    head widths at 128 channels (AMD EPYC, AVX2, BENCHMARKS.md).
    """
    return dict(
        backbone="resnet18",
        backbone_norm="batch_norm",
        trainable_backbone_layers=5,
        fpn_channels=64,
        representation_size=256,
        mask_head_channels=64,
        mask_head_convs=2,
        anchor_sizes=(16, 32, 64, 128, 256),
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=300,
        box_batch_size_per_image=64,
        min_size=image_size,
        max_size=image_size,
    )


DEMO_IMAGE_SIZE = 160


def demo_config(image_size: int = DEMO_IMAGE_SIZE) -> Dict[str, Any]:
    """The main job's model (``make demo``): :func:`small_model_config` at ``image_size`` with the
    anchors scaled with the image (the synthetic shapes scale with it)."""
    scale = image_size / 256.0
    return dict(small_model_config(image_size), anchor_sizes=tuple(round(s * scale) for s in (16, 32, 64, 128, 256)))


def torchvision_maskrcnn_resnet50_fpn_config(**overrides: Any) -> Dict[str, Any]:
    """torchvision's ``maskrcnn_resnet50_fpn`` hyperparameters, stated explicitly (``MaskRCNN``'s defaults).

    With these a model converted by :func:`keras_maskrcnn.convert.from_torchvision` preprocesses
    and post-processes exactly as torchvision does (``predict_images`` resizes with torchvision's
    ``min_size`` / ``max_size`` rule). ``overrides`` replace or add ``MaskRCNN`` arguments, e.g. ``min_size=640``.
    """
    config = dict(
        backbone="resnet50",
        backbone_norm="frozen_bn",
        trainable_backbone_layers=3,
        fpn_channels=256,
        anchor_sizes=(32, 64, 128, 256, 512),
        aspect_ratios=(0.5, 1.0, 2.0),
        rpn_pre_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_train=2000,
        rpn_post_nms_top_n_test=1000,
        rpn_nms_threshold=0.7,
        rpn_min_size=1e-3,
        rpn_fg_iou_threshold=0.7,
        rpn_bg_iou_threshold=0.3,
        rpn_batch_size_per_image=256,
        rpn_positive_fraction=0.5,
        box_roi_size=7,
        mask_roi_size=14,
        sampling_ratio=2,
        aligned=False,
        representation_size=1024,
        box_score_threshold=0.05,
        box_nms_threshold=0.5,
        detections_per_image=100,
        box_fg_iou_threshold=0.5,
        box_bg_iou_threshold=0.5,
        box_batch_size_per_image=512,
        box_positive_fraction=0.25,
        box_coder_weights=(10.0, 10.0, 5.0, 5.0),
        mask_threshold=0.5,
        image_mean=(0.485, 0.456, 0.406),
        image_std=(0.229, 0.224, 0.225),
        min_size=800,
        max_size=1333,
        size_divisible=32,
    )
    config.update(overrides)
    return config
