"""The flat, torchvision-named views of a :class:`~keras_maskrcnn.model.MaskRCNN`'s settings and
parts: the stages own them (``model.rpn``, ``model.roi_heads``), these read them back; and the
same settings grouped by the stage that owns them (``rpn_config=``, ``roi_heads_config=``, ...)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional


class FlatSettings:
    """Mixin of ``MaskRCNN``: needs ``self.rpn``, ``self.roi_heads``, ``self.fpn``, ``self._head_settings``."""

    # torchvision's attribute paths are model.rpn.head, model.roi_heads.box_head, ...; these
    # shortcuts keep the flat names of 0.1.0 (weight conversion, user code).
    rpn_head = property(lambda self: self.rpn.head)
    anchor_generator = property(lambda self: self.rpn.anchor_generator)
    proposal_layer = property(lambda self: self.rpn.proposal_layer)
    box_roi_align = property(lambda self: self.roi_heads.box_roi_align)
    box_head = property(lambda self: self.roi_heads.box_head)
    mask_roi_align = property(lambda self: self.roi_heads.mask_roi_align)
    mask_head = property(lambda self: self.roi_heads.mask_head)
    detection_layer = property(lambda self: self.roi_heads.detection_layer)
    fpn_channels = property(lambda self: self.fpn.channels)
    box_roi_size = property(lambda self: self.box_roi_align.output_size[0])
    mask_roi_size = property(lambda self: self.mask_roi_align.output_size[0])
    box_coder_weights = property(lambda self: self.detection_layer.box_coder_weights)
    anchor_sizes = property(lambda self: self.anchor_generator.sizes)
    aspect_ratios = property(lambda self: self.anchor_generator.aspect_ratios)
    sampling_ratio = property(lambda self: self.box_roi_align.sampling_ratio)
    aligned = property(lambda self: self.box_roi_align.aligned)
    rpn_fg_iou_threshold = property(lambda self: self.rpn.fg_iou_threshold)
    rpn_bg_iou_threshold = property(lambda self: self.rpn.bg_iou_threshold)
    rpn_batch_size_per_image = property(lambda self: self.rpn.batch_size_per_image)
    rpn_positive_fraction = property(lambda self: self.rpn.positive_fraction)
    box_fg_iou_threshold = property(lambda self: self.roi_heads.fg_iou_threshold)
    box_bg_iou_threshold = property(lambda self: self.roi_heads.bg_iou_threshold)
    box_batch_size_per_image = property(lambda self: self.roi_heads.sampler.batch_size_per_image)
    box_positive_fraction = property(lambda self: self.roi_heads.sampler.positive_fraction)
    box_gt_jitter_copies = property(lambda self: self.roi_heads.gt_jitter_copies)
    box_gt_jitter_std = property(lambda self: self.roi_heads.gt_jitter_std)
    representation_size = property(lambda self: self._head_settings["representation_size"])
    mask_head_convs = property(lambda self: self._head_settings["mask_head_convs"])
    mask_head_channels = property(lambda self: self._head_settings["mask_head_channels"])


# The constructor's settings grouped by the part that owns them: for each group, the flat
# (torchvision) argument of MaskRCNN -> the name the part itself uses (build_rpn's, build_roi_heads'
# and transform's keywords).
STAGE_SETTINGS: Dict[str, Dict[str, str]] = {
    "backbone_config": {
        "trainable_backbone_layers": "trainable_layers",
        "backbone_norm": "norm",
        "backbone_stage_channels": "stage_channels",
    },
    "fpn_config": {"fpn_channels": "channels", "fpn_norm": "norm"},
    "rpn_config": {
        "anchor_sizes": "anchor_sizes",
        "aspect_ratios": "aspect_ratios",
        "rpn_conv_depth": "conv_depth",
        "rpn_pre_nms_top_n_train": "pre_nms_top_n_train",
        "rpn_pre_nms_top_n_test": "pre_nms_top_n_test",
        "rpn_post_nms_top_n_train": "post_nms_top_n_train",
        "rpn_post_nms_top_n_test": "post_nms_top_n_test",
        "rpn_nms_threshold": "nms_threshold",
        "rpn_min_size": "min_size",
        "rpn_fg_iou_threshold": "fg_iou_threshold",
        "rpn_bg_iou_threshold": "bg_iou_threshold",
        "rpn_batch_size_per_image": "batch_size_per_image",
        "rpn_positive_fraction": "positive_fraction",
    },
    "roi_heads_config": {
        **{name: name for name in (
            "box_roi_size", "mask_roi_size", "sampling_ratio", "aligned", "representation_size",
            "box_head_convs", "box_head_fcs", "mask_head_convs", "mask_head_channels", "head_norm",
            "detections_per_image", "box_coder_weights",
        )},
        "box_score_threshold": "score_threshold",
        "box_nms_threshold": "nms_threshold",
        "box_fg_iou_threshold": "fg_iou_threshold",
        "box_bg_iou_threshold": "bg_iou_threshold",
        "box_batch_size_per_image": "batch_size_per_image",
        "box_positive_fraction": "positive_fraction",
        "box_gt_jitter_copies": "gt_jitter_copies",
        "box_gt_jitter_std": "gt_jitter_std",
    },
    "transform_config": {
        name: name for name in ("image_mean", "image_std", "min_size", "max_size", "size_divisible", "mask_threshold")
    },
}


def stage_arguments(group: str, flat: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings of ``group`` in ``flat`` (MaskRCNN's flat arguments) under the stage's own
    names: the keywords the constructor builds that stage with."""
    return {stage: flat[model] for model, stage in STAGE_SETTINGS[group].items()}


