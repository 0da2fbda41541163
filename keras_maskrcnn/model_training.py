"""How :class:`~keras_maskrcnn.model.MaskRCNN` trains with ``model.fit``: the five losses from its
stages, their reduction over replicas, and Keras' ``train_step`` / ``test_step``, which also log
detectron2's training statistics of the RoI heads (:mod:`keras_maskrcnn.training_statistics`)."""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import keras
import tensorflow as tf

from keras_maskrcnn import distribute
from keras_maskrcnn.training_statistics import STATISTIC_NAMES, ratio

LOSS_NAMES = ("rpn_objectness_loss", "rpn_box_loss", "class_loss", "box_loss", "mask_loss")


def checked_loss_weights(loss_weights: Optional[Mapping[str, float]]) -> Dict[str, float]:
    """Every loss's weight (1.0 where ``loss_weights`` names none); ``ValueError`` for an unknown
    name or a weight that is negative or not finite."""
    loss_weights = dict(loss_weights or {})
    unknown = sorted(set(loss_weights) - set(LOSS_NAMES))
    if unknown:
        raise ValueError(f"loss_weights: unknown loss name(s) {unknown}; the losses are {list(LOSS_NAMES)}.")
    weights = {name: float(loss_weights.get(name, 1.0)) for name in LOSS_NAMES}
    bad = {name: w for name, w in weights.items() if not (math.isfinite(w) and w >= 0.0)}
    if bad:
        raise ValueError(f"loss_weights must be finite and >= 0, got {bad}.")
    return weights


def _split(data):
    if not isinstance(data, (tuple, list)) or len(data) < 2:
        raise ValueError(
            f"Training data must be (inputs, targets) pairs as made by keras_maskrcnn.data; got {type(data).__name__}."
        )
    return data[0], data[1]


class TrainingSteps:
    """Mixin of ``MaskRCNN``: needs ``self.rpn``, ``self.roi_heads``, ``self._unpack`` and ``self._features``."""

    def _init_loss_trackers(self):
        self._loss_trackers = [keras.metrics.Mean(name=name) for name in ("loss",) + LOSS_NAMES]
        self._statistic_trackers = [keras.metrics.Mean(name=name) for name in STATISTIC_NAMES]

    def compute_losses(self, inputs, targets: Mapping[str, tf.Tensor], training: bool = True) -> Dict[str, tf.Tensor]:
        """The five Mask R-CNN losses for a batch (see :mod:`keras_maskrcnn.data` for the format).

        ``targets``: ``boxes [B, G, 4]`` (x1, y1, x2, y2) in input pixels, ``classes [B, G]`` int
        (0 = padding), ``masks [B, G, N, N]`` box-relative ground-truth coverage masks (uint8,
        255 = covered; see :mod:`keras_maskrcnn.data`).

        Each loss is a mean over the items sampled from this batch; under a ``tf.distribute``
        strategy with several replicas it becomes this replica's share of the mean over the GLOBAL
        batch (sum here / count summed over replicas), so that the optimizer's sum of the replicas'
        gradients is the gradient of the global-batch loss (:mod:`keras_maskrcnn.distribute`).
        """
        return self._losses_and_statistics(inputs, targets, training)[0]

    def _losses_and_statistics(self, inputs, targets, training):
        """:meth:`compute_losses` and this replica's ``(numerator, denominator)`` of each training statistic."""
        images, image_sizes = self._unpack(inputs)
        gt_boxes = tf.cast(targets["boxes"], tf.float32)
        gt_valid = tf.cast(targets["classes"], tf.int32) > 0
        padded_shape, features = self._features(images, training=training, image_sizes=image_sizes)
        rpn_outputs = self.rpn(features, padded_shape, image_sizes, training=training)
        rpn_losses, rpn_counts = self.rpn.compute_losses(rpn_outputs, gt_boxes, gt_valid)
        roi_losses, roi_counts, statistics = self.roi_heads.compute_losses(
            features, rpn_outputs["proposals"], rpn_outputs["num_proposals"], targets, image_sizes,
            training=training, statistics=True,
        )
        losses, counts = {**rpn_losses, **roi_losses}, {**rpn_counts, **roi_counts}
        means = tf.stack([tf.cast(losses[name], tf.float32) for name in LOSS_NAMES])
        shares = distribute.global_batch_shares(means, tf.stack([counts[name] for name in LOSS_NAMES]))
        return dict(zip(LOSS_NAMES, tf.unstack(shares))), statistics

    @property
    def metrics(self):
        return list(self._loss_trackers) + list(self._statistic_trackers)

    def _update_trackers(self, total, losses, statistics):
        # Under a strategy each replica holds its share of the global-batch losses: their sum over
        # replicas (one all-reduce) is the global-batch loss, which every replica then records, so
        # the logged metrics are the same on all replicas and workers. A no-op on one replica.
        # The statistics' numerators and denominators are summed in the same all-reduce.
        values = [tf.cast(total, tf.float32)] + [tf.cast(losses[name], tf.float32) for name in LOSS_NAMES]
        values += [tf.cast(part, tf.float32) for name in STATISTIC_NAMES for part in statistics[name]]
        values = tf.unstack(distribute.sum_over_replicas(tf.stack(values)))
        num_losses = len(self._loss_trackers)
        for tracker, value in zip(self._loss_trackers, values[:num_losses]):
            tracker.update_state(value)
        parts = values[num_losses:]
        for index, tracker in enumerate(self._statistic_trackers):
            tracker.update_state(ratio(parts[2 * index], parts[2 * index + 1]))
        results = {tracker.name: tracker.result() for tracker in self.metrics}
        if distribute.is_multi_worker():
            # Keras reduces step outputs over workers with strategy.reduce("MEAN", axis=0), which
            # needs a leading axis; the mean of identical values is the value.
            results = {name: tf.reshape(value, [1]) for name, value in results.items()}
        return results

    _split = staticmethod(_split)

    def train_step(self, data):
        """One optimisation step on a batch (under a strategy: on this replica's share of it).

        The optimizer sums the replicas' gradients, so every term is this replica's share of the
        global-batch loss: :meth:`compute_losses` returns shares, and regularisation losses are
        divided by the number of replicas. The returned metrics are global-batch values.
        """
        if not self.built:  # fit() does not call the model, so build it here
            self.build()
        inputs, targets = _split(data)
        with tf.GradientTape() as tape:
            losses, statistics = self._losses_and_statistics(inputs, targets, training=True)
            total = self._weighted_total(losses)
            if self.losses:
                regularization = tf.cast(tf.add_n(self.losses), total.dtype)
                total = total + regularization / float(distribute.num_replicas_in_sync())
            scaled = self.optimizer.scale_loss(total)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
        return self._update_trackers(total, losses, statistics)

    def test_step(self, data):
        if not self.built:  # fit() does not call the model, so build it here
            self.build()
        inputs, targets = _split(data)
        losses, statistics = self._losses_and_statistics(inputs, targets, training=False)
        return self._update_trackers(self._weighted_total(losses), losses, statistics)

    def _weighted_total(self, losses: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """The loss training minimises: the sum of the losses times :attr:`loss_weights`."""
        return tf.add_n([losses[name] * self.loss_weights[name] for name in LOSS_NAMES])
