"""The RoI-heads stage (torchvision's ``roi_heads.RoIHeads``): box and mask pooling, the box and mask
heads, detections, and in training RoI sampling, box and mask targets and their losses."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import keras
import tensorflow as tf

from keras_maskrcnn import losses as loss_fns
from keras_maskrcnn import targets as target_fns
from keras_maskrcnn.boxes import BoxCoder
from keras_maskrcnn.layers.box_head import BoxHead
from keras_maskrcnn.layers.detections import DetectionLayer
from keras_maskrcnn.layers.mask_head import MaskHead
from keras_maskrcnn.layers.roi_align import MultiLevelROIAlign
from keras_maskrcnn.matching import BalancedPositiveNegativeSampler
from keras_maskrcnn.rpn import as_layer
from keras_maskrcnn.training_statistics import box_head_statistics, mask_statistics

# The pyramid levels RoIs are pooled from (torchvision's MultiScaleRoIAlign featmap_names).
ROI_LEVELS = ("P2", "P3", "P4", "P5")


def positive_slots(positive: tf.Tensor, count: int) -> tf.Tensor:
    """``[B, count]`` int32 indices of the first ``count`` positive entries of ``positive [B, R]``
    (in their order), padded with indices of non-positive entries; the mask head's RoIs."""
    r = tf.shape(positive)[1]
    # Positives keep their order ahead of everything else: key 2R - i for positives, R - i else.
    rank = tf.range(r, 0, -1)[None, :] + tf.cast(positive, tf.int32) * r
    return tf.math.top_k(rank, k=count).indices


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class RoIHeads(keras.layers.Layer):
    """Box and mask predictions for proposals; in training, their sampling, targets and losses.

    Args:
        box_roi_align, mask_roi_align: :class:`~keras_maskrcnn.layers.roi_align.MultiLevelROIAlign`
            poolers over ``"P2".."P5"`` (:data:`ROI_LEVELS`).
        box_head: maps pooled ``[B, N, S, S, C]`` features to ``(class_logits [B, N, K + 1],
            box_deltas [B, N, K + 1, 4])`` (:class:`~keras_maskrcnn.layers.box_head.BoxHead` or
            any layer with that contract, taking ``training`` and ``valid``).
        mask_head: maps pooled ``[B, N, M, M, C]`` features and ``classes [B, N]`` to the mask
            logits of those classes ``[B, N, 2M, 2M]`` (:class:`~keras_maskrcnn.layers.mask_head.MaskHead`
            or any layer with that contract); the targets take the size of its output.
        detection_layer: :class:`~keras_maskrcnn.layers.detections.DetectionLayer` (score
            threshold, class-wise NMS, top detections; holds the box coder of inference).
        fg_iou_threshold, bg_iou_threshold: proposals with IoU ``>= fg`` with a ground truth are
            foreground, ``< bg`` background.
        batch_size_per_image, positive_fraction: RoIs sampled per image and their foreground share.
        gt_jitter_copies, gt_jitter_std: jittered copies of each ground truth box added to the
            RoI candidates in training (:func:`keras_maskrcnn.targets.sample_rois`; 0, torchvision's
            rule, adds none).

    Call arguments:
        features: dict of NHWC maps including ``"P2".."P5"``.
        proposals: ``[B, P, 4]`` ``(x1, y1, x2, y2)`` input pixels; num_proposals: ``[B]`` int32.
        image_sizes: ``[B, 2]`` int (height, width).

    Returns (inference):
        the detection layer's dict (``boxes``, ``scores``, ``classes``, ``num_detections``) plus
        ``masks [B, D, 2M, 2M]`` float32 box-relative probabilities of each detection's class.
    """

    def __init__(
        self,
        box_roi_align: Union[keras.layers.Layer, Mapping[str, Any]],
        box_head: Union[keras.layers.Layer, Mapping[str, Any]],
        mask_roi_align: Union[keras.layers.Layer, Mapping[str, Any]],
        mask_head: Union[keras.layers.Layer, Mapping[str, Any]],
        detection_layer: Union[keras.layers.Layer, Mapping[str, Any]],
        fg_iou_threshold: float = 0.5,
        bg_iou_threshold: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        gt_jitter_copies: int = 0,
        gt_jitter_std: float = 0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.box_roi_align = as_layer(box_roi_align)
        self.box_head = as_layer(box_head)
        self.mask_roi_align = as_layer(mask_roi_align)
        self.mask_head = as_layer(mask_head)
        self.detection_layer = as_layer(detection_layer)
        self.fg_iou_threshold = fg_iou_threshold
        self.bg_iou_threshold = bg_iou_threshold
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        if gt_jitter_copies < 0 or gt_jitter_std < 0:
            raise ValueError(
                f"gt_jitter_copies and gt_jitter_std must be >= 0, got {gt_jitter_copies!r} and {gt_jitter_std!r}."
            )
        self.gt_jitter_copies = int(gt_jitter_copies)
        self.gt_jitter_std = float(gt_jitter_std)

    @property
    def box_coder(self) -> BoxCoder:
        """The RoI heads' box coder (weights ``(10, 10, 5, 5)`` by default), shared by the
        regression targets and the detections."""
        return BoxCoder(self.detection_layer.box_coder_weights)

    def build(self, input_shape=None, channels: Optional[int] = None):
        box_size, mask_size = self.box_roi_align.output_size[0], self.mask_roi_align.output_size[0]
        if not self.box_head.built:
            self.box_head.build((None, None, box_size, box_size, channels))
        if not self.mask_head.built:
            self.mask_head.build((None, None, mask_size, mask_size, channels))
        self.built = True

    def _pool(self, pooler, features, boxes):
        return pooler([features[name] for name in ROI_LEVELS], boxes)

    def call(self, features: Mapping[str, tf.Tensor], proposals, num_proposals, image_sizes) -> Dict[str, tf.Tensor]:
        class_logits, box_deltas = self.box_head(self._pool(self.box_roi_align, features, proposals), training=False)
        detections = self.detection_layer(class_logits, box_deltas, proposals, num_proposals, image_sizes)
        detections["masks"] = self.mask_probabilities(features, detections["boxes"], detections["classes"])
        return detections

    def mask_probabilities(self, features: Mapping[str, tf.Tensor], boxes, classes) -> tf.Tensor:
        """``[B, N, 2M, 2M]`` float32 mask probabilities of each box's class."""
        logits = self.mask_head(self._pool(self.mask_roi_align, features, boxes), classes=classes, training=False)
        return tf.sigmoid(logits)

    def compute_losses(
        self,
        features: Mapping[str, tf.Tensor],
        proposals: tf.Tensor,
        num_proposals: tf.Tensor,
        targets: Mapping[str, tf.Tensor],
        image_sizes: tf.Tensor,
        training: bool = True,
        statistics: bool = False,
    ) -> Tuple[Dict[str, tf.Tensor], ...]:
        """Class, box and mask losses for a batch, with ground truth ``targets`` (``boxes [B, G,
        4]``, ``classes [B, G]`` int with 0 in padding rows, ``masks [B, G, N, N]`` coverage).

        Returns ``(losses, counts)``: ``class_loss`` and ``box_loss`` are means over the sampled
        RoIs, ``mask_loss`` over the foreground RoIs; counts give the number of items of each.
        With ``statistics=True`` also detectron2's training statistics of the heads on this batch
        (:mod:`keras_maskrcnn.training_statistics`, each a ``(numerator, denominator)`` pair).
        """
        gt_boxes = tf.cast(targets["boxes"], tf.float32)
        gt_classes = tf.cast(targets["classes"], tf.int32)
        rois = target_fns.sample_rois(
            proposals,
            num_proposals,
            gt_boxes,
            gt_classes,
            self.fg_iou_threshold,
            self.bg_iou_threshold,
            self.sampler.batch_size_per_image,
            self.sampler.positive_fraction,
            self.box_coder.weights,
            gt_jitter_copies=self.gt_jitter_copies if training else 0,
            gt_jitter_std=self.gt_jitter_std,
            image_sizes=image_sizes,
        )
        pooled = self._pool(self.box_roi_align, features, rois["rois"])
        class_logits, box_deltas = self.box_head(pooled, training=training, valid=rois["valid"])
        class_loss, box_loss = loss_fns.box_head_losses(
            class_logits, box_deltas, rois["labels"], rois["box_targets"], rois["valid"], rois["positive"]
        )

        # The mask head sees the foreground RoIs only: at most max_positive per image.
        slots = positive_slots(rois["positive"], self.sampler.max_positive)
        pos_rois, pos_labels, pos_valid, pos_matched = (
            tf.gather(rois[key], slots, batch_dims=1) for key in ("rois", "labels", "positive", "matched_gt")
        )
        pooled = self._pool(self.mask_roi_align, features, pos_rois)
        mask_logits = self.mask_head(pooled, classes=pos_labels, training=training, valid=pos_valid)
        mask_targets = target_fns.mask_targets(
            pos_rois, pos_matched, gt_boxes, targets["masks"], mask_logits.shape[2], image_sizes
        )
        mask_loss = loss_fns.mask_loss(mask_logits, pos_labels, mask_targets, pos_valid)

        num_rois = tf.reduce_sum(tf.cast(rois["valid"], tf.float32))
        num_pos = tf.reduce_sum(tf.cast(pos_valid, tf.float32))
        losses = {"class_loss": class_loss, "box_loss": box_loss, "mask_loss": mask_loss}
        counts = {"class_loss": num_rois, "box_loss": num_rois, "mask_loss": num_pos}
        if not statistics:
            return losses, counts
        stats = box_head_statistics(class_logits, rois["labels"], rois["valid"], rois["positive"])
        stats.update(mask_statistics(loss_fns.own_class_mask_logits(mask_logits, pos_labels), mask_targets, pos_valid))
        return losses, counts, stats

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "box_roi_align": keras.layers.serialize(self.box_roi_align),
                "box_head": keras.layers.serialize(self.box_head),
                "mask_roi_align": keras.layers.serialize(self.mask_roi_align),
                "mask_head": keras.layers.serialize(self.mask_head),
                "detection_layer": keras.layers.serialize(self.detection_layer),
                "fg_iou_threshold": self.fg_iou_threshold,
                "bg_iou_threshold": self.bg_iou_threshold,
                "batch_size_per_image": self.sampler.batch_size_per_image,
                "positive_fraction": self.sampler.positive_fraction,
                "gt_jitter_copies": self.gt_jitter_copies,
                "gt_jitter_std": self.gt_jitter_std,
            }
        )
        return config


