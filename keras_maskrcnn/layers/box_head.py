"""RoI box head: torchvision's ``TwoMLPHead`` (v1) or ``FastRCNNConvFCHead`` (v2), followed by
``FastRCNNPredictor``."""
from __future__ import annotations

from typing import Optional, Tuple

import keras
import tensorflow as tf

from keras_maskrcnn.layers.conv import Conv2D
from keras_maskrcnn.layers.norm import HEAD_NORMS, conv_norm, make_norm


def _dense(layer: keras.layers.Dense, x: tf.Tensor) -> tf.Tensor:
    """``layer(x)`` (ReLU or linear) as MatMul + BiasAdd (+ Relu), which oneDNN fuses into one op;
    Keras' Dense adds its bias with a broadcasting add that it does not."""
    dtype = layer.compute_dtype
    x = tf.nn.bias_add(tf.matmul(tf.cast(x, dtype), tf.cast(layer.kernel, dtype)), tf.cast(layer.bias, dtype))
    return tf.nn.relu(x) if layer.activation is keras.activations.relu else x


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class BoxHead(keras.layers.Layer):
    """Optional 3x3 convolutions, fully connected layers, then class logits and class-specific box deltas.

    The default is torchvision's v1 ``TwoMLPHead`` (two FC layers + ReLU); ``num_convs=4,
    conv_channels=256, num_fcs=1, norm="batch_norm"`` is v2's ``FastRCNNConvFCHead`` (four 3x3
    conv + batch norm + ReLU, then one FC + ReLU).

    Args:
        num_classes: object classes, background excluded.
        representation_size: width of the FC layers.
        num_convs: 3x3 convolutions (+ ReLU) on the pooled features before the FC layers.
        conv_channels: their width.
        num_fcs: fully connected layers (+ ReLU): 2 (``fc6``, ``fc7``) or 1 (``fc6``).
        norm: ``None`` (convolutions with bias) or ``"batch_norm"`` after each convolution.

    Call arguments:
        roi_features: ``[B, N, S, S, C]`` pooled features (NHWC per RoI; flattened in H, W, C order).
        training: batch norms use batch statistics (and update their moving ones) when true.
        valid: optional bool ``[B, N]``: the RoIs that are not padding; batch statistics come
            from those only.

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

    def __init__(
        self,
        num_classes: int,
        representation_size: int = 1024,
        num_convs: int = 0,
        conv_channels: int = 256,
        num_fcs: int = 2,
        norm: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if norm not in HEAD_NORMS:
            raise ValueError(f"norm must be one of {HEAD_NORMS}, got {norm!r}.")
        if num_fcs not in (1, 2):
            raise ValueError(f"num_fcs must be 1 (v2) or 2 (v1), got {num_fcs}.")
        self.num_classes = num_classes
        self.representation_size = representation_size
        self.num_convs = num_convs
        self.conv_channels = conv_channels
        self.num_fcs = num_fcs
        self.norm = norm
        common = dict(dtype=self.dtype_policy)
        # torchvision's FastRCNNConvFCHead: kaiming_normal_(fan_out, relu) convolutions.
        conv_init = keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")
        self.convs = [
            Conv2D(conv_channels, 3, use_bias=norm is None, kernel_initializer=conv_init, name=f"conv{i}", **common)
            for i in range(num_convs)
        ]
        self.conv_norms = [make_norm(norm, f"conv{i}_norm", self.dtype_policy) for i in range(num_convs)]
        # Attributes and names fc6 / fc7 as torchvision's (saved models, the weight-conversion map).
        self.fc6 = keras.layers.Dense(representation_size, activation="relu", name="fc6", **common)
        if num_fcs == 2:
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

    @property
    def fcs(self) -> list:
        return [self.fc6, self.fc7] if self.num_fcs == 2 else [self.fc6]

    def build(self, input_shape):
        _, _, h, w, c = input_shape
        for conv, norm in zip(self.convs, self.conv_norms):
            conv.build((None, h, w, c))
            c = self.conv_channels
            if norm is not None:
                norm.build((None, h, w, c))
        size = h * w * c
        for fc in self.fcs:
            fc.build((None, size))
            size = self.representation_size
        self.cls_score.build((None, self.representation_size))
        self.bbox_pred.build((None, self.representation_size))
        self.built = True

    def call(self, roi_features: tf.Tensor, training=None, valid=None) -> Tuple[tf.Tensor, tf.Tensor]:
        shape = tf.shape(roi_features)
        batch, num = shape[0], shape[1]
        x = roi_features
        if self.convs:
            size = roi_features.shape[2]
            x = tf.reshape(x, [-1, size, size, roi_features.shape[4]])
            valid = None if valid is None else tf.reshape(valid, [-1])
            for conv, norm in zip(self.convs, self.conv_norms):
                x = conv_norm(conv, norm, x, training, relu=True, valid=valid)
        x = tf.reshape(x, [-1, x.shape[-3] * x.shape[-2] * x.shape[-1]])
        for fc in self.fcs:
            x = _dense(fc, x)
        logits = tf.cast(_dense(self.cls_score, x), tf.float32)
        deltas = tf.cast(_dense(self.bbox_pred, x), tf.float32)
        logits = tf.reshape(logits, [batch, num, self.num_classes + 1])
        deltas = tf.reshape(deltas, [batch, num, self.num_classes + 1, 4])
        return logits, deltas

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "representation_size": self.representation_size,
                "num_convs": self.num_convs,
                "conv_channels": self.conv_channels,
                "num_fcs": self.num_fcs,
                "norm": self.norm,
            }
        )
        return config
