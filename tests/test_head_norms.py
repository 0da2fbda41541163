"""Batch norm in the FPN and the heads (torchvision's v2 layout), the masked training batch norm of
the RoI heads, and the RPN head's conv depth: each against plain numpy written from the definitions."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_maskrcnn.layers.box_head import BoxHead
from keras_maskrcnn.layers.fpn import FeaturePyramidNetwork
from keras_maskrcnn.layers.mask_head import MaskHead
from keras_maskrcnn.layers.norm import _masked_batch_norm_training, make_norm
from keras_maskrcnn.layers.rpn import RPNHead

EPS = 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng()


def conv_nhwc(x, kernel, bias=None):
    """Stride-1 convolution with zero padding k // 2 on every side, from the definition."""
    k = kernel.shape[0]
    p = k // 2
    padded = np.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
    h, w = x.shape[1], x.shape[2]
    out = np.zeros(x.shape[:3] + (kernel.shape[3],))
    for dy in range(k):
        for dx in range(k):
            out += padded[:, dy:dy + h, dx:dx + w] @ kernel[dy, dx]
    return out if bias is None else out + bias


def bn_inference(x, bn):
    g, b, m, v = (w.numpy() for w in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
    return (x - m) / np.sqrt(v + EPS) * g + b


def randomise_bn(layer, rng):
    """Random affine parameters and running statistics in every batch norm under ``layer``."""
    for sub in layer._flatten_layers(include_self=False, recursive=True):
        if isinstance(sub, keras.layers.BatchNormalization):
            c = sub.gamma.shape[0]
            sub.gamma.assign(rng.uniform(0.5, 1.5, c))
            sub.beta.assign(rng.normal(0, 0.5, c))
            sub.moving_mean.assign(rng.normal(0, 0.5, c))
            sub.moving_variance.assign(rng.uniform(0.5, 2.0, c))


def test_masked_batch_norm_uses_valid_rows_only(rng):
    n, c = 7, 5
    x = rng.normal(2.0, 3.0, size=(n, 3, 4, c)).astype("float32")
    valid = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    x[~valid] = 1e3  # padding rows that would dominate unmasked statistics
    bn = make_norm("batch_norm", "bn")
    bn.build((None, 3, 4, c))
    bn.gamma.assign(rng.uniform(0.5, 1.5, c))
    bn.beta.assign(rng.normal(size=c))
    y = _masked_batch_norm_training(bn, tf.constant(x), tf.constant(valid)).numpy()
    rows = x[valid].reshape(-1, c).astype(np.float64)
    mean, var = rows.mean(0), rows.var(0)
    expected = (x - mean) / np.sqrt(var + EPS) * bn.gamma.numpy() + bn.beta.numpy()
    np.testing.assert_allclose(y[valid], expected[valid], rtol=1e-4, atol=1e-4)
    # Moving statistics as PyTorch: momentum 0.1 towards the mean and the UNBIASED variance.
    count = rows.shape[0]
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 + 0.1 * var * count / (count - 1), rtol=1e-5)


def test_masked_batch_norm_without_valid_rows_keeps_statistics(rng):
    bn = make_norm("batch_norm", "bn")
    bn.build((None, 2, 2, 3))
    x = tf.constant(rng.normal(size=(4, 2, 2, 3)), tf.float32)
    y = _masked_batch_norm_training(bn, x, tf.zeros([4], tf.bool))
    assert np.all(np.isfinite(y.numpy()))
    np.testing.assert_array_equal(bn.moving_mean.numpy(), 0.0)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), 1.0)


def test_fpn_with_batch_norm_matches_numpy(rng):
    fpn = FeaturePyramidNetwork(channels=6, norm="batch_norm")
    feats = [rng.normal(size=(2, n, n + 1, 3 + i)).astype("float32") for i, n in enumerate((16, 8, 4, 2))]
    fpn.build([f.shape for f in feats])
    randomise_bn(fpn, rng)
    assert all(not conv.use_bias for conv in fpn.lateral_convs + fpn.output_convs)
    got = fpn([tf.constant(f) for f in feats], training=False)

    def lateral(i):
        return bn_inference(conv_nhwc(feats[i], fpn.lateral_convs[i].kernel.numpy()), fpn.lateral_norms[i])

    def output(i, x):
        return bn_inference(conv_nhwc(x, fpn.output_convs[i].kernel.numpy()), fpn.output_norms[i])

    last = lateral(3)
    expected = [output(3, last)]
    for i in (2, 1, 0):
        h, w = feats[i].shape[1:3]
        rows = np.floor(np.arange(h) * last.shape[1] / h).astype(int)
        cols = np.floor(np.arange(w) * last.shape[2] / w).astype(int)
        last = lateral(i) + last[:, rows][:, :, cols]
        expected.insert(0, output(i, last))
    expected.append(expected[-1][:, ::2, ::2])
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-4, atol=1e-4)


