"""The fused (oneDNN-friendly) forms compute the same function as their plain definitions:
PyTorch-padded convolutions, batch norms folded into convolutions, the mask head's transposed
convolution as a 1x1 conv + depth-to-space, per-class mask logits, XLA mask pasting, and one
model's weights run in another precision."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as ref
from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.layers.backbone import FrozenBatchNormalization, conv_norm
from keras_maskrcnn.layers.conv import Conv2D
from keras_maskrcnn.layers.mask_head import MaskHead
from keras_maskrcnn.ops.paste_masks import paste_masks, paste_masks_binary
from keras_maskrcnn.precision import with_dtype_policy


@pytest.fixture
def rng():
    return np.random.default_rng()


def conv_reference(x, kernel, bias, stride, pad, groups=1):
    """``torch.nn.functional.conv2d`` from the definition: NHWC, zero padding on both sides."""
    x = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)]).astype(np.float64)
    k = kernel.shape[0]
    b, h, w, c = x.shape
    out_h, out_w = (h - k) // stride + 1, (w - k) // stride + 1
    cin_g, cout = kernel.shape[2], kernel.shape[3]
    cout_g = cout // groups
    y = np.zeros((b, out_h, out_w, cout))
    for g in range(groups):
        xs = x[..., g * cin_g : (g + 1) * cin_g]
        ks = kernel[..., g * cout_g : (g + 1) * cout_g].astype(np.float64)
        for dy in range(k):
            for dx in range(k):
                patch = xs[:, dy : dy + stride * (out_h - 1) + 1 : stride, dx : dx + stride * (out_w - 1) + 1 : stride]
                y[..., g * cout_g : (g + 1) * cout_g] += patch @ ks[dy, dx]
    return y + (0 if bias is None else bias)


@pytest.mark.parametrize(
    "kernel_size,stride,groups,size", [(1, 1, 1, (9, 7)), (1, 2, 1, (9, 7)), (3, 1, 1, (8, 11)), (3, 2, 1, (9, 8)),
                                       (3, 2, 2, (10, 7)), (7, 2, 1, (13, 12))]
)
def test_conv2d_is_pytorch_padded_convolution(rng, kernel_size, stride, groups, size):
    conv = Conv2D(6, kernel_size, strides=stride, groups=groups, kernel_initializer="random_normal",
                  bias_initializer="random_normal")
    x = rng.normal(size=(2, *size, 4)).astype(np.float32)
    got = conv(x).numpy()
    expected = conv_reference(x, conv.kernel.numpy(), conv.bias.numpy(), stride, kernel_size // 2, groups)
    assert got.shape == expected.shape == (2, *conv.compute_output_shape((2, *size, 4))[1:3], 6)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # Fused residual and ReLU; folded per-channel scale and shift.
    residual = rng.normal(size=got.shape).astype(np.float32)
    np.testing.assert_allclose(conv(x, residual=residual, relu=True).numpy(), np.maximum(expected + residual, 0), atol=1e-4)
    scale, shift = rng.uniform(0.5, 2, 6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    np.testing.assert_allclose(conv(x, scale=scale, shift=shift).numpy(), expected * scale + shift, atol=1e-4)


def test_conv2d_config_round_trip_and_gradient(rng):
    conv = Conv2D(5, 3, strides=2, padding=1, activation="relu", use_bias=False, name="c")
    config = conv.get_config()
    clone = Conv2D.from_config(config)
    assert clone.get_config() == config
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(conv))
    assert type(again) is Conv2D and again.get_config() == config
    x = tf.constant(rng.normal(size=(1, 9, 9, 3)), tf.float32)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(conv(x) ** 2)
    grad = tape.gradient(y, conv.kernel)
    assert grad is not None and np.all(np.isfinite(grad.numpy())) and np.abs(grad.numpy()).sum() > 0


@pytest.mark.parametrize("norm", ["frozen", "batch_norm"])
def test_folded_norm_equals_conv_then_norm(rng, norm):
    conv = Conv2D(6, 3, strides=2, use_bias=False)
    if norm == "frozen":
        bn = FrozenBatchNormalization()
    else:
        bn = keras.layers.BatchNormalization(epsilon=1e-5)
    x = rng.normal(size=(2, 11, 10, 4)).astype(np.float32)
    y = conv(x)
    bn.build(y.shape)
    for weight in (bn.gamma, bn.beta, bn.moving_mean):
        weight.assign(rng.normal(size=6).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.2, 3.0, 6).astype(np.float32))
    residual = rng.normal(size=y.shape).astype(np.float32)
    expected = np.maximum(bn(y, training=False).numpy() + residual, 0)
    got = conv_norm(conv, bn, x, training=False, relu=True, residual=residual).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    if norm == "batch_norm":
        # Training: batch statistics (fused op), moving averages updated with PyTorch's unbiased variance.
        moving_mean, moving_var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
        y = y.numpy()
        mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
        expected = np.maximum((y - mean) / np.sqrt(var + 1e-5) * bn.gamma.numpy() + bn.beta.numpy() + residual, 0)
        got = conv_norm(conv, bn, x, training=True, relu=True, residual=residual).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-3)
        n = y.size // 6
        np.testing.assert_allclose(bn.moving_mean.numpy(), 0.99 * moving_mean + 0.01 * mean, atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), 0.99 * moving_var + 0.01 * var * n / (n - 1), rtol=1e-4)
        bn.trainable = False  # frozen: moving statistics even in training
        np.testing.assert_allclose(conv_norm(conv, bn, x, training=True).numpy(), bn(conv(x), training=False).numpy(), atol=1e-4)


def test_mask_head_upsampling_is_transposed_conv_and_class_selection(rng):
    head = MaskHead(num_classes=4, channels=8, num_convs=1)
    x = tf.constant(rng.normal(size=(2, 3, 7, 7, 5)), tf.float32)
    full = head(x).numpy()  # [2, 3, 14, 14, 5]
    for weight in (head.upsample.bias, head.logits.bias):
        weight.assign(rng.normal(size=weight.shape).astype(np.float32))
    full = head(x).numpy()
    # Reference: the Keras transposed conv layer that holds the weights, then the 1x1 logits.
    hidden = head.convs[0](tf.reshape(x, [6, 7, 7, 5]))
    up = head.upsample(hidden).numpy()  # Conv2DTranspose 2x2 / 2 + ReLU
    kernel = head.logits.kernel.numpy()[0, 0]
    expected = (up @ kernel + head.logits.bias.numpy()).reshape(2, 3, 14, 14, 5)
    np.testing.assert_allclose(full, expected, atol=1e-4)
    classes = tf.constant(rng.integers(0, 5, (2, 3)), tf.int32)
    selected = head(x, classes=classes).numpy()
    np.testing.assert_allclose(selected, np.take_along_axis(full, classes.numpy()[..., None, None, None], -1)[..., 0], atol=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_binary_paste_equals_thresholded_paste(rng, jit_compile):
    h, w, n = 45, 62, 9
    masks = rng.uniform(0, 1, (2, n, 28, 28)).astype(np.float32)
    boxes = np.stack([ref.random_boxes(rng, n, h, w, min_size=0.5, max_size=50) for _ in range(2)])
    boxes[0, 0] = [-4.2, -1.5, 20.3, 12.9]  # leaves the image
    boxes[1, 1] = [30.0, 20.0, 30.6, 20.2]  # sub-pixel
    expected = paste_masks(masks, boxes.astype(np.float32), h, w).numpy() > 0.5
    got = paste_masks_binary(masks, boxes, h, w, 0.5, jit_compile=jit_compile).numpy()
    assert got.dtype == np.uint8 and got.shape == (2, n, h, w)
    np.testing.assert_array_equal(got, expected.astype(np.uint8))


def test_with_dtype_policy_keeps_weights_and_config():
    model = MaskRCNN(num_classes=2, backbone="resnet18", fpn_channels=16, representation_size=16,
                     min_size=64, max_size=64)
    model.build()
    bf16 = with_dtype_policy(model, "mixed_bfloat16")
    assert bf16.dtype_policy.name == "mixed_bfloat16" and bf16.compute_dtype == "bfloat16"
    assert bf16.backbone.conv1.compute_dtype == "bfloat16" and bf16.num_classes == 2
    assert len(bf16.weights) == len(model.weights)
    for a, b in zip(model.weights, bf16.weights):
        assert a.path == b.path and b.dtype == "float32"
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    images = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), np.uint8)
    out = bf16(images)
    assert out["masks"].shape == (1, 100, 64, 64) and out["boxes"].dtype == tf.float32
    back = with_dtype_policy(bf16, "float32")
    assert back.compute_dtype == "float32"
    np.testing.assert_allclose(back(images)["boxes"].numpy(), model(images)["boxes"].numpy(), atol=1e-4)


def test_mixed_float16_trains_with_loss_scaling():
    from keras_maskrcnn.data import synthetic_dataset

    model = MaskRCNN(num_classes=3, backbone="resnet18", backbone_norm="batch_norm", fpn_channels=16,
                     representation_size=16, min_size=64, max_size=64, box_batch_size_per_image=16,
                     dtype="mixed_float16")
    assert model.backbone.conv1.compute_dtype == "float16" and model.fpn.compute_dtype == "float16"
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    inputs, targets = next(iter(synthetic_dataset(2, 2, image_size=(64, 64), seed=3)))
    logs = model.train_on_batch(inputs, targets, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values()) and logs["mask_loss"] > 0
    out = model(inputs)
    assert out["boxes"].dtype == tf.float32 and np.all(np.isfinite(out["boxes"].numpy()))
