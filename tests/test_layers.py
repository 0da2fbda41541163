"""Anchors, FPN, RPN head, proposals, box head, detections and mask head: numpy references
and get_config round trips."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as ref
from keras_maskrcnn.layers.anchors import AnchorGenerator
from keras_maskrcnn.layers.box_head import BoxHead
from keras_maskrcnn.layers.detections import DetectionLayer
from keras_maskrcnn.layers.fpn import FeaturePyramidNetwork
from keras_maskrcnn.layers.mask_head import MaskHead
from keras_maskrcnn.layers.proposals import ProposalLayer
from keras_maskrcnn.layers.rpn import RPNHead


@pytest.fixture
def rng():
    return np.random.default_rng()


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_anchors_match_numpy_including_odd_p6_stride():
    gen = AnchorGenerator()
    image = (800, 1216)
    # 800 / 32 = 25 is odd, so P6 (ceil(25 / 2) = 13 rows) gets torchvision's stride 800 // 13 = 61.
    feats = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    got = gen(tf.constant(image), [tf.constant(f) for f in feats])
    expected = ref.anchors(image, feats, gen.sizes, gen.aspect_ratios)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g.numpy(), e)
    # Base anchors of size 32 are torchvision's rounded values.
    np.testing.assert_array_equal(got[0].numpy()[:3], [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]])


def test_fpn_shapes_and_top_down_nearest_rule(rng):
    fpn = FeaturePyramidNetwork(channels=8)
    feats = [tf.constant(rng.normal(size=(2, 64 // s, 96 // s, 4 * s)), tf.float32) for s in (4, 8, 16, 32)]
    outs = fpn(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 16, 24, 8), (2, 8, 12, 8), (2, 4, 6, 8), (2, 2, 3, 8), (2, 1, 2, 8)]
    # P5 = 3x3 conv of the C5 lateral; P6 = P5[::2, ::2].
    np.testing.assert_allclose(outs[4].numpy(), outs[3].numpy()[:, ::2, ::2], atol=0)
    # Odd sizes: PyTorch's nearest takes source floor(dst * in / out).
    feats = [tf.constant(rng.normal(size=(1, n, n, 3)), tf.float32) for n in (25, 13, 7, 4)]
    fpn = FeaturePyramidNetwork(channels=4)
    fpn(feats)
    lateral3 = fpn.lateral_convs[3](feats[3]).numpy()
    lateral2 = fpn.lateral_convs[2](feats[2]).numpy()
    src = np.floor(np.arange(7) * 4 / 7).astype(int)
    merged = lateral2 + lateral3[:, src][:, :, src]
    np.testing.assert_allclose(fpn.output_convs[2](merged).numpy(), fpn(feats)[2].numpy(), atol=1e-5)


def test_rpn_head_output_order(rng):
    head = RPNHead(num_anchors=3, channels=8)
    feats = [tf.constant(rng.normal(size=(2, 6, 5, 4)), tf.float32), tf.constant(rng.normal(size=(2, 3, 3, 4)), tf.float32)]
    obj, deltas = head(feats)
    assert obj.shape == (2, 6 * 5 * 3 + 3 * 3 * 3) and deltas.shape == (2, 117, 4)
    t = head.conv(feats[0])
    np.testing.assert_allclose(obj.numpy()[:, :90], head.cls_logits(t).numpy().reshape(2, -1), atol=1e-6)
    # Channel 4a + k of the delta conv is coordinate k of anchor a (torchvision's layout).
    np.testing.assert_allclose(deltas.numpy()[:, :90], head.bbox_pred(t).numpy().reshape(2, 90, 4), atol=1e-6)


def proposals_reference(objectness, deltas, anchors, image_size, pre, post, nms_thr, min_size):
    boxes, scores, levels, start = [], [], [], 0
    for lvl, a in enumerate(anchors):
        o = objectness[start : start + len(a)]
        d = deltas[start : start + len(a)]
        start += len(a)
        top = np.argsort(-o, kind="stable")[: min(pre, len(a))]
        boxes.append(ref.decode(d[top], a[top]))
        scores.append(sigmoid(o[top]))
        levels.append(np.full(len(top), lvl))
    boxes = ref.clip(np.concatenate(boxes), *image_size)
    scores, levels = np.concatenate(scores), np.concatenate(levels)
    keep = np.nonzero(((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size))[0]
    order = ref.batched_nms(boxes[keep], scores[keep], levels[keep], nms_thr)[:post]
    return boxes[keep][order], scores[keep][order]


def test_proposal_layer_matches_numpy(rng):
    image_sizes = np.array([[96, 128], [70, 100]])
    feats = [(24, 32), (12, 16), (6, 8)]
    anchors = [a.astype(np.float32) for a in ref.anchors((96, 128), feats, (16, 32, 64), (0.5, 1.0, 2.0))]
    total = sum(len(a) for a in anchors)
    # Distinct logits in a random order, 0.004 apart (sigmoids at least about 1e-5 apart, far above
    # float32's 6e-8 near 1): normal draws gave two proposals of equal float32 score, whose order
    # is a tie either implementation may break its own way.
    objectness = np.stack([rng.permutation(np.linspace(-6, 6, total)) for _ in range(2)]).astype(np.float32)
    deltas = rng.normal(0, 0.5, (2, total, 4)).astype(np.float32)
    deltas[0, :50, 2:] = -12  # tiny boxes, removed by min_size
    layer = ProposalLayer(pre_nms_top_n_test=300, post_nms_top_n_test=150, min_size=0.5)
    boxes, scores, num = layer(tf.constant(objectness), tf.constant(deltas), [tf.constant(a) for a in anchors], tf.constant(image_sizes))
    for b in range(2):
        eb, es = proposals_reference(objectness[b], deltas[b], anchors, image_sizes[b], 300, 150, 0.7, 0.5)
        assert num[b] == len(eb)
        np.testing.assert_allclose(boxes[b, : num[b]].numpy(), eb, atol=1e-3)
        np.testing.assert_allclose(scores[b, : num[b]].numpy(), es, atol=1e-6)
        assert np.all(boxes[b, num[b] :].numpy() == 0)


def detections_reference(logits, deltas, proposals, image_size, score_thr, nms_thr, max_det, weights):
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    num_classes = logits.shape[1] - 1
    boxes, scores, labels = [], [], []
    for c in range(1, num_classes + 1):
        boxes.append(ref.clip(ref.decode(deltas[:, c], proposals, weights), *image_size))
        scores.append(probs[:, c])
        labels.append(np.full(len(proposals), c))
    boxes, scores, labels = np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)
    keep = np.nonzero(scores > score_thr)[0]
    wh = boxes[keep, 2:] - boxes[keep, :2]
    keep = keep[(wh >= 1e-2).all(1)]
    order = ref.batched_nms(boxes[keep], scores[keep], labels[keep], nms_thr)[:max_det]
    return boxes[keep][order], scores[keep][order], labels[keep][order]


def test_detection_layer_matches_numpy(rng):
    n, k = 60, 4
    image_sizes = np.array([[80, 90], [64, 64]])
    proposals = np.stack([ref.clip(ref.random_boxes(rng, n, 80, 90, min_size=4, max_size=40), 64, 64) for _ in range(2)])
    logits = rng.normal(0, 2, (2, n, k + 1)).astype(np.float32)
    deltas = rng.normal(0, 1, (2, n, k + 1, 4)).astype(np.float32)
    num_proposals = np.array([n, 45])
    layer = DetectionLayer(score_threshold=0.1, nms_threshold=0.5, max_detections=25)
    out = layer(tf.constant(logits), tf.constant(deltas), tf.constant(proposals, tf.float32), tf.constant(num_proposals), tf.constant(image_sizes))
    for b in range(2):
        m = num_proposals[b]
        eb, es, el = detections_reference(logits[b, :m], deltas[b, :m], proposals[b, :m].astype(np.float32), image_sizes[b], 0.1, 0.5, 25, (10, 10, 5, 5))
        d = out["num_detections"][b].numpy()
        assert d == len(eb)
        np.testing.assert_allclose(out["scores"][b, :d].numpy(), es, atol=1e-6)
        np.testing.assert_allclose(out["boxes"][b, :d].numpy(), eb, atol=1e-3)
        np.testing.assert_array_equal(out["classes"][b, :d].numpy(), el)
        assert np.all(out["classes"][b, d:].numpy() == 0)


def test_detection_layer_no_proposals():
    layer = DetectionLayer(max_detections=5)
    out = layer(tf.zeros([1, 3, 3]), tf.zeros([1, 3, 3, 4]), tf.zeros([1, 3, 4]), tf.constant([0]), tf.constant([[10, 10]]))
    assert out["num_detections"].numpy().tolist() == [0] and out["boxes"].shape == (1, 5, 4)


def test_box_and_mask_head_shapes_and_flatten_order(rng):
    head = BoxHead(num_classes=3, representation_size=16)
    x = tf.constant(rng.normal(size=(2, 5, 7, 7, 8)), tf.float32)
    logits, deltas = head(x)
    assert logits.shape == (2, 5, 4) and deltas.shape == (2, 5, 4, 4)
    flat = x.numpy().reshape(10, -1)
    hidden = np.maximum(flat @ head.fc6.kernel.numpy() + head.fc6.bias.numpy(), 0)
    hidden = np.maximum(hidden @ head.fc7.kernel.numpy() + head.fc7.bias.numpy(), 0)
    np.testing.assert_allclose(logits.numpy().reshape(10, 4), hidden @ head.cls_score.kernel.numpy() + head.cls_score.bias.numpy(), atol=1e-4)
    mask = MaskHead(num_classes=3, channels=8)
    assert mask(tf.zeros([2, 3, 14, 14, 8])).shape == (2, 3, 28, 28, 4)


LAYERS = [
    lambda: AnchorGenerator(sizes=(8, 16), aspect_ratios=(1.0, 2.0)),
    lambda: FeaturePyramidNetwork(channels=8),
    lambda: RPNHead(num_anchors=2, channels=8),
    lambda: ProposalLayer(10, 20, 30, 40, 0.6, 0.1),
    lambda: BoxHead(num_classes=2, representation_size=8),
    lambda: DetectionLayer(0.2, 0.4, 7, 0.5, (1, 2, 3, 4)),
    lambda: MaskHead(num_classes=2, channels=8, num_convs=2),
]


@pytest.mark.parametrize("make", LAYERS)
def test_get_config_round_trip(make):
    layer = make()
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is type(layer) and again.get_config() == config