def test_conv_box_head_matches_numpy(rng):
    head = BoxHead(num_classes=2, representation_size=12, num_convs=2, conv_channels=5, num_fcs=1, norm="batch_norm")
    x = rng.normal(size=(2, 3, 4, 4, 6)).astype("float32")
    head.build(x.shape)
    randomise_bn(head, rng)
    logits, deltas = head(tf.constant(x), training=False)
    assert logits.shape == (2, 3, 3) and deltas.shape == (2, 3, 3, 4)
    h = x.reshape(6, 4, 4, 6)
    for conv, norm in zip(head.convs, head.conv_norms):
        h = np.maximum(bn_inference(conv_nhwc(h, conv.kernel.numpy()), norm), 0)
    h = np.maximum(h.reshape(6, -1) @ head.fc6.kernel.numpy() + head.fc6.bias.numpy(), 0)
    expected = h @ head.cls_score.kernel.numpy() + head.cls_score.bias.numpy()
    np.testing.assert_allclose(logits.numpy().reshape(6, 3), expected, rtol=1e-4, atol=1e-4)


def test_mask_head_with_batch_norm_matches_numpy(rng):
    head = MaskHead(num_classes=2, channels=4, num_convs=2, norm="batch_norm")
    x = rng.normal(size=(1, 3, 5, 5, 3)).astype("float32")
    head.build(x.shape)
    randomise_bn(head, rng)
    got = head(tf.constant(x), training=False).numpy()
    h = x.reshape(3, 5, 5, 3)
    for conv, norm in zip(head.convs, head.norms):
        assert not conv.use_bias
        h = np.maximum(bn_inference(conv_nhwc(h, conv.kernel.numpy()), norm), 0)
    kernel, bias = head.upsample.kernel.numpy(), head.upsample.bias.numpy()  # [2, 2, C_out, C_in]
    up = np.zeros((3, 10, 10, 4))
    for dy in range(2):
        for dx in range(2):
            up[:, dy::2, dx::2] = h @ kernel[dy, dx].T
    up = np.maximum(up + bias, 0)
    expected = up @ head.logits.kernel.numpy()[0, 0] + head.logits.bias.numpy()
    np.testing.assert_allclose(got.reshape(3, 10, 10, 3), expected, rtol=1e-4, atol=1e-4)


def test_heads_batch_norm_training_ignores_padding_rois(rng):
    """In training the statistics come from the valid RoIs: padding rows change no output."""
    head = MaskHead(num_classes=2, channels=4, num_convs=1, norm="batch_norm")
    x = rng.normal(size=(1, 4, 5, 5, 3)).astype("float32")
    valid = np.array([[True, True, False, True]])
    a = head(tf.constant(x), training=True, valid=tf.constant(valid)).numpy()
    x[0, 2] = 100.0
    b = head(tf.constant(x), training=True, valid=tf.constant(valid)).numpy()
    np.testing.assert_allclose(a[valid], b[valid], rtol=1e-4, atol=1e-4)


def test_rpn_head_conv_depth_two_matches_numpy(rng):
    head = RPNHead(num_anchors=2, channels=4, conv_depth=2)
    x = rng.normal(size=(1, 5, 6, 4)).astype("float32")
    head.build([x.shape])
    for w in head.weights:
        w.assign(rng.normal(0, 0.3, w.shape))
    objectness, deltas = head([tf.constant(x)])
    h = x
    for conv in [head.conv] + head.extra_convs:
        h = np.maximum(conv_nhwc(h, conv.kernel.numpy(), conv.bias.numpy()), 0)
    logits = h @ head.cls_logits.kernel.numpy()[0, 0] + head.cls_logits.bias.numpy()
    np.testing.assert_allclose(objectness.numpy().reshape(5, 6, 2), logits[0], rtol=1e-4, atol=1e-4)
    assert [c.name for c in [head.conv] + head.extra_convs] == ["conv", "conv_1"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: FeaturePyramidNetwork(channels=8, norm="batch_norm"),
        lambda: RPNHead(num_anchors=2, channels=8, conv_depth=2),
        lambda: BoxHead(num_classes=2, representation_size=8, num_convs=4, conv_channels=8, num_fcs=1, norm="batch_norm"),
        lambda: MaskHead(num_classes=2, channels=8, num_convs=4, norm="batch_norm"),
    ],
)
def test_get_config_round_trip(make):
    layer = make()
    config = layer.get_config()
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(again) is type(layer) and again.get_config() == config


def test_bad_norm_names_the_argument():
    with pytest.raises(ValueError, match="norm"):
        FeaturePyramidNetwork(channels=8, norm="group_norm")
    with pytest.raises(ValueError, match="num_fcs"):
        BoxHead(num_classes=2, num_fcs=3)
