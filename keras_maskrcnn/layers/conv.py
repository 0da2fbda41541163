"""A 2D convolution that TensorFlow's CPU backend (oneDNN) runs as one fused kernel.

On this backend the convolutions themselves are fast, in bfloat16 especially (AMX), while every
separate elementwise op over a feature map (padding, bias add, batch norm, residual add, ReLU) is a
full pass through memory, and for bfloat16 a slow one. :func:`fused_conv2d` writes a convolution
so that Grappler's remapper turns it into a single ``_FusedConv2D``: the convolution (``"SAME"``
when that is PyTorch's symmetric padding, i.e. at stride 1; otherwise a ``Pad``, which is folded
in too), ``BiasAdd``, then optionally a residual ``Add`` and ``Relu``. (The convolution's own
explicit padding would fuse as well, but its gradients have no oneDNN kernel.)

:class:`Conv2D` is ``keras.layers.Conv2D`` with PyTorch's padding (``padding=k // 2`` on both sides,
whatever the stride) computed that way; weights, names and initialisers are Keras'. Its kernel
stays float32 inside the layer (it is cast to the compute dtype only at the convolution), so a
frozen batch norm can be folded into it in float32 before rounding to bfloat16.
"""
from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf


def fused_conv2d(
    inputs: tf.Tensor,
    kernel: tf.Tensor,
    bias: Optional[tf.Tensor] = None,
    strides: int = 1,
    padding: int = 0,
    residual: Optional[tf.Tensor] = None,
    relu: bool = False,
) -> tf.Tensor:
    """``relu(conv(pad(inputs), kernel) + bias + residual)`` in the form oneDNN fuses into one op.

    Args:
        inputs: ``[B, H, W, C_in]``.
        kernel: ``[k, k, C_in / groups, C_out]`` in the dtype of ``inputs`` (grouped when smaller).
        bias: optional ``[C_out]``, same dtype.
        strides: convolution stride.
        padding: zero padding on each side (PyTorch's ``padding``).
        residual: optional ``[B, H', W', C_out]`` added after the bias.
        relu: apply ReLU last.

    Returns:
        ``[B, (H + 2 p - k) // s + 1, (W + 2 p - k) // s + 1, C_out]``.
    """
    size = kernel.shape[0]
    if padding == 0:
        x = tf.nn.conv2d(inputs, kernel, strides, "VALID")
    elif strides == 1 and 2 * padding == size - 1:
        x = tf.nn.conv2d(inputs, kernel, 1, "SAME")  # symmetric at stride 1
    else:
        # Pad + VALID (fused as _PadWithFusedConv2D); the conv's explicit padding has no oneDNN gradient.
        x = tf.pad(inputs, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
        x = tf.nn.conv2d(x, kernel, strides, "VALID")
    if bias is not None:
        x = tf.nn.bias_add(x, bias)
    if residual is not None:
        x = x + residual
    return tf.nn.relu(x) if relu else x


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class Conv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with PyTorch's symmetric padding, run as one fused oneDNN op.

    Args:
        filters, kernel_size, strides, groups, use_bias, kernel_initializer, bias_initializer:
            as ``keras.layers.Conv2D`` (square kernels and strides).
        padding: ``"same"`` (``kernel_size // 2`` on every side, PyTorch's choice for odd kernels:
            unlike Keras' ``"same"`` it stays symmetric at stride 2), ``"valid"``, or an int.
        activation: ``None`` or ``"relu"`` (fused).

    Call arguments:
        inputs: ``[B, H, W, C]``.
        residual: optional tensor added before the activation (fused).
        relu: overrides ``activation`` for this call (``True`` applies a fused ReLU).
        scale, shift: optional float32 ``[filters]`` per-channel affine applied to the output
            (a frozen batch norm, folded into the kernel and bias in float32).

    Example:

    ```python
    conv = Conv2D(64, 3, strides=2)  # torch.nn.Conv2d(c, 64, 3, stride=2, padding=1)
    y = conv(np.zeros((1, 65, 97, 8), "float32"))  # [1, 33, 49, 64]
    ```
    """

    def __init__(self, filters: int, kernel_size: int, strides: int = 1, padding="same", activation=None, **kwargs):
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"`padding` must be 'same', 'valid' or an int, got {padding!r}.")
        kernel_size = int(kernel_size[0] if isinstance(kernel_size, (tuple, list)) else kernel_size)
        strides = int(strides[0] if isinstance(strides, (tuple, list)) else strides)
        if activation not in (None, "relu", "linear"):
            raise ValueError(f"`activation` must be None or 'relu', got {activation!r}.")
        super().__init__(filters, kernel_size, strides=strides, padding="valid", activation=activation, **kwargs)
        self.torch_padding = padding if isinstance(padding, int) else (kernel_size // 2 if padding == "same" else 0)
        self._padding_arg = padding

    def add_weight(self, *args, **kwargs):
        # Float32 weights in call; cast explicitly (after folding) rather than by autocasting.
        kwargs["autocast"] = False
        return super().add_weight(*args, **kwargs)

    def call(self, inputs, residual=None, scale=None, shift=None, relu=None):
        dtype = self.compute_dtype
        kernel = self.kernel
        bias = self.bias if self.use_bias else None
        if scale is not None:
            kernel = kernel * scale
            bias = shift if bias is None else bias * scale + shift
        inputs = tf.cast(inputs, dtype)
        return fused_conv2d(
            inputs,
            tf.cast(kernel, dtype),
            None if bias is None else tf.cast(bias, dtype),
            strides=self.strides[0],
            padding=self.torch_padding,
            residual=None if residual is None else tf.cast(residual, dtype),
            relu=self.activation is keras.activations.relu if relu is None else relu,
        )

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        k, s, p = self.kernel_size[0], self.strides[0], self.torch_padding
        size = lambda n: None if n is None else (n + 2 * p - k) // s + 1
        return (b, size(h), size(w), self.filters)

    def get_config(self):
        config = super().get_config()
        config["padding"] = self._padding_arg
        for key in ("kernel_size", "strides"):
            config[key] = config[key][0]
        return config
