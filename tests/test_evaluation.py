"""Tests for keras_maskrcnn.evaluation on a tiny synthetic COCO set (images written to tmp_path)."""
import glob
import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import keras
from keras_maskrcnn import evaluation
from keras_maskrcnn.data import categories

CATEGORY_IDS = (3, 7, 12)  # non-contiguous on purpose


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO iscrowd-style RLE: run lengths over the column-major flattening, zeros first."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _polygon_ann(poly, h, w):
    xs, ys = poly[0::2], poly[1::2]
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {"segmentation": [poly], "bbox": [float(v) for v in bbox], "area": float(mask_utils.area(rle))}


def _mask_ann(mask, crowd):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = mask_utils.toBbox(rle).tolist()
    if crowd:
        segm = _uncompressed_rle(mask)
    else:
        segm = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return {"segmentation": segm, "bbox": bbox, "area": float(mask_utils.area(rle)), "iscrowd": int(crowd)}


def _image_hash(image: np.ndarray) -> str:
    image = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()


def _read_rgb(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """3 images (one grayscale, one in a subfolder), polygons, one RLE, one iscrowd RLE."""
    root = tmp_path_factory.mktemp("coco")
    image_dir = root / "images"
    (image_dir / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    specs = [(1, "a.png", 48, 64, "RGB"), (2, "sub/b.png", 40, 40, "L"), (5, "c.png", 56, 50, "RGB")]
    images = []
    for image_id, name, h, w, mode in specs:
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(image_dir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})

    block = np.zeros((40, 40), np.uint8)
    block[5:25, 8:20] = 1
    crowd = np.zeros((40, 40), np.uint8)
    crowd[28:38, 2:36] = 1
    anns = [
        dict(image_id=1, category_id=3, iscrowd=0, **_polygon_ann([4, 6, 30, 6, 30, 26, 4, 26], 48, 64)),
        dict(image_id=1, category_id=12, iscrowd=0, **_polygon_ann([35, 5, 60, 5, 47, 40], 48, 64)),
        dict(image_id=2, category_id=7, **_mask_ann(block, crowd=False)),
        dict(image_id=2, category_id=3, **_mask_ann(crowd, crowd=True)),
        dict(image_id=5, category_id=7, iscrowd=0, **_polygon_ann([10, 10, 40, 12, 38, 50, 12, 45], 56, 50)),
        dict(image_id=5, category_id=12, iscrowd=0, **_polygon_ann([2, 2, 9, 2, 9, 9, 2, 9], 56, 50)),
    ]
    for i, ann in enumerate(anns):
        ann["id"] = 100 + i
    dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": f"cat{c}"} for c in CATEGORY_IDS],
    }
    annotation_file = root / "instances.json"
    annotation_file.write_text(json.dumps(dataset))
    return str(annotation_file), str(image_dir)


class FakeModel:
    """Returns the ground truth of whatever image it receives, found by content hash."""

    def __init__(self, annotation_file, image_dir, crowd_detections=False, shift_image=None):
        coco = COCO(annotation_file)
        cat_to_cls = categories.category_to_class(coco.getCatIds())
        self.by_hash = {}
        self.calls = []
        for image_id, info in coco.imgs.items():
            image = _read_rgb(os.path.join(image_dir, info["file_name"]))
            anns = [
                a
                for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
                if crowd_detections or not a["iscrowd"]
            ]
            boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            if image_id == shift_image:
                boxes[:, [0, 2]] += 8.0
            self.by_hash[_image_hash(image)] = {
                "boxes": boxes,
                # A crowd-region detection outranks the rest: it would cost AP unless ignored.
                "scores": np.array([1.0 if a["iscrowd"] else 0.9 for a in anns], np.float32),
                "classes": np.array([cat_to_cls[a["category_id"]] for a in anns], np.int32),
                "masks": np.stack([coco.annToMask(a) for a in anns]).astype(np.uint8)
                if anns
                else np.zeros((0,) + image.shape[:2], np.uint8),
            }

    def predict_images(self, images, batch_size=2):
        self.calls.append(len(images))
        return [self.by_hash[_image_hash(image)] for image in images]


class EmptyModel:
    def predict_images(self, images, batch_size=2):
        return [
            {
                "boxes": np.zeros((0, 4), np.float32),
                "scores": np.zeros((0,), np.float32),
                "classes": np.zeros((0,), np.int32),
                "masks": np.zeros((0,) + image.shape[:2], np.uint8),
            }
            for image in images
        ]


def test_ground_truth_predictions_give_ap_one(coco_set):
    model = FakeModel(*coco_set)
    metrics = evaluation.evaluate_coco(model, *coco_set, batch_size=2)
    assert model.calls == [2, 1]
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == set(evaluation.METRIC_NAMES)
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert metrics[iou_type][name] == pytest.approx(1.0), (iou_type, name)
        assert metrics[iou_type]["APl"] == -1.0  # no large ground truth: pycocotools' own -1


def test_crowd_region_detections_are_ignored(coco_set):
    metrics = evaluation.evaluate_coco(FakeModel(*coco_set, crowd_detections=True), *coco_set)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)


def test_shifted_boxes_lower_box_ap_only(coco_set):
    metrics = evaluation.evaluate_coco(FakeModel(*coco_set, shift_image=1), *coco_set)
    assert metrics["bbox"]["AP"] < 0.9
    assert metrics["segm"]["AP"] == pytest.approx(1.0)


