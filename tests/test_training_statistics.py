"""detectron2's training statistics of the RoI heads (keras_maskrcnn.training_statistics) against
numpy written from detectron2's definitions (fast_rcnn.py's cls_accuracy and num_fg_samples,
mask_head.py's mask_rcnn/accuracy, false_positive, false_negative), and their place in fit's logs."""
import numpy as np
import pytest
import tensorflow as tf

from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.data import synthetic_dataset
from keras_maskrcnn.training_statistics import STATISTIC_NAMES, box_head_statistics, mask_statistics, ratio


def _value(pair):
    return float(ratio(*pair))


def test_box_head_statistics_match_numpy():
    rng = np.random.default_rng()
    logits = rng.normal(size=(2, 9, 4)).astype("float32")
    labels = rng.integers(0, 4, size=(2, 9))
    valid = rng.random((2, 9)) < 0.8
    valid[1, 0] = True
    positive = (labels > 0) & valid
    stats = box_head_statistics(tf.constant(logits), tf.constant(labels), tf.constant(valid), tf.constant(positive))
    correct = logits.argmax(-1) == labels
    assert _value(stats["class_accuracy"]) == pytest.approx(correct[valid].mean(), abs=1e-6)
    assert _value(stats["fg_fraction"]) == pytest.approx(positive[valid].mean(), abs=1e-6)


def test_mask_statistics_match_numpy_and_ignore_rois_that_are_not_foreground():
    rng = np.random.default_rng()
    logits = rng.normal(size=(2, 5, 6, 6)).astype("float32")
    targets = rng.random((2, 5, 6, 6)).astype("float32")
    positive = np.array([[True, True, False, True, False], [False, True, True, False, False]])
    stats = mask_statistics(tf.constant(logits), tf.constant(targets), tf.constant(positive))
    pred, gt = logits[positive] > 0, targets[positive] > 0.5
    wrong = pred != gt
    assert _value(stats["mask_accuracy"]) == pytest.approx(1 - wrong.mean(), abs=1e-6)
    assert _value(stats["mask_false_positive"]) == pytest.approx((wrong & ~gt).sum() / (~gt).sum(), abs=1e-6)
    assert _value(stats["mask_false_negative"]) == pytest.approx((wrong & gt).sum() / gt.sum(), abs=1e-6)


def test_no_foreground_gives_zero_not_nan():
    stats = mask_statistics(tf.ones([1, 2, 4, 4]), tf.ones([1, 2, 4, 4]), tf.constant([[False, False]]))
    assert all(_value(stats[name]) == 0.0 for name in stats)


def test_fit_logs_the_statistics_in_range():
    model = MaskRCNN(
        num_classes=3, backbone="resnet18", backbone_norm="batch_norm", fpn_channels=16, representation_size=32,
        mask_head_convs=1, mask_head_channels=16, anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=50, box_batch_size_per_image=32,
    )
    model.compile(optimizer="adam")
    data = synthetic_dataset(4, 2, image_size=(64, 64), seed=3)
    history = model.fit(data, epochs=1, steps_per_epoch=2, verbose=0, validation_data=data, validation_steps=1)
    for name in STATISTIC_NAMES:
        for key in (name, f"val_{name}"):
            value = history.history[key][-1]
            assert 0.0 <= value <= 1.0, (key, value)
    # The ground-truth boxes join the proposals, so some sampled RoIs are always foreground.
    assert history.history["fg_fraction"][-1] > 0.0
