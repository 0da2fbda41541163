"""What detectron2 logs besides the losses while Mask R-CNN trains: how the RoI heads are doing on
the RoIs they were trained on in this batch.

Each statistic is a ratio of counts, kept as ``(numerator, denominator)`` so that a global batch
split over replicas gives the same value as one device (counts are summed over replicas before
dividing):

* ``fg_fraction``: foreground RoIs among the sampled RoIs (detectron2's ``roi_head/num_fg_samples``
  over ``num_fg + num_bg``; at most the sampler's ``positive_fraction``).
* ``class_accuracy``: sampled RoIs whose highest class logit is their label (``fast_rcnn/cls_accuracy``).
* ``mask_accuracy``: mask pixels of the foreground RoIs whose prediction (own-class logit > 0)
  equals the target (> 0.5) (``mask_rcnn/accuracy``).
* ``mask_false_positive``: of the pixels whose target is background, the share predicted
  foreground (``mask_rcnn/false_positive``); ``mask_false_negative``: of the target's foreground
  pixels, the share predicted background (``mask_rcnn/false_negative``).
"""
from __future__ import annotations

from typing import Dict, Tuple

import tensorflow as tf

STATISTIC_NAMES = ("fg_fraction", "class_accuracy", "mask_accuracy", "mask_false_positive", "mask_false_negative")
Ratio = Tuple[tf.Tensor, tf.Tensor]


def box_head_statistics(class_logits: tf.Tensor, labels: tf.Tensor, valid: tf.Tensor, positive: tf.Tensor) -> Dict[str, Ratio]:
    """``fg_fraction`` and ``class_accuracy`` of the sampled RoIs: ``class_logits [B, R, K+1]``,
    ``labels [B, R]`` int (0 background), ``valid`` / ``positive [B, R]`` bool."""
    valid_f = tf.cast(valid, tf.float32)
    sampled = tf.reduce_sum(valid_f)
    correct = tf.cast(tf.equal(tf.argmax(class_logits, axis=-1, output_type=tf.int32), tf.cast(labels, tf.int32)), tf.float32)
    return {
        "fg_fraction": (tf.reduce_sum(tf.cast(positive, tf.float32) * valid_f), sampled),
        "class_accuracy": (tf.reduce_sum(correct * valid_f), sampled),
    }


def mask_statistics(logits: tf.Tensor, targets: tf.Tensor, positive: tf.Tensor) -> Dict[str, Ratio]:
    """``mask_accuracy``, ``mask_false_positive`` and ``mask_false_negative`` over the pixels of the
    foreground RoIs: ``logits`` / ``targets [B, R, S, S]`` (each RoI's own-class logits; targets in
    [0, 1]), ``positive [B, R]`` bool."""
    weight = tf.cast(positive, tf.float32)[:, :, None, None]
    predicted = tf.cast(logits > 0.0, tf.float32)
    target = tf.cast(targets > 0.5, tf.float32)
    wrong = tf.abs(predicted - target) * weight
    foreground = target * weight
    background = (1.0 - target) * weight
    pixels = tf.reduce_sum(foreground) + tf.reduce_sum(background)
    return {
        "mask_accuracy": (pixels - tf.reduce_sum(wrong), pixels),
        "mask_false_positive": (tf.reduce_sum(wrong * background), tf.reduce_sum(background)),
        "mask_false_negative": (tf.reduce_sum(wrong * foreground), tf.reduce_sum(foreground)),
    }


def ratio(numerator: tf.Tensor, denominator: tf.Tensor) -> tf.Tensor:
    """``numerator / denominator``, 0 where nothing was counted."""
    return tf.math.divide_no_nan(numerator, denominator)
