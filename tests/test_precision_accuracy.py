"""The float32-vs-bfloat16 comparison of benchmarks/precision_accuracy.py on hand-made detections."""
import importlib.util
import os

import numpy as np

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "precision_accuracy.py")
_spec = importlib.util.spec_from_file_location("precision_accuracy", _PATH)
precision_accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(precision_accuracy)


def _detections(boxes, scores, classes, masks):
    return {"boxes": np.array(boxes, "float32").reshape(-1, 4), "scores": np.array(scores, "float32"),
            "classes": np.array(classes, "int32"), "masks": np.array(masks, "uint8").reshape(-1, 20, 20)}


def _mask(x1, y1, x2, y2):
    m = np.zeros((20, 20), "uint8")
    m[y1:y2, x1:x2] = 1
    return m


def test_compare_detections_counts_matches_and_explains_exceptions():
    rng = np.random.default_rng()
    shift = float(rng.uniform(0, 0.2))  # keeps box IoU above 0.9
    reference = [
        _detections(
            [[0, 0, 10, 10], [10, 10, 20, 20], [0, 10, 10, 20], [5, 5, 15, 15]],
            [0.9, 0.8, 0.7, 0.3],  # the last is below the score cut: not compared
            [1, 2, 1, 3],
            [_mask(0, 0, 10, 10), _mask(10, 10, 20, 20), _mask(0, 10, 10, 20), _mask(5, 5, 15, 15)],
        ),
        _detections([], [], [], np.zeros((0, 20, 20))),
    ]
    other = [
        _detections(
            # 0: same box, same mask; 1: same box, mask one column narrower (IoU 0.9);
            # 2: same box but another class (unmatched).
            [[shift, 0, 10 + shift, 10], [10, 10, 20, 20], [0, 10, 10, 20]],
            [0.91, 0.8, 0.6],
            [1, 2, 3],
            [_mask(0, 0, 10, 10), _mask(10, 10, 19, 20), _mask(0, 10, 10, 20)],
        ),
        _detections([], [], [], np.zeros((0, 20, 20))),
    ]
    matched, total, mask_ious, exceptions = precision_accuracy.compare_detections(reference, other, score=0.5)
    assert (matched, total) == (2, 3)
    np.testing.assert_allclose(np.sort(mask_ious), [0.9, 1.0], atol=1e-6)
    by_kind = {e["kind"]: e for e in exceptions}
    assert len(exceptions) == 2
    assert by_kind["mask IoU < 0.95"]["pixels_differing"] == 10
    assert by_kind["mask IoU < 0.95"]["area"] == 100
    unmatched = by_kind["unmatched"]
    assert unmatched["class"] == 1 and unmatched["best_same_class_box_iou"] == 0.0
    assert unmatched["best_any_class"]["class"] == 3 and unmatched["best_any_class"]["box_iou"] == 1.0


def test_compare_detections_with_nothing_detected_in_other():
    reference = [_detections([[0, 0, 4, 4]], [0.9], [1], [_mask(0, 0, 4, 4)])]
    other = [_detections([], [], [], np.zeros((0, 20, 20)))]
    matched, total, mask_ious, exceptions = precision_accuracy.compare_detections(reference, other, score=0.5)
    assert (matched, total, len(mask_ious)) == (0, 1, 0)
    assert exceptions[0]["kind"] == "unmatched" and exceptions[0]["best_any_class"] is None
