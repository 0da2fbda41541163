"""Turns RPN outputs into proposals, as torchvision's ``RegionProposalNetwork.filter_proposals``."""
from __future__ import annotations

from typing import Sequence, Tuple

import keras
import tensorflow as tf

from keras_maskrcnn import boxes as box_ops
from keras_maskrcnn.ops.nms import batched_nms


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class ProposalLayer(keras.layers.Layer):
    """Decode, clip, per-level top-k, per-level NMS and overall top-k of RPN outputs.

    For each image and pyramid level the ``pre_nms_top_n`` anchors with the highest objectness
    are decoded (box coder weights 1, 1, 1, 1), clipped to the image, boxes with a side below
    ``min_size`` dropped, NMS at ``nms_threshold`` run within each level, and the
    ``post_nms_top_n`` best survivors over all levels kept, sorted by decreasing score.
    Training and inference use different top-k values, as in torchvision.

    Call arguments:
        objectness: ``[B, A_total]`` float32 logits; deltas: ``[B, A_total, 4]`` float32;
        anchors: list of ``[A_i, 4]`` per level (``sum A_i = A_total``), input pixels;
        image_sizes: ``[B, 2]`` int (height, width) of each image's valid region;
        training: selects the train or test top-k values.

    Returns:
        ``proposals [B, post_nms_top_n, 4]`` float32 ``(x1, y1, x2, y2)`` in input pixels
        (gradient stopped), ``scores [B, post_nms_top_n]`` (sigmoid objectness), and
        ``num_proposals [B]`` int32; rows past ``num_proposals`` are zero.
    """

    def __init__(
        self,
        pre_nms_top_n_train: int = 2000,
        pre_nms_top_n_test: int = 1000,
        post_nms_top_n_train: int = 2000,
        post_nms_top_n_test: int = 1000,
        nms_threshold: float = 0.7,
        min_size: float = 1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.pre_nms_top_n_train = pre_nms_top_n_train
        self.pre_nms_top_n_test = pre_nms_top_n_test
        self.post_nms_top_n_train = post_nms_top_n_train
        self.post_nms_top_n_test = post_nms_top_n_test
        self.nms_threshold = nms_threshold
        self.min_size = min_size
        self.built = True

    def call(
        self,
        objectness: tf.Tensor,
        deltas: tf.Tensor,
        anchors: Sequence[tf.Tensor],
        image_sizes: tf.Tensor,
        training: bool = False,
    ) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        pre_nms_top_n = self.pre_nms_top_n_train if training else self.pre_nms_top_n_test
        post_nms_top_n = self.post_nms_top_n_train if training else self.post_nms_top_n_test
        objectness = tf.stop_gradient(tf.cast(objectness, tf.float32))
        deltas = tf.stop_gradient(tf.cast(deltas, tf.float32))

        level_boxes, level_logits, level_ids = [], [], []
        start = 0
        for level, level_anchors in enumerate(anchors):
            count = tf.shape(level_anchors)[0]
            logits = objectness[:, start : start + count]
            level_deltas = deltas[:, start : start + count]
            start = start + count
            k = tf.minimum(pre_nms_top_n, count)
            top_logits, top_idx = tf.math.top_k(logits, k=k)
            boxes = box_ops.decode_boxes(
                tf.gather(level_deltas, top_idx, batch_dims=1), tf.gather(level_anchors, top_idx)
            )
            level_boxes.append(boxes)
            level_logits.append(top_logits)
            level_ids.append(tf.fill(tf.shape(top_idx), level))
        boxes = box_ops.clip_boxes(tf.concat(level_boxes, axis=1), image_sizes)
        # torchvision ranks by probability in NMS; keeping that (not logits) keeps its tie order.
        scores = tf.sigmoid(tf.concat(level_logits, axis=1))
        levels = tf.concat(level_ids, axis=1)
        valid = box_ops.small_box_mask(boxes, self.min_size)
        keep, num = batched_nms(boxes, scores, post_nms_top_n, self.nms_threshold, groups=levels, valid=valid)
        row_valid = tf.sequence_mask(num, post_nms_top_n)
        proposals = tf.where(row_valid[..., None], tf.gather(boxes, keep, batch_dims=1), 0.0)
        proposal_scores = tf.where(row_valid, tf.gather(scores, keep, batch_dims=1), 0.0)
        return proposals, proposal_scores, num

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "pre_nms_top_n_train": self.pre_nms_top_n_train,
                "pre_nms_top_n_test": self.pre_nms_top_n_test,
                "post_nms_top_n_train": self.post_nms_top_n_train,
                "post_nms_top_n_test": self.post_nms_top_n_test,
                "nms_threshold": self.nms_threshold,
                "min_size": self.min_size,
            }
        )
        return config
