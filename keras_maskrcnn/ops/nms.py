"""Batched non-maximum suppression with torchvision's rule (IoU > threshold suppresses)."""
from __future__ import annotations

from typing import Optional, Tuple

import tensorflow as tf


def batched_nms(
    boxes: tf.Tensor,
    scores: tf.Tensor,
    max_output_size: int,
    iou_threshold: float,
    groups: Optional[tf.Tensor] = None,
    valid: Optional[tf.Tensor] = None,
) -> Tuple[tf.Tensor, tf.Tensor]:
    """Greedy NMS over a batch, independently within each group (class or pyramid level).

    Args:
        boxes: ``[B, N, 4]`` float boxes ``(x1, y1, x2, y2)``.
        scores: ``[B, N]`` float scores; higher is kept first.
        max_output_size: how many indices to return per image (static).
        iou_threshold: a box is suppressed by a kept box when their IoU is greater than this.
        groups: optional ``[B, N]`` int group ids; boxes of different groups never suppress each
            other (torchvision's ``batched_nms``, done with the same coordinate-offset trick).
        valid: optional ``[B, N]`` bool; invalid boxes are never selected.

    Returns:
        ``indices [B, max_output_size]`` int32 into ``N``, sorted by decreasing score (padding
        rows are 0), and ``num_valid [B]`` int32.
    """
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    # tf.image.non_max_suppression_padded counts a selected box with no coordinate > 0 as padding
    # and drops it (a box wholly above and left of the origin): move every image's boxes to
    # coordinates >= 1 first (IoU does not change under translation).
    boxes = boxes - tf.minimum(tf.reduce_min(boxes, axis=[1, 2], keepdims=True), 0.0) + 1.0
    if groups is not None:
        # Shift each group far away from every other so their boxes cannot overlap.
        extent = tf.reduce_max(boxes) + 1.0
        offsets = tf.cast(groups, tf.float32) * 2.0 * extent
        boxes = boxes + offsets[..., None]
    score_threshold = float("-inf")
    if valid is not None:
        lowest = tf.float32.min
        scores = tf.where(valid, scores, lowest)
        score_threshold = lowest  # strictly-greater test drops the invalid ones
    num_boxes = tf.shape(boxes)[1]
    # The op rejects max_output_size > N; pad with invalid boxes instead of shrinking the output.
    pad = tf.maximum(max_output_size - num_boxes, 0)
    boxes = tf.pad(boxes, [[0, 0], [0, pad], [0, 0]])
    scores = tf.pad(scores, [[0, 0], [0, pad]], constant_values=tf.float32.min)
    if score_threshold == float("-inf"):
        score_threshold = tf.float32.min
    indices, num_valid = tf.image.non_max_suppression_padded(
        boxes,
        scores,
        max_output_size,
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        pad_to_max_output_size=True,
    )
    indices = tf.where(tf.sequence_mask(num_valid, max_output_size), indices, 0)
    return indices, num_valid
