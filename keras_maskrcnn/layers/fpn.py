"""Feature Pyramid Network (Lin et al. 2017), as torchvision's ``FeaturePyramidNetwork``."""
from __future__ import annotations

from typing import List, Optional, Sequence

import keras
import tensorflow as tf

from keras_maskrcnn.layers.conv import Conv2D
from keras_maskrcnn.layers.norm import HEAD_NORMS, conv_norm, make_norm


def _upsample_nearest(x: tf.Tensor, size) -> tf.Tensor:
    # PyTorch's "nearest" (src = floor(dst * in / out)), not TF2's half-pixel variant.
    return tf.raw_ops.ResizeNearestNeighbor(images=x, size=size, align_corners=False, half_pixel_centers=False)


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class FeaturePyramidNetwork(keras.layers.Layer):
    """Top-down pyramid P2..P6 from backbone maps C2..C5.

    Each ``C_i`` goes through a 1x1 lateral conv; coarser levels are upsampled (nearest) and
    added; a 3x3 conv smooths each sum. P6 is P5 subsampled by 2 (torchvision's
    ``LastLevelMaxPool``: max-pool with kernel 1, stride 2), used by the RPN only.

    Args:
        channels: width of every output map.
        norm: ``None`` (torchvision's v1 FPN: convolutions with bias) or ``"batch_norm"``
            (``maskrcnn_resnet50_fpn_v2``: each convolution without bias, then a batch norm).

    Call arguments:
        features: list of four NHWC maps ``[C2, C3, C4, C5]`` (strides 4..32, any channels).

    Returns:
        list of five ``[B, H_i, W_i, channels]`` maps ``[P2, P3, P4, P5, P6]`` in the compute dtype.

    Example:
        >>> fpn = FeaturePyramidNetwork(channels=64)
        >>> c = [tf.zeros([1, 64 // s, 64 // s, 8]) for s in (4, 8, 16, 32)]
        >>> [p.shape[1] for p in fpn(c)]
        [16, 8, 4, 2, 1]
    """

    def __init__(self, channels: int = 256, norm: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        if norm not in HEAD_NORMS:
            raise ValueError(f"norm must be one of {HEAD_NORMS}, got {norm!r}.")
        self.channels = channels
        self.norm = norm
        init = keras.initializers.LecunUniform()  # = torchvision FPN kaiming_uniform_(a=1)
        common = dict(kernel_initializer=init, use_bias=norm is None, dtype=self.dtype_policy)
        self.lateral_convs = [Conv2D(channels, 1, name=f"inner_{i}", **common) for i in range(4)]
        self.output_convs = [Conv2D(channels, 3, padding="same", name=f"layer_{i}", **common) for i in range(4)]
        self.lateral_norms = [make_norm(norm, f"inner_{i}_norm", self.dtype_policy) for i in range(4)]
        self.output_norms = [make_norm(norm, f"layer_{i}_norm", self.dtype_policy) for i in range(4)]

    def build(self, input_shape: Sequence[Sequence[int]]):
        for conv, shape in zip(self.lateral_convs, input_shape):
            conv.build(shape)
        for conv in self.output_convs:
            conv.build((None, None, None, self.channels))
        for norm in self.lateral_norms + self.output_norms:
            if norm is not None:
                norm.build((None, None, None, self.channels))
        self.built = True

    def call(self, features: Sequence[tf.Tensor], training=None) -> List[tf.Tensor]:
        def lateral(i, residual=None):
            return conv_norm(self.lateral_convs[i], self.lateral_norms[i], features[i], training, residual=residual)

        def output(i, x):
            return conv_norm(self.output_convs[i], self.output_norms[i], x, training)

        last = lateral(3)
        outputs = [output(3, last)]
        for i in (2, 1, 0):
            # The top-down sum is fused into the lateral convolution.
            top_down = _upsample_nearest(last, tf.shape(features[i])[1:3])
            last = lateral(i, residual=top_down)
            outputs.insert(0, output(i, last))
        outputs.append(outputs[-1][:, ::2, ::2, :])
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels, "norm": self.norm})
        return config
