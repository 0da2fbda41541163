"""Mask head, as torchvision's ``MaskRCNNHeads`` + ``MaskRCNNPredictor``."""
from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from keras_maskrcnn.layers.conv import Conv2D, fused_conv2d
from keras_maskrcnn.layers.norm import HEAD_NORMS, conv_norm, make_norm


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class MaskHead(keras.layers.Layer):
    """Four 3x3 convs (+ ReLU), a 2x2 stride-2 transposed conv (+ ReLU), per-class 1x1 logits.

    Args:
        num_classes: object classes, background excluded.
        channels: width of the convolutions.
        num_convs: 3x3 convolutions before the upsampling.
        norm: ``None`` (torchvision's v1 head: convolutions with bias) or ``"batch_norm"`` (v2:
            convolution without bias, batch norm, ReLU).

    Call arguments:
        roi_features: ``[B, N, S, S, C]`` pooled features (``S = 14`` by default).
        classes: optional ``[B, N]`` int class of each RoI; then only that class's logits are
            computed (inference: the mask of the detected class).
        training: batch norms use batch statistics (and update their moving ones) when true.
        valid: optional bool ``[B, N]``: the RoIs that are not padding; batch statistics come
            from those only.

    Returns:
        ``[B, N, 2S, 2S, num_classes + 1]`` float32 mask logits, one channel per class (0 is
        background, kept so channel ``k`` is class ``k``); ``[B, N, 2S, 2S]`` with ``classes``.

    Example:
        >>> head = MaskHead(num_classes=3, channels=16)
        >>> head(tf.zeros([1, 2, 14, 14, 8])).shape
        TensorShape([1, 2, 28, 28, 4])
    """

    def __init__(
        self, num_classes: int, channels: int = 256, num_convs: int = 4, norm: Optional[str] = None, **kwargs
    ):
        super().__init__(**kwargs)
        if norm not in HEAD_NORMS:
            raise ValueError(f"norm must be one of {HEAD_NORMS}, got {norm!r}.")
        self.num_classes = num_classes
        self.channels = channels
        self.num_convs = num_convs
        self.norm = norm
        init = keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")
        common = dict(kernel_initializer=init, bias_initializer="zeros", dtype=self.dtype_policy)
        self.convs = [
            # Without a norm the ReLU is the convolution's own activation (v1's layer, called alone).
            Conv2D(
                channels, 3, padding="same", use_bias=norm is None, activation="relu" if norm is None else None,
                name=f"mask_fcn{i + 1}", **common,
            )
            for i in range(num_convs)
        ]
        self.norms = [make_norm(norm, f"mask_fcn{i + 1}_norm", self.dtype_policy) for i in range(num_convs)]
        self.upsample = keras.layers.Conv2DTranspose(
            channels, 2, strides=2, activation="relu", name="conv5_mask", **common
        )
        self.logits = Conv2D(num_classes + 1, 1, name="mask_fcn_logits", **common)

    def build(self, input_shape):
        in_channels = input_shape[-1]
        for conv, norm in zip(self.convs, self.norms):
            conv.build((None, None, None, in_channels))
            if norm is not None:
                norm.build((None, None, None, self.channels))
            in_channels = self.channels
        self.upsample.build((None, None, None, in_channels))
        self.logits.build((None, None, None, self.channels))
        self.built = True

    def call(self, roi_features: tf.Tensor, classes=None, training=None, valid=None) -> tf.Tensor:
        shape = tf.shape(roi_features)
        size, dtype = roi_features.shape[2], self.compute_dtype
        x = tf.reshape(roi_features, [-1, size, size, roi_features.shape[-1]])
        valid = None if valid is None else tf.reshape(valid, [-1])
        for conv, norm in zip(self.convs, self.norms):
            x = conv_norm(conv, norm, x, training, relu=True, valid=valid)
        x = self._upsample(x)  # [B * N, 2S, 2S, C]
        x = tf.reshape(x, [shape[0], shape[1], 4 * size * size, self.channels])
        kernel = tf.reshape(tf.cast(self.logits.kernel, dtype), [self.channels, self.num_classes + 1])
        bias = tf.cast(self.logits.bias, dtype)
        if classes is None:
            x = tf.nn.bias_add(tf.matmul(x, kernel), bias)
            return tf.reshape(tf.cast(x, tf.float32), [shape[0], shape[1], 2 * size, 2 * size, self.num_classes + 1])
        # One class per RoI: [B, N, P, C] @ [B, N, C, 1], 1 / (K + 1) of the work.
        class_kernels = tf.gather(tf.transpose(kernel), classes)  # [B, N, C]
        x = tf.matmul(x, class_kernels[..., None])[..., 0] + tf.gather(bias, classes)[..., None]
        return tf.reshape(tf.cast(x, tf.float32), [shape[0], shape[1], 2 * size, 2 * size])

    def _upsample(self, x: tf.Tensor) -> tf.Tensor:
        """The 2x2 stride-2 transposed conv + ReLU as a 1x1 conv to ``4 C`` channels and a
        depth-to-space (several times faster than oneDNN's transposed conv).

        With kernel = stride the output pixel ``(2i + dy, 2j + dx)`` sees only input ``(i, j)``
        and kernel tap ``(dy, dx)``, so output channel ``(2 dy + dx) C + c`` of the 1x1 conv is
        tap ``(dy, dx)``, which ``depth_to_space`` moves into place.
        """
        dtype = self.compute_dtype
        kernel = tf.cast(self.upsample.kernel, dtype)  # [2, 2, C_out, C_in]
        c_in, c_out = kernel.shape[3], kernel.shape[2]
        kernel = tf.reshape(tf.transpose(kernel, [3, 0, 1, 2]), [1, 1, c_in, 4 * c_out])
        bias = tf.tile(tf.cast(self.upsample.bias, dtype), [4])
        return tf.nn.depth_to_space(fused_conv2d(x, kernel, bias, relu=True), 2)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"num_classes": self.num_classes, "channels": self.channels, "num_convs": self.num_convs, "norm": self.norm}
        )
        return config
