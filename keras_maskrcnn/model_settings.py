"""The flat, torchvision-named views of a :class:`~keras_maskrcnn.model.MaskRCNN`'s settings and
parts: the stages own them (``model.rpn``, ``model.roi_heads``), these read them back."""
from __future__ import annotations


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
    representation_size = property(lambda self: self._head_settings["representation_size"])
    mask_head_convs = property(lambda self: self._head_settings["mask_head_convs"])
    mask_head_channels = property(lambda self: self._head_settings["mask_head_channels"])
