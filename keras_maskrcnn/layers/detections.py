"""Final detections from the box head, as torchvision's ``RoIHeads.postprocess_detections``."""
from __future__ import annotations

from typing import Dict, Sequence

import keras
import tensorflow as tf

from keras_maskrcnn import boxes as box_ops


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class DetectionLayer(keras.layers.Layer):
    """Class-specific decoding, score threshold, per-class NMS and the top detections.

    Every (proposal, class) pair is a candidate: its box is the proposal decoded with that class's
    deltas (weights ``box_coder_weights``) and clipped to the image, its score the softmax
    probability. Candidates with score ``<= score_threshold`` or a side below ``min_size`` are
    dropped, NMS at ``nms_threshold`` runs within each class, and the ``max_detections`` best
    survivors over all classes are kept, sorted by decreasing score.

    Call arguments:
        class_logits: ``[B, N, K + 1]``; box_deltas: ``[B, N, K + 1, 4]``;
        proposals: ``[B, N, 4]`` ``(x1, y1, x2, y2)`` input pixels; num_proposals: ``[B]`` int;
        image_sizes: ``[B, 2]`` int (height, width).

    Returns:
        dict with ``boxes [B, D, 4]`` float32, ``scores [B, D]`` float32, ``classes [B, D]``
        int32 (1-based, 0 in padding rows) and ``num_detections [B]`` int32, ``D = max_detections``.
    """

    def __init__(
        self,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        min_size: float = 1e-2,
        box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections
        self.min_size = min_size
        self.box_coder_weights = tuple(float(w) for w in box_coder_weights)
        self.built = True

    def call(self, class_logits, box_deltas, proposals, num_proposals, image_sizes) -> Dict[str, tf.Tensor]:
        num_classes = class_logits.shape[-1] - 1
        scores = tf.nn.softmax(tf.cast(class_logits, tf.float32), axis=-1)[:, :, 1:]
        boxes = box_ops.decode_boxes(box_deltas[:, :, 1:], proposals[:, :, None, :], self.box_coder_weights)
        shape = tf.shape(boxes)
        batch, num = shape[0], shape[1]
        boxes = box_ops.clip_boxes(tf.reshape(boxes, [batch, -1, 4]), image_sizes)
        boxes = tf.reshape(boxes, [batch, num, num_classes, 4])
        valid_proposal = tf.sequence_mask(num_proposals, num)
        keep = tf.logical_and(valid_proposal[:, :, None], box_ops.small_box_mask(boxes, self.min_size))
        scores = tf.where(keep, scores, 0.0)
        nms_boxes, nms_scores, nms_classes, num_detections = tf.image.combined_non_max_suppression(
            boxes,
            scores,
            max_output_size_per_class=self.max_detections,
            max_total_size=self.max_detections,
            iou_threshold=self.nms_threshold,
            score_threshold=self.score_threshold,
            pad_per_class=False,
            clip_boxes=False,
        )
        row_valid = tf.sequence_mask(num_detections, self.max_detections)
        classes = tf.where(row_valid, tf.cast(nms_classes, tf.int32) + 1, 0)
        return {
            "boxes": nms_boxes,
            "scores": nms_scores,
            "classes": classes,
            "num_detections": tf.cast(num_detections, tf.int32),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "score_threshold": self.score_threshold,
                "nms_threshold": self.nms_threshold,
                "max_detections": self.max_detections,
                "min_size": self.min_size,
                "box_coder_weights": list(self.box_coder_weights),
            }
        )
        return config
