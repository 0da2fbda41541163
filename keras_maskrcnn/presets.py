"""Named model configurations."""
from __future__ import annotations

import inspect
from typing import Any, Dict


def small_model_config(image_size: int = 256) -> Dict[str, Any]:
    """A small, fast Mask R-CNN for small images and training from scratch on a CPU.

    ResNet-18 with trainable batch norm, a 64-channel FPN, anchors one octave smaller than COCO's,
    fewer proposals, 64 sampled RoIs per image and a mask head of two 64-channel convolutions;
    batch norm in the FPN and the mask head as well (torchvision's v2 layout), which trained from
    scratch to a higher held-out AP in the same steps (segm AP50 0.36 vs 0.31 after 400 steps of
    batch 4 at 160 px; BENCHMARKS.md). Images are used at ``image_size`` (short and long side).

    The narrow heads are what makes float32 training affordable where bfloat16 is not native:
    at 256 x 256, batch 8, a training step costs 4.3 CPU-seconds against 9.2 with torchvision's
    head widths at 128 channels (AMD EPYC, AVX2, BENCHMARKS.md).
    """
    return dict(
        backbone="resnet18",
        backbone_norm="batch_norm",
        trainable_backbone_layers=5,
        fpn_channels=64,
        fpn_norm="batch_norm",
        head_norm="batch_norm",
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
    anchors scaled with the image (the synthetic shapes scale with it), fewer RoIs per training
    image (300 proposals, 48 sampled: on the 2-core AVX2 host held-out segm AP50 0.504 against
    0.456 with the small preset's 500 / 64 in the same 5.3 minutes, one run each) and ResNet-18's
    ``layer4`` at 256 channels instead of 512 (``backbone_stage_channels``): at 160 px its 5 x 5
    maps cost a third of the backbone and three quarters of the weights the optimizer updates;
    narrowed, a float32 step takes 18 % less time and the model learns as much per step
    (BENCHMARKS.md, session 15)."""
    scale = image_size / 256.0
    return dict(
        small_model_config(image_size),
        backbone_stage_channels=(64, 128, 256, 256),
        anchor_sizes=tuple(round(s * scale) for s in (16, 32, 64, 128, 256)),
        rpn_post_nms_top_n_train=300,
        box_batch_size_per_image=48,
    )


# The from-scratch preset's weight of the box head's classification loss (torchvision: 1).
FROM_SCRATCH_CLASS_LOSS_WEIGHT = 4.0


def from_scratch_config(image_size: int = 256) -> Dict[str, Any]:
    """The model ``keras-maskrcnn train`` plans without pretrained weights: :func:`small_model_config`
    with a 128-channel FPN, a 1024-wide box head, half of the 64 sampled RoIs foreground and four
    jittered copies of each ground truth box among the RoI candidates (``box_gt_jitter_copies``).

    Made for a fixed number of epochs on a small dataset, where what limits held-out AP is how
    much the model learns from each image, not the cost of a step: on 160 synthetic 256 x 256
    images, 12 epochs of batch 8 reached held-out segm AP50 0.50 (mixed_bfloat16) and 0.56
    (float32) against 0.34 with the small preset, with steps about 1.5x as expensive (AMD EPYC
    Zen 4, AVX512_BF16; BENCHMARKS.md, "Learning per image seen"). A time-limited run (``make
    demo``) is better served by the small preset's cheaper steps.

    The classification loss counts four times in the total (``loss_weights``): from scratch, the
    features the box head shares are otherwise shaped by the mask and box losses, and the
    classifier stays near the class prior for the first quarter of a 12-epoch run, while the
    objects themselves are found (class-agnostic segm AP50 0.78 with equal weights). Weighted,
    held-out segm AP50 after 12 epochs rose by 0.057 on average over four seeds (BENCHMARKS.md,
    "Session 18"); the demo, which sees thousands of images, did not gain and keeps equal weights.
    """
    return dict(
        small_model_config(image_size),
        fpn_channels=128,
        representation_size=1024,
        box_positive_fraction=0.5,
        box_gt_jitter_copies=4,
        loss_weights={"class_loss": FROM_SCRATCH_CLASS_LOSS_WEIGHT},
    )


def model_defaults() -> Dict[str, Any]:
    """Every :class:`~keras_maskrcnn.MaskRCNN` hyperparameter and its default: the one source of
    defaults (torchvision's ``maskrcnn_resnet50_fpn``). The presets state only what differs."""
    from keras_maskrcnn.model import MaskRCNN

    defaults = {}
    for name, parameter in inspect.signature(MaskRCNN.__init__).parameters.items():
        if parameter.default is not inspect.Parameter.empty and name not in _NOT_HYPERPARAMETERS:
            defaults[name] = parameter.default
    return defaults


# Constructor arguments that are not hyperparameters of torchvision's model.
_NOT_HYPERPARAMETERS = ("rpn_head", "box_head", "mask_head", "mask_output", "jit_compile_masks", "gt_mask_size")


def torchvision_maskrcnn_resnet50_fpn_config(**overrides: Any) -> Dict[str, Any]:
    """torchvision's ``maskrcnn_resnet50_fpn`` hyperparameters, stated explicitly (``MaskRCNN``'s defaults).

    With these a model converted by :func:`keras_maskrcnn.convert.from_torchvision` preprocesses
    and post-processes exactly as torchvision does (``predict_images`` resizes with torchvision's
    ``min_size`` / ``max_size`` rule). ``overrides`` replace or add ``MaskRCNN`` arguments, e.g. ``min_size=640``.
    """
    return {**model_defaults(), **overrides}


def torchvision_maskrcnn_resnet50_fpn_v2_config(**overrides: Any) -> Dict[str, Any]:
    """torchvision's ``maskrcnn_resnet50_fpn_v2`` (Li et al. 2021, "Benchmarking detection transfer
    learning with vision transformers"): v1 with batch norm in the FPN and the heads, a two-conv
    RPN head and a four-conv + one-FC box head."""
    v2 = dict(fpn_norm="batch_norm", head_norm="batch_norm", rpn_conv_depth=2, box_head_convs=4, box_head_fcs=1)
    return {**model_defaults(), **v2, **overrides}
