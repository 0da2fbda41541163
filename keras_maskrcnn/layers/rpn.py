"""Region Proposal Network head, as torchvision's ``RPNHead``."""
from __future__ import annotations

from typing import Sequence, Tuple

import keras
import tensorflow as tf

from keras_maskrcnn.layers.conv import Conv2D, fused_conv2d


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class RPNHead(keras.layers.Layer):
    """Objectness logits and box deltas for every anchor, shared over pyramid levels.

    ``conv_depth`` 3x3 convs + ReLU (torchvision's v1 head: one; v2: two), then two 1x1 convs:
    ``A`` objectness logits and ``4 * A`` deltas ``(dx, dy, dw, dh)`` (box coder weights 1, 1, 1, 1)
    per location.

    Call arguments:
        features: list of NHWC maps ``[B, H_i, W_i, C]``.

    Returns:
        ``(objectness [B, sum_i H_i W_i A], deltas [B, sum_i H_i W_i A, 4])`` float32, ordered
        level, row, column, anchor (the order of :class:`AnchorGenerator`).

    Example:
        >>> head = RPNHead(num_anchors=3)
        >>> obj, deltas = head([tf.zeros([2, 8, 8, 16]), tf.zeros([2, 4, 4, 16])])
        >>> obj.shape, deltas.shape
        (TensorShape([2, 240]), TensorShape([2, 240, 4]))
    """

    def __init__(self, num_anchors: int = 3, channels: int = 256, conv_depth: int = 1, **kwargs):
        super().__init__(**kwargs)
        if conv_depth < 1:
            raise ValueError(f"conv_depth must be >= 1, got {conv_depth}.")
        self.num_anchors = num_anchors
        self.channels = channels
        self.conv_depth = conv_depth
        init = keras.initializers.RandomNormal(stddev=0.01)
        common = dict(kernel_initializer=init, bias_initializer="zeros", dtype=self.dtype_policy)
        # The first stays the attribute and name "conv" of v1 (saved models, torchvision's key map).
        self.conv = Conv2D(channels, 3, padding="same", activation="relu", name="conv", **common)
        self.extra_convs = [
            Conv2D(channels, 3, padding="same", activation="relu", name=f"conv_{i}", **common)
            for i in range(1, conv_depth)
        ]
        self.cls_logits = Conv2D(num_anchors, 1, name="cls_logits", **common)
        self.bbox_pred = Conv2D(4 * num_anchors, 1, name="bbox_pred", **common)

    def build(self, input_shape):
        in_channels = input_shape[0][-1]
        for conv in [self.conv] + self.extra_convs:
            conv.build((None, None, None, in_channels))
            in_channels = self.channels
        self.cls_logits.build((None, None, None, self.channels))
        self.bbox_pred.build((None, None, None, self.channels))
        self.built = True

    def call(self, features: Sequence[tf.Tensor]) -> Tuple[tf.Tensor, tf.Tensor]:
        objectness, deltas = [], []
        batch = tf.shape(features[0])[0]
        a, dtype = self.num_anchors, self.compute_dtype
        # Both 1x1 convs as one (oneDNN is slow on a conv with only A = 3 outputs).
        kernel = tf.concat([self.cls_logits.kernel, self.bbox_pred.kernel], axis=-1)  # [1, 1, C, 5 A]
        bias = tf.concat([self.cls_logits.bias, self.bbox_pred.bias], axis=0)
        kernel, bias = tf.cast(kernel, dtype), tf.cast(bias, dtype)
        for x in features:
            for conv in [self.conv] + self.extra_convs:
                x = conv(x)
            out = tf.cast(fused_conv2d(x, kernel, bias), tf.float32)
            out = tf.reshape(out, [batch, -1, 5 * a])  # [B, H * W, A + 4 A]
            objectness.append(tf.reshape(out[..., :a], [batch, -1]))
            deltas.append(tf.reshape(out[..., a:], [batch, -1, 4]))
        return tf.concat(objectness, axis=1), tf.concat(deltas, axis=1)

    def get_config(self):
        config = super().get_config()
        config.update({"num_anchors": self.num_anchors, "channels": self.channels, "conv_depth": self.conv_depth})
        return config
