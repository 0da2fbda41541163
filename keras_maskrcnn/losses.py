"""Mask R-CNN losses with torchvision's reductions (each term is a mean over sampled items)."""
from __future__ import annotations

import tensorflow as tf


def smooth_l1(x: tf.Tensor, beta: float = 1.0 / 9) -> tf.Tensor:
    """Elementwise smooth L1 (Huber with transition ``beta``), as ``torch.nn.functional.smooth_l1_loss``."""
    ax = tf.abs(x)
    return tf.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def rpn_losses(objectness, deltas, labels, box_targets, positive, sampled):
    """Objectness BCE over sampled anchors and smooth-L1 over positive ones, both divided by the
    number of sampled anchors in the batch. Inputs ``[B, A]`` / ``[B, A, 4]``."""
    sampled_f = tf.cast(sampled, tf.float32)
    count = tf.maximum(tf.reduce_sum(sampled_f), 1.0)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=objectness)
    objectness_loss = tf.reduce_sum(bce * sampled_f) / count
    box = tf.reduce_sum(smooth_l1(deltas - box_targets), axis=-1)
    box_loss = tf.reduce_sum(box * tf.cast(positive, tf.float32)) / count
    return objectness_loss, box_loss


def box_head_losses(class_logits, box_deltas, labels, box_targets, valid, positive):
    """Cross-entropy over valid sampled RoIs and class-specific smooth-L1 over positive ones, both
    divided by the number of sampled RoIs. ``class_logits [B, R, K+1]``, ``box_deltas [B, R, K+1, 4]``."""
    valid_f = tf.cast(valid, tf.float32)
    count = tf.maximum(tf.reduce_sum(valid_f), 1.0)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=class_logits)
    class_loss = tf.reduce_sum(ce * valid_f) / count
    deltas = tf.gather(box_deltas, labels, axis=2, batch_dims=2)  # [B, R, 4]
    box = tf.reduce_sum(smooth_l1(deltas - box_targets), axis=-1)
    box_loss = tf.reduce_sum(box * tf.cast(positive, tf.float32)) / count
    return class_loss, box_loss


def own_class_mask_logits(mask_logits, labels):
    """``[B, R, S, S]``: each RoI's mask logits of its own class (``mask_logits [B, R, S, S, K+1]``;
    returned as is when already ``[B, R, S, S]``)."""
    if mask_logits.shape.rank == 5:
        return tf.gather(tf.transpose(mask_logits, [0, 1, 4, 2, 3]), labels, axis=2, batch_dims=2)
    return mask_logits


def mask_loss(mask_logits, labels, targets, positive):
    """Per-pixel BCE of each positive RoI's own-class mask logits, averaged over positives and pixels.

    ``mask_logits [B, R, S, S, K+1]`` (or ``[B, R, S, S]``, already each RoI's own class),
    ``labels [B, R]``, ``targets [B, R, S, S]``, ``positive [B, R]``.
    """
    logits = own_class_mask_logits(mask_logits, labels)
    bce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits), axis=[2, 3])
    positive_f = tf.cast(positive, tf.float32)
    return tf.reduce_sum(bce * positive_f) / tf.maximum(tf.reduce_sum(positive_f), 1.0)
