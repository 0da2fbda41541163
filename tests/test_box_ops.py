"""Box arithmetic, NMS and mask pasting against numpy references (tests/reference.py)."""
import numpy as np
import pytest
import tensorflow as tf

import reference as ref
from keras_maskrcnn import boxes as box_ops
from keras_maskrcnn.ops.nms import batched_nms
from keras_maskrcnn.ops.paste_masks import paste_masks


@pytest.fixture
def rng():
    return np.random.default_rng()


def test_encode_decode_match_numpy_and_invert(rng):
    anchors = ref.random_boxes(rng, 200, 300, 400, min_size=2)
    # Targets within the decode clip (at most 62.5x the anchor's size) so decode inverts encode.
    sizes = (anchors[:, 2:] - anchors[:, :2]) * rng.uniform(0.05, 20, (200, 2))
    corner = anchors[:, :2] + rng.uniform(-50, 50, (200, 2))
    targets = np.concatenate([corner, corner + sizes], 1)
    for weights in [(1, 1, 1, 1), (10, 10, 5, 5)]:
        deltas = box_ops.encode_boxes(tf.constant(targets), tf.constant(anchors), weights).numpy()
        np.testing.assert_allclose(deltas, ref.encode(targets, anchors, weights), rtol=1e-5, atol=1e-5)
        decoded = box_ops.decode_boxes(tf.constant(deltas, tf.float32), tf.constant(anchors, tf.float32), weights)
        np.testing.assert_allclose(decoded.numpy(), targets, atol=2e-3)


def test_decode_clips_large_scale_deltas(rng):
    anchors = ref.random_boxes(rng, 50, 100, 100, min_size=2)
    deltas = rng.normal(0, 1, (50, 4)) * [1, 1, 10, 10]  # many dw, dh above log(1000/16)
    got = box_ops.decode_boxes(tf.constant(deltas, tf.float32), tf.constant(anchors, tf.float32)).numpy()
    np.testing.assert_allclose(got, ref.decode(deltas, anchors), rtol=1e-5, atol=1e-2)


def test_pairwise_iou_and_clip(rng):
    a = ref.random_boxes(rng, 30, 50, 60)
    b = np.concatenate([ref.random_boxes(rng, 20, 50, 60), np.zeros((2, 4))])  # zero-area rows
    np.testing.assert_allclose(box_ops.pairwise_iou(tf.constant(a), tf.constant(b)).numpy(), ref.iou_matrix(a, b), atol=1e-6)
    clipped = box_ops.clip_boxes(tf.constant(a[None], tf.float32), tf.constant([[50, 60]])).numpy()[0]
    np.testing.assert_allclose(clipped, ref.clip(a, 50, 60), atol=1e-4)


def test_coco_box_conversions_round_trip(rng):
    a = ref.random_boxes(rng, 10, 50, 60).astype(np.float32)
    np.testing.assert_allclose(box_ops.coco_to_xyxy(box_ops.xyxy_to_coco(a)).numpy(), a, atol=1e-4)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_batched_nms_matches_greedy_reference(rng, threshold):
    batch, n, max_out = 3, 300, 120
    boxes = np.stack([ref.random_boxes(rng, n, 200, 200, min_size=5, max_size=60) for _ in range(batch)])
    scores = rng.uniform(0, 1, (batch, n))
    groups = rng.integers(0, 4, (batch, n))
    valid = rng.uniform(size=(batch, n)) > 0.1
    idx, num = batched_nms(tf.constant(boxes), tf.constant(scores), max_out, threshold, tf.constant(groups), tf.constant(valid))
    for b in range(batch):
        sel = np.nonzero(valid[b])[0]
        expected = sel[ref.batched_nms(boxes[b, sel], scores[b, sel], groups[b, sel], threshold)][:max_out]
        assert num[b] == len(expected)
        np.testing.assert_array_equal(idx[b, : num[b]].numpy(), expected)
        assert np.all(idx[b, num[b] :].numpy() == 0)


def test_batched_nms_keeps_boxes_left_of_and_above_the_origin():
    # tf.image.non_max_suppression_padded reads a box with no positive coordinate as padding.
    boxes = tf.constant([[[-16, -8, -4, -1], [10, 10, 20, 20], [-5, -5, 0, 0], [-15, -7, -4, -1]]], tf.float32)
    scores = tf.constant([[0.9, 0.8, 0.7, 0.6]])
    for groups in (None, tf.constant([[0, 1, 0, 0]])):
        idx, num = batched_nms(boxes, scores, 4, 0.5, groups)
        assert num.numpy().tolist() == [3] and idx.numpy()[0, :3].tolist() == [0, 1, 2]


def test_batched_nms_fewer_boxes_than_output_and_empty():
    boxes = tf.constant([[[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]], tf.float32)
    idx, num = batched_nms(boxes, tf.constant([[0.9, 0.8, 0.7]]), 10, 0.5)
    assert num.numpy().tolist() == [2] and idx.numpy()[0, :2].tolist() == [0, 2]
    idx, num = batched_nms(tf.zeros([2, 0, 4]), tf.zeros([2, 0]), 5, 0.5)
    assert num.numpy().tolist() == [0, 0] and idx.shape == (2, 5)


def test_paste_masks_matches_torchvision_algorithm(rng):
    h, w, n = 47, 61, 12
    masks = rng.uniform(0, 1, (n, 28, 28)).astype(np.float32)
    boxes = ref.random_boxes(rng, n, h, w, min_size=0.3, max_size=40)
    boxes[0] = [-5.5, -3.2, 10.7, 8.9]  # leaves the image at the top left
    boxes[1] = [50.2, 40.1, 70.0, 60.0]  # leaves it at the bottom right
    boxes[2] = [10.0, 10.0, 10.4, 10.6]  # sub-pixel box
    boxes[3] = [0, 0, w, h]  # the whole image
    got = paste_masks(tf.constant(masks[None]), tf.constant(boxes[None], tf.float32), h, w).numpy()[0]
    for i in range(n):
        expected = ref.paste_mask(masks[i], boxes[i].astype(np.float32), h, w)
        np.testing.assert_allclose(got[i], expected, atol=1e-5, err_msg=f"box {boxes[i]}")


def test_paste_masks_same_in_graph_and_eager(rng):
    # Box corners with fractional parts, negative ones included: truncation must match torch's.
    masks = tf.constant(rng.uniform(0, 1, (1, 6, 28, 28)), tf.float32)
    boxes = tf.constant([[[-3.7, -2.2, 20.6, 15.3], [5.5, 7.9, 33.1, 29.99], [0.2, 0.7, 1.6, 1.2],
                          [10.1, 3.3, 39.8, 12.7], [-0.4, 30.2, 12.9, 39.0], [2.0, 2.0, 30.0, 30.0]]], tf.float32)
    eager = paste_masks(masks, boxes, 40, 41).numpy()
    graph = tf.function(paste_masks)(masks, boxes, 40, 41).numpy()
    np.testing.assert_array_equal(graph, eager)
    for i in range(6):
        np.testing.assert_allclose(graph[0, i], ref.paste_mask(masks.numpy()[0, i], boxes.numpy()[0, i], 40, 41), atol=1e-5)