def build_roi_heads(
    num_classes: int,
    box_head: Optional[keras.layers.Layer] = None,
    mask_head: Optional[keras.layers.Layer] = None,
    *,
    channels: int = 256,
    box_roi_size: int = 7,
    mask_roi_size: int = 14,
    sampling_ratio: int = 2,
    aligned: bool = False,
    representation_size: int = 1024,
    box_head_convs: int = 0,
    box_head_fcs: int = 2,
    mask_head_convs: int = 4,
    mask_head_channels: Optional[int] = None,
    head_norm: Optional[str] = None,
    score_threshold: float = 0.05,
    nms_threshold: float = 0.5,
    detections_per_image: int = 100,
    fg_iou_threshold: float = 0.5,
    bg_iou_threshold: float = 0.5,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    box_coder_weights=(10.0, 10.0, 5.0, 5.0),
    gt_jitter_copies: int = 0,
    gt_jitter_std: float = 0.1,
    dtype=None,
) -> RoIHeads:
    """A :class:`RoIHeads` from torchvision's argument names (its defaults are torchvision's v1).
    ``box_head`` / ``mask_head`` replace the default :class:`BoxHead` / :class:`MaskHead`."""
    if box_head is None:
        box_head = BoxHead(
            num_classes,
            representation_size,
            num_convs=box_head_convs,
            conv_channels=channels,
            num_fcs=box_head_fcs,
            norm=head_norm,
            dtype=dtype,
            name="box_head",
        )
    if mask_head is None:
        mask_head = MaskHead(
            num_classes, mask_head_channels or channels, num_convs=mask_head_convs, norm=head_norm, dtype=dtype,
            name="mask_head",
        )
    pooler = dict(sampling_ratio=sampling_ratio, aligned=aligned, dtype=dtype)
    return RoIHeads(
        MultiLevelROIAlign(box_roi_size, name="box_roi_align", **pooler),
        box_head,
        MultiLevelROIAlign(mask_roi_size, name="mask_roi_align", **pooler),
        mask_head,
        DetectionLayer(
            score_threshold, nms_threshold, detections_per_image, box_coder_weights=box_coder_weights, name="detections"
        ),
        fg_iou_threshold=fg_iou_threshold,
        bg_iou_threshold=bg_iou_threshold,
        batch_size_per_image=batch_size_per_image,
        positive_fraction=positive_fraction,
        gt_jitter_copies=gt_jitter_copies,
        gt_jitter_std=gt_jitter_std,
        dtype=dtype,
        name="roi_heads",
    )
