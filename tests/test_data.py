"""Tests of keras_maskrcnn.data: COCO pipeline (coverage masks vs pycocotools, resize, flip, padding,
errors) and the synthetic dataset. Fixtures are tiny COCO files written into tmp_path."""
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import tvref
from keras_maskrcnn.data import (
    CocoSource,
    SyntheticShapes,
    category_to_class,
    class_to_category,
    coco_dataset,
    load_image,
    resize_image,
    mini_mask,
    resized_size,
    synthetic_dataset,
)

# pycocotools' decode trips a numpy 2 DeprecationWarning (copy keyword); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")

M = 128  # the pipeline's default mask_size
DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


# ------------------------------------------------------------------------------------------
# Fixture: a small COCO file with polygons, RLEs (compressed and not), crowd, degenerate box
# ------------------------------------------------------------------------------------------


def _blob_polygon(cx, cy, radius, n=24, seed=0):
    rng = np.random.default_rng(seed)
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radii = radius * (0.75 + 0.25 * rng.random(n))
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).ravel().tolist()


def _polygon_bbox(polygons):
    xy = np.concatenate([np.reshape(p, (-1, 2)) for p in polygons])
    x1, y1 = xy.min(0)
    x2, y2 = xy.max(0)
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


def _uncompressed_rle(mask):
    flat = np.asarray(mask, np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def _disk(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return ((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r).astype(np.uint8)


RECT_POLYGONS = [[8, 8, 24, 8, 24, 16, 8, 16], [8, 24, 24, 24, 24, 40, 8, 40]]  # box 16 x 32


@pytest.fixture
def coco_files(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    Image.fromarray(rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)).save(tmp_path / "img/a.png")
    Image.fromarray(rng.integers(0, 256, (50, 40), dtype=np.uint8), mode="L").save(tmp_path / "img/b.png")
    rgba = rng.integers(0, 256, (70, 70, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "img/c.png")

    blob = [_blob_polygon(50, 45, 30)]
    triangle = [[70, 60, 110, 60, 90, 95]]
    crowd = np.zeros((100, 120), np.uint8)
    crowd[60:90, 5:40] = 1
    disk = _disk(50, 40, 20, 22, 12)
    disk[rng.random(disk.shape) < 0.05] ^= 1  # ragged edges and holes
    compressed = mask_utils.encode(np.asfortranarray(disk))
    odd = np.zeros((50, 40), np.uint8)
    odd[5:20, 3:30] = 1
    odd[12:40, 20:26] = 1

    def ann(i, image_id, cat, segmentation, bbox, iscrowd=0):
        return {"id": i, "image_id": image_id, "category_id": cat, "segmentation": segmentation,
                "bbox": bbox, "area": 1.0, "iscrowd": iscrowd}

    annotations = [
        ann(1, 10, 17, blob, _polygon_bbox(blob)),
        ann(2, 10, 5, RECT_POLYGONS, _polygon_bbox(RECT_POLYGONS)),
        ann(3, 10, 90, triangle, _polygon_bbox(triangle)),
        ann(4, 10, 5, _uncompressed_rle(crowd), [5.0, 60.0, 35.0, 30.0], iscrowd=1),
        ann(5, 10, 5, [[30, 30, 30, 40, 30, 35]], [30.0, 30.0, 0.0, 10.0]),  # zero-area box
        ann(6, 20, 90, {"size": [50, 40], "counts": compressed["counts"].decode()},
            mask_utils.toBbox(compressed).tolist()),
        ann(7, 20, 5, _uncompressed_rle(odd), [3.0, 5.0, 27.0, 35.0]),
    ]
    data = {
        "images": [
            {"id": 10, "file_name": "a.png", "height": 100, "width": 120},
            {"id": 20, "file_name": "b.png", "height": 50, "width": 40},
            {"id": 30, "file_name": "c.png", "height": 70, "width": 70},
        ],
        "annotations": annotations,
        "categories": [{"id": 90, "name": "c90"}, {"id": 5, "name": "c5"}, {"id": 17, "name": "c17"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, tmp_path / "img"


KEPT = {10: [1, 2, 3], 20: [6, 7], 30: []}  # annotation ids that become targets, in order
CLASSES = {10: [2, 1, 3], 20: [3, 1], 30: []}  # categories 5, 17, 90 -> classes 1, 2, 3


def _reference_mini_mask(full, box):
    """Coverage mask of the full-resolution mask (area of each of the box's M x M cells covered)."""
    return mini_mask(full, np.asarray(box), M)


def _first_batch(dataset):
    return next(iter(dataset))


# ------------------------------------------------------------------------------------------
# COCO: coverage masks, categories, crowd
# ------------------------------------------------------------------------------------------


def test_mini_masks_agree_with_pycocotools(coco_files):
    path, image_dir = coco_files
    source = CocoSource(path, image_dir)
    coco = COCO(str(path))
    for image_id, ann_ids in KEPT.items():
        boxes, classes, masks = source.targets(image_id, M)
        assert boxes.shape == (len(ann_ids), 4) and masks.shape == (len(ann_ids), M, M)
        assert masks.dtype == np.uint8 and classes.dtype == np.int32
        assert classes.tolist() == CLASSES[image_id]
        for box, mask, ann_id in zip(boxes, masks, ann_ids):
            ann = coco.anns[ann_id]
            x, y, w, h = ann["bbox"]
            np.testing.assert_allclose(box, [x, y, x + w, y + h], atol=1e-4)
            full = coco.annToMask(ann)
            reference = _reference_mini_mask(full, box)
            # Polygons are rasterised as annToMask does (on a canvas cut at the box), RLEs decoded:
            # the same pixels, so the same coverage, for every kind.
            np.testing.assert_array_equal(mask, reference, err_msg=f"annotation {ann_id}")
            assert mask.any()


def test_rectangle_polygon_mini_mask_is_exact(coco_files):
    path, image_dir = coco_files
    boxes, _, masks = CocoSource(path, image_dir).targets(10, M)
    # Box (8, 8, 24, 40); rows cover y in [8, 16) and [24, 40) -> cell rows [0, 32) and [64, 128).
    expected = np.zeros((M, M), np.uint8)
    expected[:32] = 255
    expected[64:] = 255
    np.testing.assert_array_equal(boxes[1], [8, 8, 24, 40])
    np.testing.assert_array_equal(masks[1], expected)


def _cell_overlaps(lo, hi, n, size):
    """``[n, size]`` length of each of ``n`` equal cells of ``[lo, hi]`` inside pixel ``[k, k + 1]``."""
    edges = lo + (hi - lo) * np.arange(n + 1) / n
    pixels = np.arange(size)
    return np.maximum(np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels), 0)


def test_mini_mask_is_the_area_average():
    rng = np.random.default_rng(4)
    full = (rng.random((40, 50)) < 0.3).astype(np.uint8)
    for box in [(3.3, 2.7, 41.9, 30.2), (0, 0, 50, 40), (45.5, 30.25, 50, 40), (10, 10, 11, 11), (-2.5, 35.5, 7.25, 45)]:
        for n in (8, 64, 128):
            x1, y1, x2, y2 = box
            area = _cell_overlaps(y1, y2, n, 40) @ full @ _cell_overlaps(x1, x2, n, 50).T
            expected = 255 * area / ((x2 - x1) * (y2 - y1) / n**2)  # outside the image counts as empty
            got = mini_mask(full, np.array(box), n)
            assert got.dtype == np.uint8 and got.shape == (n, n)
            assert np.abs(got - expected).max() <= 0.5 + 1e-6, (box, n)


def test_thin_polygon_parts_keep_their_area():
    """Two vertical 4-pixel bars at the sides of a 600-pixel box: point samples 600 / 64 pixels
    apart all missed them; coverage keeps each row's and column's share of their area."""
    from keras_maskrcnn.data.coco import annotation_mini_mask

    bars = [[20, 10, 24, 10, 24, 610, 20, 610], [616, 10, 620, 10, 620, 610, 616, 610]]
    box = np.array([20, 10, 620, 610], np.float32)
    mask = annotation_mini_mask(bars, box, M, 700, 700).astype(np.float64) / 255
    cell = 600 / M
    np.testing.assert_allclose(mask.sum() * cell * cell, 2 * 4 * 600, rtol=2e-3)
    np.testing.assert_allclose(mask.sum(1) * cell, 8, rtol=2e-3)  # every row of cells: 2 x 4 pixels
    columns = mask.mean(0)  # covered fraction of each column of cells
    assert 2 <= np.count_nonzero(columns) <= 4 and abs(columns.sum() * cell - 8) < 0.02


def test_category_mapping_and_source_metadata(coco_files):
    path, image_dir = coco_files
    source = CocoSource(path, image_dir)
    assert source.category_to_class == {5: 1, 17: 2, 90: 3} == category_to_class([90, 5, 17])
    assert source.class_to_category == {1: 5, 2: 17, 3: 90} == class_to_category([90, 5, 17])
    assert source.class_names == {1: "c5", 2: "c17", 3: "c90"}
    assert source.num_classes == 3 and source.image_ids == [10, 20, 30]
    dataset = coco_dataset(path, image_dir, batch_size=1, training=False, min_size=None)
    assert dataset.coco_source.class_to_category == {1: 5, 2: 17, 3: 90}


# ------------------------------------------------------------------------------------------
# COCO: batches (evaluation structure, resize, padding)
# ------------------------------------------------------------------------------------------


def test_eval_batch_structure_resize_and_padding(coco_files):
    path, image_dir = coco_files
    source = CocoSource(path, image_dir)
    dataset = coco_dataset(path, image_dir, batch_size=3, training=False, min_size=64, max_size=100,
                           max_instances=None)
    inputs, targets = _first_batch(dataset)
    assert set(inputs) == {"images", "image_sizes", "image_ids", "original_sizes", "scales"}
    assert set(targets) == {"boxes", "classes", "masks"}
    images = inputs["images"].numpy()
    assert images.dtype == np.float32 and images.shape[0] == 3
    assert images.shape[1] % 32 == 0 and images.shape[2] % 32 == 0
    np.testing.assert_array_equal(inputs["image_ids"].numpy(), [10, 20, 30])
    assert inputs["image_ids"].dtype == tf.int64
    np.testing.assert_array_equal(inputs["original_sizes"].numpy(), [[100, 120], [50, 40], [70, 70]])
    # short side 64 unless the long side exceeds 100: 100x120 -> 64x76, 50x40 -> 80x64, 70x70 -> 64x64.
    np.testing.assert_array_equal(inputs["image_sizes"].numpy(), [[64, 76], [80, 64], [64, 64]])
    assert inputs["image_sizes"].dtype == tf.int32
    expected_scales = [[0.64, 76 / 120], [1.6, 1.6], [64 / 70, 64 / 70]]
    np.testing.assert_allclose(inputs["scales"].numpy(), expected_scales, rtol=1e-6)
    assert targets["boxes"].shape == (3, 3, 4) and targets["masks"].shape == (3, 3, M, M)
    assert targets["classes"].dtype == tf.int32 and targets["masks"].dtype == tf.uint8
    for b, image_id in enumerate([10, 20, 30]):
        h, w = inputs["image_sizes"][b].numpy()
        original = load_image(source.image_path(image_id))
        expected = tf.image.resize(original.astype(np.float32), (h, w)).numpy()
        np.testing.assert_allclose(images[b, :h, :w], expected, atol=1e-3)
        assert not images[b, h:].any() and not images[b, :, w:].any()  # zero padding
        boxes, classes, masks = source.targets(image_id, M)
        n = len(boxes)
        sy, sx = inputs["scales"][b].numpy()
        np.testing.assert_allclose(targets["boxes"][b, :n].numpy(), boxes * [sx, sy, sx, sy], rtol=1e-6)
        np.testing.assert_array_equal(targets["classes"][b, :n].numpy(), classes)
        np.testing.assert_array_equal(targets["masks"][b, :n].numpy(), masks)
        assert not targets["boxes"][b, n:].numpy().any() and not targets["classes"][b, n:].numpy().any()
        assert not targets["masks"][b, n:].numpy().any()


def test_fixed_max_instances_truncates_with_one_warning(coco_files, caplog):
    path, image_dir = coco_files
    dataset = coco_dataset(path, image_dir, batch_size=3, training=False, min_size=None, max_instances=2)
    with caplog.at_level(logging.WARNING, logger="keras_maskrcnn.data.coco"):
        batches = list(dataset) + list(dataset)
    inputs, targets = batches[0]
    assert dataset.element_spec[1]["boxes"].shape.as_list() == [None, 2, 4]
    np.testing.assert_array_equal(targets["classes"].numpy(), [[2, 1], [3, 1], [0, 0]])
    assert len([r for r in caplog.records if "max_instances" in r.getMessage()]) == 1
    dataset = coco_dataset(path, image_dir, batch_size=3, training=False, min_size=None, max_instances=5)
    _, targets = _first_batch(dataset)
    np.testing.assert_array_equal(targets["classes"].numpy(), [[2, 1, 3, 0, 0], [3, 1, 0, 0, 0], [0] * 5])


def test_batch_without_instances(coco_files):
    path, image_dir = coco_files
    inputs, targets = _first_batch(coco_dataset(path, image_dir, batch_size=2, training=True, image_ids=[30],
                                                min_size=None, max_instances=None))
    assert set(inputs) == {"images", "image_sizes"}
    assert inputs["images"].shape == (1, 96, 96, 3)
    assert targets["boxes"].shape == (1, 0, 4) and targets["classes"].shape == (1, 0)
    assert targets["masks"].shape == (1, 0, M, M)
    dataset = coco_dataset(path, image_dir, batch_size=2, training=True, image_ids=[30], min_size=None)
    _, targets = _first_batch(dataset)
    assert targets["boxes"].shape == (1, 100, 4) and not targets["boxes"].numpy().any()


def test_resize_rule():
    cases = [(600, 800, 800, 1333), (480, 640, 800, 1333), (427, 640, 800, 1333), (100, 3000, 800, 1333),
             (800, 600, 800, 1333), (333, 500, 512, 700), (37, 53, 50, 60), (1, 1, 800, 1333)]
    for h, w, min_size, max_size in cases:
        scale = min(min_size / min(h, w), max_size / max(h, w))
        expected = (math.floor(h * scale), math.floor(w * scale))
        got = tuple(int(v) for v in resized_size(h, w, min_size, max_size))
        assert got == expected, (h, w, min_size, max_size)
    image = np.zeros((37, 53, 3), np.uint8)
    resized, scale = tf.function(lambda x: resize_image(x, 50, 60))(image)  # also works in a graph
    assert resized.shape == (37 * 60 // 53, 60, 3) and resized.dtype == tf.float32
    np.testing.assert_allclose(scale.numpy(), [41 / 37, 60 / 53], rtol=1e-6)


@tvref.requires_torchvision
def test_resize_matches_torchvision():
    rng = np.random.default_rng(1)
    shapes = [(37, 53, 3), (61, 40, 3)]
    images = {f"im{i}": rng.integers(0, 256, shape, dtype=np.uint8) for i, shape in enumerate(shapes)}
    out = tvref.run(
        """
        from torchvision.models.detection.transform import _resize_image_and_masks
        for name, image in inputs.items():
            x = torch.from_numpy(image).permute(2, 0, 1).float()
            outputs[name] = _resize_image_and_masks(x, 50, 70)[0].permute(1, 2, 0)
        """,
        **images,
    )
    for name, image in images.items():
        resized, _ = resize_image(image, 50, 70)
        assert resized.shape == out[name].shape
        np.testing.assert_allclose(resized.numpy(), out[name], atol=1e-3)


# ------------------------------------------------------------------------------------------
# COCO: horizontal flip
# ------------------------------------------------------------------------------------------


def _paste(mask, box, height, width):
    """Render a coverage mask into a full ``[height, width]`` mask: pixels at least half covered
    (each pixel's coverage the area-weighted mean of the cells over it; mirror-symmetric)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    area = _cell_overlaps(y1, y2, M, height).T @ (mask / 255.0) @ _cell_overlaps(x1, x2, M, width)
    return area >= 0.5  # pixels have unit area


def test_horizontal_flip(coco_files):
    path, image_dir = coco_files
    common = dict(batch_size=3, min_size=64, max_size=100, max_instances=None, shuffle=False)
    plain_inputs, plain = _first_batch(coco_dataset(path, image_dir, training=False, **common))
    flip_dataset = coco_dataset(path, image_dir, training=True, flip_probability=1.0, **common)
    flip_inputs, flipped = _first_batch(flip_dataset)
    np.testing.assert_array_equal(flip_inputs["image_sizes"], plain_inputs["image_sizes"])
    for b in range(3):
        h, w = plain_inputs["image_sizes"][b].numpy()
        mirrored = plain_inputs["images"][b, :h, :w][:, ::-1]
        np.testing.assert_allclose(flip_inputs["images"][b, :h, :w], mirrored, atol=1e-2)
        boxes = plain["boxes"][b].numpy()
        valid = plain["classes"][b].numpy() > 0
        expected_boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        expected_boxes *= valid[:, None]
        np.testing.assert_allclose(flipped["boxes"][b].numpy(), expected_boxes, atol=1e-4)
        np.testing.assert_array_equal(flipped["classes"][b], plain["classes"][b])
        for i in np.flatnonzero(valid):
            full = _paste(plain["masks"][b, i].numpy(), boxes[i], h, w)
            full_flipped = _paste(flipped["masks"][b, i].numpy(), flipped["boxes"][b, i].numpy(), h, w)
            assert full.any()
            # Equal up to pixels covered exactly half (rounding ties).
            assert (full_flipped == full[:, ::-1]).mean() > 0.995


@pytest.mark.parametrize("max_instances", [None, 4])
def test_mirror_copies_follow_each_image(coco_files, max_instances):
    """Each training image (randomly flipped or not) is followed in its batch by its mirror: the
    valid region reversed left to right, boxes x -> w - x, mask columns reversed, classes equal."""
    path, image_dir = coco_files
    common = dict(batch_size=3, min_size=64, max_size=100, max_instances=max_instances, training=True,
                  seed=int(np.random.default_rng().integers(1 << 30)))
    inputs, targets = _first_batch(coco_dataset(path, image_dir, mirror_copies=True, **common))
    plain_inputs, _ = _first_batch(coco_dataset(path, image_dir, **common))
    assert inputs["images"].shape[0] == 6 and targets["boxes"].shape[0] == 6
    # The same images in the same order (the mirror copies draw no randomness of their own).
    np.testing.assert_array_equal(inputs["image_sizes"][::2], plain_inputs["image_sizes"])
    np.testing.assert_array_equal(inputs["images"][::2], plain_inputs["images"])
    for b in range(0, 6, 2):
        h, w = inputs["image_sizes"][b].numpy()
        np.testing.assert_array_equal(inputs["image_sizes"][b + 1], [h, w])
        np.testing.assert_array_equal(inputs["images"][b + 1, :h, :w], inputs["images"][b, :h, :w][:, ::-1])
        assert not inputs["images"][b + 1, h:].numpy().any() and not inputs["images"][b + 1, :, w:].numpy().any()
        boxes = targets["boxes"][b].numpy()
        valid = targets["classes"][b].numpy() > 0
        expected = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1) * valid[:, None]
        np.testing.assert_allclose(targets["boxes"][b + 1].numpy(), expected, atol=1e-4)
        np.testing.assert_array_equal(targets["classes"][b + 1], targets["classes"][b])
        np.testing.assert_array_equal(targets["masks"][b + 1], targets["masks"][b].numpy()[..., ::-1])
    assert (targets["classes"].numpy() > 0).sum() == 2 * 5  # images 10 and 20: 3 + 2 instances, twice
    # Evaluation sets are never mirrored.
    eval_inputs, _ = _first_batch(coco_dataset(path, image_dir, batch_size=3, training=False, mirror_copies=True))
    assert eval_inputs["images"].shape[0] == 3


def test_training_is_reproducible_with_seed(coco_files):
    path, image_dir = coco_files

    def run():
        dataset = coco_dataset(path, image_dir, batch_size=1, training=True, min_size=None, seed=3,
                               max_instances=None)
        return [t["boxes"].numpy() for _, t in dataset]

    first = run()
    assert all(np.array_equal(a, b) for a, b in zip(first, run()))


# ------------------------------------------------------------------------------------------
# COCO: images and errors
# ------------------------------------------------------------------------------------------


def test_load_image_modes(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    np.testing.assert_array_equal(load_image(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, -1))
    rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgba[..., :3])
    deep = np.array([[1000, 2000], [3000, 5000]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    image = load_image(tmp_path / "deep.png")
    assert image.shape == (2, 2, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], [[0, 64], [128, 255]])


def test_errors_name_the_file(tmp_path, coco_files):
    path, image_dir = coco_files
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco_dataset(missing, image_dir, batch_size=1, training=True)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="bad.json"):
        coco_dataset(bad, image_dir, batch_size=1, training=True)
    (image_dir / "b.png").rename(image_dir / "moved.png")
    with pytest.raises(FileNotFoundError, match="b.png"):
        coco_dataset(path, image_dir, batch_size=1, training=True)
    (image_dir / "b.png").write_bytes(b"this is not a png")
    dataset = coco_dataset(path, image_dir, batch_size=1, training=False, min_size=None)
    with pytest.raises(Exception, match="b.png"):
        list(dataset)
    with pytest.raises(ValueError, match="b.png"):
        load_image(image_dir / "b.png")


# ------------------------------------------------------------------------------------------
# Synthetic dataset
# ------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_masks_match_boxes():
    generator = SyntheticShapes(num_classes=5, seed=7)
    for index in range(6):
        sample = generator.sample(index)
        again = SyntheticShapes(num_classes=5, seed=7).sample(index)
        for name in ("image", "label_map", "boxes", "classes"):
            np.testing.assert_array_equal(getattr(sample, name), getattr(again, name))
        assert sample.image.shape == (256, 256, 3) and sample.image.dtype == np.uint8
        assert len(sample.boxes) >= 1 and set(sample.classes.tolist()) <= {1, 2, 3, 4, 5}
        masks = sample.masks
        mini = sample.mini_masks(M)
        for mask, box, small in zip(masks, sample.boxes, mini):
            rows, cols = np.nonzero(mask)
            np.testing.assert_array_equal(box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            assert mask.sum() >= generator.min_visible_pixels
            np.testing.assert_array_equal(small, mini_mask(mask, box, M))
        # Instances are disjoint (occlusion resolved) and cover exactly the non-background labels.
        assert masks.sum(0).max() <= 1 and masks.sum() == (sample.label_map > 0).sum()
    other = SyntheticShapes(num_classes=5, seed=8).sample(0)
    assert not np.array_equal(other.image, generator.sample(0).image)


def test_synthetic_dataset_structure_and_reproducibility(coco_files):
    path, image_dir = coco_files
    for training in (True, False):
        synthetic = synthetic_dataset(4, batch_size=2, training=training, seed=1)
        coco = coco_dataset(path, image_dir, batch_size=2, training=training)
        assert tf.nest.map_structure(lambda s: s.dtype, synthetic.element_spec) == \
            tf.nest.map_structure(lambda s: s.dtype, coco.element_spec)
        assert tf.nest.map_structure(lambda s: s.shape.as_list(), synthetic.element_spec) == \
            tf.nest.map_structure(lambda s: s.shape.as_list(), coco.element_spec)
    first = [t["boxes"].numpy() for _, t in synthetic_dataset(4, batch_size=2, seed=1)]
    second = [t["boxes"].numpy() for _, t in synthetic_dataset(4, batch_size=2, seed=1)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    inputs, targets = _first_batch(synthetic_dataset(2, batch_size=2, image_size=(100, 150), training=False,
                                                     min_size=128, max_size=200))
    np.testing.assert_array_equal(inputs["image_sizes"], [[128, 192], [128, 192]])
    assert inputs["images"].shape == (2, 128, 192, 3)


def test_synthetic_write_coco_round_trip(tmp_path):
    generator = SyntheticShapes(num_classes=4, seed=5)
    annotation_file = generator.write_coco(tmp_path, 3)
    data = json.loads(Path(annotation_file).read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
    common = dict(batch_size=3, training=False, max_instances=None)
    from_files = _first_batch(coco_dataset(annotation_file, tmp_path, min_size=None, **common))
    generated = _first_batch(generator.dataset(3, **common))
    tf.nest.map_structure(lambda a, b: np.testing.assert_array_equal(a, b), from_files, generated)
    coco = COCO(annotation_file)
    for ann in coco.anns.values():  # boxes are the masks' extents
        np.testing.assert_allclose(mask_utils.toBbox(coco.annToRLE(ann)), ann["bbox"])


# ------------------------------------------------------------------------------------------
# Real data (skipped when ../shared/datasets is absent)
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (DATASETS / "fruits_nuts").is_dir(), reason="../shared/datasets/fruits_nuts absent")
def test_fruits_nuts_mini_masks():
    folder = DATASETS / "fruits_nuts"
    source = CocoSource(folder / "instances.json", folder)
    agreement = []
    for image_id in source.image_ids[:4]:
        boxes, classes, masks = source.targets(image_id, M)
        anns = [a for a in source.coco.imgToAnns[image_id] if not a["iscrowd"]]
        assert len(anns) == len(boxes) > 0
        for ann, box, mask in zip(anns, boxes, masks):
            agreement.append((mask == _reference_mini_mask(source.coco.annToMask(ann), box)).mean())
    assert min(agreement) >= 0.97
    dataset = coco_dataset(folder / "instances.json", folder, batch_size=1, training=False,
                           min_size=200, max_size=400, image_ids=source.image_ids[:1])
    inputs, targets = _first_batch(dataset)
    assert inputs["images"].shape == (1, 224, 288, 3)  # 600x800 -> 200x266, padded to 32
