"""Normalisation layers and the convolution + norm (+ residual, + ReLU) block every stage uses.

Backbones take ``frozen_bn`` (torchvision's ``FrozenBatchNorm2d``, for pretrained weights) or
``batch_norm``; the FPN and the heads take ``None`` (torchvision's v1 Mask R-CNN) or
``batch_norm`` (its v2 model, and what helps training from scratch).

Synchronized batch norm: a ``BatchNormalization`` with ``synchronized=True`` (Keras' own flag;
:func:`synchronize_batch_norm` sets it on every one in a model, as torch's
``SyncBatchNorm.convert_sync_batchnorm``) trains with the statistics of the global batch when it
runs in a replica context of several replicas (``tf.distribute``): the same as plain batch norm
on all replicas' images concatenated, moving statistics included. With one replica it is plain
batch norm.
"""
from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf
from keras import ops

from keras_maskrcnn.layers.conv import Conv2D


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class FrozenBatchNormalization(keras.layers.Layer):
    """Batch normalisation with fixed statistics and affine parameters.

    The same computation as torchvision's ``FrozenBatchNorm2d``: ``x * scale + shift`` with
    ``scale = gamma / sqrt(moving_variance + epsilon)`` and ``shift = beta - moving_mean * scale``.
    All four weights are non-trainable and no statistics are updated, in training or not.

    Args:
        epsilon: added to the variance; torchvision uses ``1e-5``.

    Call arguments:
        inputs: ``[..., C]`` tensor. The result has the layer's compute dtype (``bfloat16`` under
            ``mixed_bfloat16``); ``scale`` and ``shift`` are formed in float32 first.

    Example:

    ```python
    bn = FrozenBatchNormalization()
    y = bn(np.ones((1, 4, 4, 8), "float32"))  # [1, 4, 4, 8]; identity until weights are loaded
    ```
    """

    def __init__(self, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"FrozenBatchNormalization needs a known channel dimension, got {input_shape}.")

        def weight(name, init):
            # autocast=False: keep float32 so scale/shift are computed before rounding to bf16.
            return self.add_weight(name=name, shape=(channels,), initializer=init, trainable=False, autocast=False)

        self.gamma = weight("gamma", "ones")
        self.beta = weight("beta", "zeros")
        self.moving_mean = weight("moving_mean", "zeros")
        self.moving_variance = weight("moving_variance", "ones")

    def scale_and_shift(self):
        """float32 ``(scale, shift)`` with ``bn(x) = x * scale + shift``."""
        scale = self.gamma * ops.rsqrt(self.moving_variance + self.epsilon)
        return scale, self.beta - self.moving_mean * scale

    def call(self, inputs):
        scale, shift = self.scale_and_shift()
        return inputs * ops.cast(scale, inputs.dtype) + ops.cast(shift, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


NORMS = ("frozen_bn", "batch_norm")
# The heads and the FPN: no norm (torchvision's v1 model) or a trainable batch norm (v2).
HEAD_NORMS = (None, "batch_norm")


def make_norm(norm: Optional[str], name: str, dtype=None, synchronized: bool = False) -> Optional[keras.layers.Layer]:
    """The normalisation layer called ``name`` for a ``norm`` setting, or ``None`` for no norm.

    ``frozen_bn`` for pretrained weights (torchvision's detection backbones); ``batch_norm``
    (trainable, PyTorch's eps and momentum) for training from scratch, as torchvision does when
    no pretrained weights are given, and in the FPN and heads of its v2 model. ``synchronized``:
    a ``batch_norm`` with global-batch statistics under ``tf.distribute`` (module docstring).
    """
    if norm is None:
        return None
    if norm == "frozen_bn":
        return FrozenBatchNormalization(name=name, dtype=dtype)
    if norm == "batch_norm":
        return keras.layers.BatchNormalization(
            epsilon=1e-5, momentum=0.9, name=name, dtype=dtype, synchronized=synchronized
        )
    raise ValueError(f"Unknown norm {norm!r}; expected one of {NORMS} or None.")


def conv_norm(
    conv: Conv2D,
    norm: Optional[keras.layers.Layer],
    x,
    training=None,
    relu: bool = False,
    residual=None,
    valid: Optional[tf.Tensor] = None,
) -> tf.Tensor:
    """``relu(norm(conv(x)) + residual)`` (no norm when ``norm`` is ``None``), with the norm folded
    into the convolution when it is an affine map: always for :class:`FrozenBatchNormalization`,
    and for ``BatchNormalization`` at inference or when frozen (``trainable=False``). Then oneDNN
    runs all of it as one fused op.

    A training ``BatchNormalization`` runs as TensorFlow's fused batch norm (one op, in the compute
    dtype with float32 statistics: several times faster than Keras' float32 elementwise form);
    like PyTorch, it updates the moving variance with the unbiased batch variance. ``valid``
    (bool ``[N]`` over the leading axis of ``x``) restricts the batch statistics to those rows:
    the RoI heads pad their RoI batches, and padding rows must not shift the statistics.
    """
    if norm is None:
        return conv(x, residual=residual, relu=relu)
    is_bn = isinstance(norm, keras.layers.BatchNormalization)
    if isinstance(norm, FrozenBatchNormalization):
        scale, shift = norm.scale_and_shift()
    elif is_bn and not (training and norm.trainable):
        scale = ops.cast(norm.gamma, "float32") * ops.rsqrt(ops.cast(norm.moving_variance, "float32") + norm.epsilon)
        shift = ops.cast(norm.beta, "float32") - ops.cast(norm.moving_mean, "float32") * scale
    else:
        if is_bn:
            y = _batch_norm_training(norm, conv(x)) if valid is None else _masked_batch_norm_training(norm, conv(x), valid)
        else:
            y = norm(conv(x), training=training)
        if residual is not None:
            y = y + tf.cast(residual, y.dtype)
        return ops.relu(y) if relu else y
    return conv(x, residual=residual, scale=scale, shift=shift, relu=relu)


def _batch_norm_training(norm: keras.layers.BatchNormalization, x):
    """``norm(x, training=True)`` with batch statistics, as one ``FusedBatchNormV3`` (global-batch
    statistics when ``norm`` is synchronized under several replicas)."""
    context = _sync_context(norm)
    if context is not None:
        return _synchronized_batch_norm_training(norm, x, None, context)
    empty = tf.constant([], tf.float32)
    y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=tf.cast(norm.gamma, tf.float32),
        offset=tf.cast(norm.beta, tf.float32),
        mean=empty,
        variance=empty,
        epsilon=norm.epsilon,
        is_training=True,
    )
    momentum = norm.momentum
    norm.moving_mean.assign(norm.moving_mean * momentum + mean * (1.0 - momentum))
    norm.moving_variance.assign(norm.moving_variance * momentum + variance * (1.0 - momentum))
    return y


