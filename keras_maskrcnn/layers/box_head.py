"""RoI box head: torchvision's ``TwoMLPHead`` followed by ``FastRCNNPredictor``."""
from __future__ import annotations

from typing import Tuple

import keras
import tensorflow as tf


def _dense(layer: keras.layers.Dense, x: tf.Tensor) -> tf.Tensor:
    """``layer(x)`` (ReLU or linear) as MatMul + BiasAdd (+ Relu), which oneDNN fuses into one op;
    Keras' Dense adds its bias with a broadcasting add that it does not."""
    dtype = layer.compute_dtype
    x = tf.nn.bias_add(tf.matmul(tf.cast(x, dtype), tf.cast(layer.kernel, dtype)), tf.cast(layer.bias, dtype))
    return tf.nn.relu(x) if layer.activation is keras.activations.relu else x


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class BoxHead(keras.layers.Layer):
    """Two fully connected layers, then class logits and class-specific box deltas.

    Call arguments:
        roi_features: ``[B, N, S, S, C]`` pooled features (NHWC per RoI; flattened in H, W, C order).

    Returns:
        ``class_logits [B, N, num_classes + 1]`` (index 0 is background) and
        ``box_deltas [B, N, num_classes + 1, 4]`` ``(dx, dy, dw, dh)`` for box coder weights
        ``(10, 10, 5, 5)``, both float32.

    Example:
        >>> head = BoxHead(num_classes=3, representation_size=32)
        >>> logits, deltas = head(tf.zeros([2, 5, 7, 7, 8]))
        >>> logits.shape, deltas.shape
        (TensorShape([2, 5, 4]), TensorShape([2, 5, 4, 4]))
    """

    def __init__(self, num_classes: int, representation_size: int = 1024, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.representation_size = representation_size
        common = dict(dtype=self.dtype_policy)
        self.fc6 = keras.layers.Dense(representation_size, activation="relu", name="fc6", **common)
        self.fc7 = keras.layers.Dense(representation_size, activation="relu", name="fc7", **common)
        # Small initial outputs, as detectron2: uniform class scores and near-zero deltas.
        self.cls_score = keras.layers.Dense(
            num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01), name="cls_score", **common
        )
        self.bbox_pred = keras.layers.Dense(
            4 * (num_classes + 1),
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            name="bbox_pred",
            **common,
        )

    def build(self, input_shape):
        _, _, h, w, c = input_shape
        self.fc6.build((None, h * w * c))
        self.fc7.build((None, self.representation_size))
        self.cls_score.build((None, self.representation_size))
        self.bbox_pred.build((None, self.representation_size))
        self.built = True

    def call(self, roi_features: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        shape = tf.shape(roi_features)
        batch, num = shape[0], shape[1]
        flat_size = roi_features.shape[2] * roi_features.shape[3] * roi_features.shape[4]
        x = tf.reshape(roi_features, [-1, flat_size])
        x = _dense(self.fc7, _dense(self.fc6, x))
        logits = tf.cast(_dense(self.cls_score, x), tf.float32)
        deltas = tf.cast(_dense(self.bbox_pred, x), tf.float32)
        logits = tf.reshape(logits, [batch, num, self.num_classes + 1])
        deltas = tf.reshape(deltas, [batch, num, self.num_classes + 1, 4])
        return logits, deltas

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "representation_size": self.representation_size})
        return config
