"""Matching predictions to ground truth and sampling them for training (torchvision's ``Matcher``
and ``BalancedPositiveNegativeSampler``), batched with static shapes.

Match codes: a non-negative value is the index of the matched ground truth; :data:`BACKGROUND`
(-1) is an IoU below the low threshold, :data:`IGNORE` (-2) one between the thresholds.
"""
from __future__ import annotations

from typing import Tuple

import tensorflow as tf

BACKGROUND = -1
IGNORE = -2


def match(
    iou: tf.Tensor,
    gt_valid: tf.Tensor,
    high_threshold: float,
    low_threshold: float,
    allow_low_quality_matches: bool,
) -> tf.Tensor:
    """torchvision's ``Matcher``: the ground truth each prediction matches, or a negative code.

    Args:
        iou: ``[B, N, G]`` IoU of predictions (anchors or proposals) with ground truth.
        gt_valid: ``[B, G]`` bool, False for padding rows.
        high_threshold: IoU at or above which a prediction is foreground.
        low_threshold: IoU below which it is background; in between it is ignored.
        allow_low_quality_matches: also make foreground, for each ground truth, the predictions
            with its highest IoU (ties included), matched to their own best ground truth.

    Returns:
        ``[B, N]`` int32: the matched ground truth index, ``BACKGROUND`` (-1) or ``IGNORE`` (-2).
    """
    iou = tf.where(gt_valid[:, None, :], iou, -1.0)
    best = tf.reduce_max(iou, axis=2)
    best_gt = tf.argmax(iou, axis=2, output_type=tf.int32)
    matches = tf.where(best < low_threshold, BACKGROUND, tf.where(best < high_threshold, IGNORE, best_gt))
    if allow_low_quality_matches:
        best_per_gt = tf.reduce_max(iou, axis=1, keepdims=True)  # [B, 1, G]
        is_best = tf.logical_and(tf.equal(iou, best_per_gt), gt_valid[:, None, :])
        # A ground truth with no overlap at all (best IoU 0) gives no low-quality match.
        is_best = tf.logical_and(is_best, best_per_gt > 0.0)
        matches = tf.where(tf.reduce_any(is_best, axis=2), best_gt, matches)
    # No ground truth at all: everything is background.
    return tf.where(tf.reduce_any(gt_valid, axis=1, keepdims=True), matches, BACKGROUND)


def _random_top(candidates: tf.Tensor, counts: tf.Tensor, k: int, seed=None) -> tf.Tensor:
    """``[B, N]`` bool choosing ``counts [B]`` (at most ``k``) random True entries of each row."""
    noise = tf.random.uniform(tf.shape(candidates), seed=seed)
    keyed = tf.where(candidates, noise, -1.0)
    k = tf.minimum(k, tf.shape(candidates)[1])
    _, idx = tf.math.top_k(keyed, k=k)
    take = tf.sequence_mask(counts, k)
    batch = tf.shape(candidates)[0]
    b = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(idx))
    scatter_idx = tf.stack([tf.boolean_mask(b, take), tf.boolean_mask(idx, take)], axis=1)
    return tf.scatter_nd(scatter_idx, tf.ones(tf.shape(scatter_idx)[:1], tf.bool), tf.shape(candidates))


def balanced_sample(
    matches: tf.Tensor, valid: tf.Tensor, batch_size_per_image: int, positive_fraction: float
) -> Tuple[tf.Tensor, tf.Tensor]:
    """torchvision's ``BalancedPositiveNegativeSampler`` over ``matches [B, N]``.

    Takes up to ``batch_size_per_image * positive_fraction`` random foreground entries and fills
    up to ``batch_size_per_image`` with random background entries. Returns ``(positive, negative)``
    ``[B, N]`` bool masks.
    """
    positive = tf.logical_and(matches >= 0, valid)
    negative = tf.logical_and(tf.equal(matches, BACKGROUND), valid)
    max_positive = int(batch_size_per_image * positive_fraction)
    num_pos = tf.minimum(tf.reduce_sum(tf.cast(positive, tf.int32), axis=1), max_positive)
    num_neg = tf.minimum(
        tf.reduce_sum(tf.cast(negative, tf.int32), axis=1), batch_size_per_image - num_pos
    )
    return (
        _random_top(positive, num_pos, max_positive),
        _random_top(negative, num_neg, batch_size_per_image),
    )


class Matcher:
    """torchvision's ``Matcher`` with its thresholds: ``matcher(iou [B, N, G], gt_valid [B, G])``
    gives ``[B, N]`` int32 match codes (see :func:`match`)."""

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} must not exceed high_threshold {high_threshold}.")
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, iou: tf.Tensor, gt_valid: tf.Tensor) -> tf.Tensor:
        return match(iou, gt_valid, self.high_threshold, self.low_threshold, self.allow_low_quality_matches)


class BalancedPositiveNegativeSampler:
    """torchvision's ``BalancedPositiveNegativeSampler``: ``sampler(matches [B, N], valid [B, N])``
    gives ``(positive, negative)`` ``[B, N]`` bool masks (see :func:`balanced_sample`)."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        if batch_size_per_image < 1 or not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(
                f"batch_size_per_image must be >= 1 and positive_fraction in [0, 1], got "
                f"{batch_size_per_image} and {positive_fraction}."
            )
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    @property
    def max_positive(self) -> int:
        """Positives taken per image at most."""
        return int(self.batch_size_per_image * self.positive_fraction)

    def __call__(self, matches: tf.Tensor, valid: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        return balanced_sample(matches, valid, self.batch_size_per_image, self.positive_fraction)