def test_empty_predictions_give_zero(coco_set, tmp_path):
    metrics = evaluation.evaluate_coco(EmptyModel(), *coco_set, results_file=tmp_path / "r.json")
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == 0.0
        assert metrics[iou_type]["AR100"] == 0.0
        assert all(v in (0.0, -1.0) for v in metrics[iou_type].values())
    assert json.loads((tmp_path / "r.json").read_text()) == []
    assert evaluation.coco_metrics(coco_set[0], [], "segm")["AP"] == 0.0


def test_results_file_and_image_subset(coco_set, tmp_path):
    path = tmp_path / "out" / "results.json"
    # Only image 1 is evaluated: params.imgIds must exclude the unpredicted images.
    metrics = evaluation.evaluate_coco(FakeModel(*coco_set), *coco_set, max_images=1, results_file=path)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    results = json.loads(path.read_text())
    assert len(results) == 2 and {r["image_id"] for r in results} == {1}
    coco_gt = COCO(coco_set[0])
    coco_dt = coco_gt.loadRes(str(path))
    assert len(coco_dt.getAnnIds()) == 2
    assert evaluation.coco_metrics(coco_gt, str(path), "bbox", image_ids=[1])["AP"] == pytest.approx(1.0)

    metrics = evaluation.evaluate_coco(FakeModel(*coco_set), *coco_set, image_ids=[5, 2])
    assert metrics["segm"]["AP"] == pytest.approx(1.0)


def test_predictions_to_coco_results_rle_round_trip():
    rng = np.random.default_rng(1)
    masks = (rng.random((3, 17, 23)) > 0.5).astype(np.uint8)
    prediction = {
        "boxes": np.array([[1, 2, 5, 9], [0, 0, 23, 17], [3.5, 4.25, 10, 11]], np.float32),
        "scores": np.array([0.9, 0.5, 0.1], np.float32),
        "classes": np.array([1, 3, 2], np.int32),
        "masks": masks,
    }
    results = evaluation.predictions_to_coco_results(42, prediction, categories.class_to_category(CATEGORY_IDS))
    json.dumps(results)  # JSON-serialisable
    assert [r["category_id"] for r in results] == [3, 12, 7]
    assert results[2]["bbox"] == [3.5, 4.25, 6.5, 6.75]
    assert results[0]["score"] == pytest.approx(0.9) and all(r["image_id"] == 42 for r in results)
    for r, m in zip(results, masks):
        assert isinstance(r["segmentation"]["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]), m)

    with pytest.raises(ValueError, match="no COCO category"):
        evaluation.predictions_to_coco_results(1, dict(prediction, classes=np.array([1, 4, 2])), {1: 3, 2: 7, 3: 12})


def test_maskrcnn_runs_on_the_data_pipeline_with_predict_images_results(coco_set, tmp_path):
    """A MaskRCNN is evaluated on the data pipeline and its own post-processing; the results are
    predict_images' on the same images in the same batches, bit for bit."""
    from keras_maskrcnn import MaskRCNN
    from keras_maskrcnn.presets import small_model_config

    keras.utils.set_random_seed(0)
    config = dict(small_model_config(64), min_size=48, max_size=64, detections_per_image=10)
    model = MaskRCNN(num_classes=len(CATEGORY_IDS), **config)
    model.build()

    class ThroughPredictImages:  # not a MaskRCNN: evaluated through predict_images
        def predict_images(self, images, batch_size=2):
            return model.predict_images(images, batch_size=batch_size)

    paths = [tmp_path / "pipeline.json", tmp_path / "predict_images.json"]
    metrics = [
        evaluation.evaluate_coco(candidate, *coco_set, batch_size=2, results_file=path)
        for candidate, path in zip((model, ThroughPredictImages()), paths)
    ]
    results = [json.loads(path.read_text()) for path in paths]
    assert len(results[0]) > 0
    assert results[0] == results[1]
    assert metrics[0] == metrics[1]


def test_missing_image_names_the_file(coco_set, tmp_path):
    with pytest.raises(OSError, match="a.png"):
        evaluation.evaluate_coco(EmptyModel(), coco_set[0], str(tmp_path))


class DummyDetector(keras.Sequential):
    """A tiny trainable Keras model that also offers the predict_images contract."""

    def __init__(self, fake):
        super().__init__([keras.Input((4,)), keras.layers.Dense(1)])
        self.fake = fake

    def predict_images(self, images, batch_size=2):
        return self.fake.predict_images(images, batch_size)


def test_callback_writes_history_and_tensorboard(coco_set, tmp_path):
    model = DummyDetector(FakeModel(*coco_set))
    model.compile(optimizer="sgd", loss="mse")
    callback = evaluation.CocoEvaluationCallback(*coco_set, log_dir=str(tmp_path))
    x = np.random.rand(8, 4).astype(np.float32)
    y = np.random.rand(8, 1).astype(np.float32)
    history = model.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[callback])
    for iou_type in ("bbox", "segm"):
        for name in evaluation.METRIC_NAMES:
            assert len(history.history[f"val_{iou_type}_{name}"]) == 2
    assert history.history["val_bbox_AP"] == pytest.approx([1.0, 1.0])
    assert history.history["val_segm_AP50"] == pytest.approx([1.0, 1.0])

    events = glob.glob(str(tmp_path / "coco_eval" / "events.out.tfevents.*"))
    assert events
    values = {}
    for path in events:
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                values.setdefault(v.tag, []).append(float(tf.make_ndarray(v.tensor)))
    assert {"bbox/AP", "segm/AP", "segm/ARl"} <= set(values)
    assert values["segm/AP"] == pytest.approx([1.0, 1.0])


def test_callback_schedule():
    callback = evaluation.CocoEvaluationCallback("unused.json", "unused", every_n_epochs=3)
    callback.set_params({"epochs": 5})
    assert [e for e in range(5) if callback._should_evaluate(e)] == [2, 4]