def flatten_stage_settings(
    groups: Mapping[str, Optional[Mapping[str, Any]]], flat: Mapping[str, Any], defaults: Mapping[str, Any]
) -> Dict[str, Any]:
    """``flat`` (MaskRCNN's flat arguments) updated from grouped ones (``{"rpn_config": {"nms_threshold":
    0.6}, ...}``, keys as :data:`STAGE_SETTINGS` names them). A setting given both ways with
    different values, or a key a group does not have, is an error that names it."""
    merged = dict(flat)
    for group, settings in groups.items():
        names = {stage: model for model, stage in STAGE_SETTINGS[group].items()}
        for key, value in (settings or {}).items():
            if key not in names:
                raise ValueError(f"{group} has no setting {key!r}; its settings are {sorted(names)}.")
            model_name = names[key]
            if flat[model_name] != defaults[model_name] and flat[model_name] != value:
                raise ValueError(
                    f"{model_name}={flat[model_name]!r} and {group}[{key!r}]={value!r} disagree: give it once."
                )
            merged[model_name] = value
    return merged


def group_stage_settings(config: Mapping[str, Any]) -> Dict[str, Any]:
    """A flat ``MaskRCNN.get_config()`` regrouped by stage: the same model is
    ``MaskRCNN(**group_stage_settings(config))``."""
    grouped = {key: value for key, value in config.items() if not any(key in g for g in STAGE_SETTINGS.values())}
    for group, names in STAGE_SETTINGS.items():
        grouped[group] = {stage: config[model] for model, stage in names.items() if model in config}
    return grouped


def flat_settings(model) -> Dict[str, Any]:
    """torchvision's flat hyperparameters of a ``MaskRCNN``, read from the stages that own them
    (its ``get_config`` without Keras' own keys and the injected heads)."""
    rpn, roi_heads = model.rpn, model.roi_heads
    proposals, detections = rpn.proposal_layer, roi_heads.detection_layer
    return {
        "num_classes": model.num_classes,
        "backbone": model._backbone_config,
        "trainable_backbone_layers": model.trainable_backbone_layers,
        "backbone_norm": model.backbone_norm,
        "backbone_stage_channels": None if model.backbone_stage_channels is None else list(model.backbone_stage_channels),
        "fpn_norm": model.fpn.norm,
        "anchor_sizes": list(model.anchor_sizes),
        "aspect_ratios": list(model.aspect_ratios),
        "rpn_pre_nms_top_n_train": proposals.pre_nms_top_n_train,
        "rpn_pre_nms_top_n_test": proposals.pre_nms_top_n_test,
        "rpn_post_nms_top_n_train": proposals.post_nms_top_n_train,
        "rpn_post_nms_top_n_test": proposals.post_nms_top_n_test,
        "rpn_nms_threshold": proposals.nms_threshold,
        "rpn_min_size": proposals.min_size,
        "rpn_fg_iou_threshold": rpn.fg_iou_threshold,
        "rpn_bg_iou_threshold": rpn.bg_iou_threshold,
        "rpn_batch_size_per_image": rpn.batch_size_per_image,
        "rpn_positive_fraction": rpn.positive_fraction,
        "box_roi_size": model.box_roi_size,
        "mask_roi_size": model.mask_roi_size,
        "sampling_ratio": roi_heads.box_roi_align.sampling_ratio,
        "aligned": roi_heads.box_roi_align.aligned,
        "box_score_threshold": detections.score_threshold,
        "box_nms_threshold": detections.nms_threshold,
        "detections_per_image": detections.max_detections,
        "box_fg_iou_threshold": roi_heads.fg_iou_threshold,
        "box_bg_iou_threshold": roi_heads.bg_iou_threshold,
        "box_batch_size_per_image": roi_heads.sampler.batch_size_per_image,
        "box_positive_fraction": roi_heads.sampler.positive_fraction,
        "box_gt_jitter_copies": roi_heads.gt_jitter_copies,
        "box_gt_jitter_std": roi_heads.gt_jitter_std,
        "box_coder_weights": list(roi_heads.box_coder.weights),
        "mask_threshold": model.mask_threshold,
        "mask_output": model.mask_output,
        "image_mean": list(model.image_mean),
        "image_std": list(model.image_std),
        "min_size": model.min_size,
        "max_size": model.max_size,
        "size_divisible": model.size_divisible,
        "gt_mask_size": model.gt_mask_size,
        "jit_compile_masks": model.jit_compile_masks,
        # Only weights that differ from 1.0: a default model's config is what it was before.
        "loss_weights": {name: w for name, w in model.loss_weights.items() if w != 1.0} or None,
        **model._head_settings,
    }