def _masked_batch_norm_training(norm: keras.layers.BatchNormalization, x, valid: tf.Tensor):
    """Training batch norm with statistics over the rows of ``x`` where ``valid`` (bool ``[N]``)."""
    context = _sync_context(norm)
    if context is not None:
        return _synchronized_batch_norm_training(norm, x, valid, context)
    weights = tf.cast(valid, tf.float32)[:, None, None, None]
    x32 = tf.cast(x, tf.float32)
    mean, variance = tf.nn.weighted_moments(x32, axes=[0, 1, 2], frequency_weights=weights)
    count = tf.reduce_sum(weights) * tf.cast(tf.shape(x)[1] * tf.shape(x)[2], tf.float32)
    y = tf.nn.batch_normalization(
        x32, mean, variance, tf.cast(norm.beta, tf.float32), tf.cast(norm.gamma, tf.float32), norm.epsilon
    )
    # Moving statistics as PyTorch: the unbiased variance; unchanged when no row is valid.
    momentum = tf.where(count > 1.0, norm.momentum, 1.0)
    unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
    norm.moving_mean.assign(norm.moving_mean * momentum + mean * (1.0 - momentum))
    norm.moving_variance.assign(norm.moving_variance * momentum + unbiased * (1.0 - momentum))
    return tf.cast(y, x.dtype)


# --------------------------------------------------------------------------------------------
# Synchronized batch norm
# --------------------------------------------------------------------------------------------


def synchronize_batch_norm(layer: keras.layers.Layer, synchronized: bool = True) -> int:
    """Set ``synchronized`` on every ``keras.layers.BatchNormalization`` in ``layer`` (a model, or
    any layer; itself included): torch's ``SyncBatchNorm.convert_sync_batchnorm`` for Keras.
    Returns how many were set. Frozen batch norm has no batch statistics and is left alone."""
    norms = [l for l in layer._flatten_layers(include_self=True) if isinstance(l, keras.layers.BatchNormalization)]
    for norm in norms:
        norm.synchronized = bool(synchronized)
    return len(norms)


def _sync_context(norm) -> Optional[tf.distribute.ReplicaContext]:
    """The replica context ``norm``'s statistics are all-reduced in: None unless ``norm`` is
    synchronized and runs in a replica context of more than one replica."""
    if not getattr(norm, "synchronized", False):
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def _synchronized_batch_norm_training(norm, x, valid: Optional[tf.Tensor], context):
    """Training batch norm of ``x`` (``[N, ..., C]``) with the statistics of all replicas' rows
    (the ``valid`` ones, bool ``[N]``, when given): batch norm of the concatenated global batch.

    Two passes, each one all-reduce: the counts and sums give the global mean, then the summed
    squared deviations from it the variance (no ``E[x^2] - E[x]^2`` cancellation). The gradient
    of an all-reduce sum is the all-reduce of the gradients, so each replica's input gradient
    also sees the other replicas' losses through the shared statistics, as on one device.
    Computed in float32; the result has ``x``'s dtype.
    """
    x32 = tf.cast(x, tf.float32)
    axes = list(range(x.shape.rank - 1))
    pixels = tf.cast(tf.reduce_prod(tf.shape(x32)[1:-1]), tf.float32)
    if valid is None:
        weights, count = None, tf.cast(tf.shape(x32)[0], tf.float32) * pixels
        local_sum = tf.reduce_sum(x32, axis=axes)
    else:
        weights = tf.reshape(tf.cast(valid, tf.float32), [-1] + [1] * (x.shape.rank - 1))
        count = tf.reduce_sum(weights) * pixels
        local_sum = tf.reduce_sum(x32 * weights, axis=axes)
    sums = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat([local_sum, count[None]], axis=0))
    total = sums[-1]
    mean = tf.math.divide_no_nan(sums[:-1], total)
    centered = x32 - mean
    squares = tf.square(centered) if weights is None else tf.square(centered) * weights
    variance = tf.math.divide_no_nan(
        context.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(squares, axis=axes)), total
    )
    scale = tf.cast(norm.gamma, tf.float32) * tf.math.rsqrt(variance + norm.epsilon)
    y = centered * scale + tf.cast(norm.beta, tf.float32)
    # Moving statistics as PyTorch: the unbiased variance; unchanged when no row is valid anywhere.
    # Every replica assigns the same values, so the mirrored variables stay equal.
    momentum = tf.where(total > 1.0, norm.momentum, 1.0)
    unbiased = variance * total / tf.maximum(total - 1.0, 1.0)
    norm.moving_mean.assign(norm.moving_mean * momentum + mean * (1.0 - momentum))
    norm.moving_variance.assign(norm.moving_variance * momentum + unbiased * (1.0 - momentum))
    return tf.cast(y, x.dtype)
