"""Bad input: keras_maskrcnn.data.validate (and ``keras-maskrcnn validate``) lists every problem
planted in a broken copy of a small synthetic COCO dataset, with its severity, file and
annotation id; the pipeline (keras_maskrcnn.data.coco) handles each case as the COCO tools do or
refuses it naming the annotation; training refuses to start on data with errors."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from keras_maskrcnn.cli import main
from keras_maskrcnn.data import CocoSource, SyntheticShapes, load_image
from keras_maskrcnn.data.validate import DataValidationError, Problem, errors_of, validate_coco

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
SIZE = 64


def _run(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _exif_jpeg(path, array, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, format="JPEG", quality=95, exif=exif.tobytes())


def _polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


# ------------------------------------------------------------------------------------------
# The broken dataset
# ------------------------------------------------------------------------------------------


class Broken:
    """A synthetic COCO dataset with planted problems; ``expected`` lists them as
    ``(severity, file name or None for the annotation file, annotation id, message pattern)``."""

    def __init__(self, root: Path):
        self.root = root
        self.annotation_file = Path(SyntheticShapes((SIZE, SIZE), num_classes=3, instances_per_image=(2, 3),
                                                    seed=5).write_coco(root, 12))
        data = json.loads(self.annotation_file.read_text())
        images = {im["id"]: im for im in data["images"]}
        anns = data["annotations"]
        by_image = {}
        for ann in anns:
            by_image.setdefault(ann["image_id"], []).append(ann)
        self.expected = []
        self.handled_images = {}

        def image_file(image_id):
            return self.root / images[image_id]["file_name"]

        def expect(severity, image_id, annotation_id, pattern):
            name = images[image_id]["file_name"] if image_id is not None else None
            self.expected.append((severity, name, annotation_id, pattern))

        # --- image files
        os.remove(image_file(1))  # missing
        expect("error", 1, None, "image file not found")
        image_file(2).write_bytes(b"this is not a PNG file")  # corrupt
        expect("error", 2, None, "cannot read the image file")
        array3 = np.asarray(Image.open(image_file(3)).convert("RGB"))
        os.remove(image_file(3))
        images[3]["file_name"] = "images/000003.jpg"
        Image.fromarray(array3).save(image_file(3), format="JPEG", quality=95)
        payload = image_file(3).read_bytes()
        image_file(3).write_bytes(payload[: len(payload) * 2 // 3])  # truncated JPEG
        expect("error", 3, None, "truncated")
        array4 = np.asarray(Image.open(image_file(4)).convert("RGB"))
        os.remove(image_file(4))
        images[4]["file_name"] = "images/000004.jpg"
        _exif_jpeg(image_file(4), array4, orientation=6)  # EXIF-rotated, square: same size either way
        expect("warning", 4, None, "EXIF orientation 6 is ignored")
        # An EXIF-rotated image annotated as displayed (rotated): stored 48 x 64, file says 64 x 48.
        _exif_jpeg(self.root / "images/rotated.jpg", np.zeros((48, 64, 3), np.uint8), orientation=6)
        data["images"].append({"id": 100, "file_name": "images/rotated.jpg", "height": 64, "width": 48})
        images[100] = data["images"][-1]
        expect("error", 100, None, r"48 x 64 .* says 64 x 48; its EXIF orientation 6 rotates it")
        # Handled without a report: greyscale, RGBA, 16-bit, no annotations.
        rgb5 = np.asarray(Image.open(image_file(5)).convert("RGB"))
        Image.fromarray(rgb5).convert("L").save(image_file(5))
        rgb6 = np.asarray(Image.open(image_file(6)).convert("RGB"))
        Image.fromarray(np.dstack([rgb6, np.full(rgb6.shape[:2], 7, np.uint8)]), mode="RGBA").save(image_file(6))
        sixteen = (np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 9 + 1000).astype(np.uint16)
        Image.fromarray(sixteen).save(image_file(7))  # mode I;16
        self.handled_images = {5: ("L", rgb5), 6: ("RGBA", rgb6), 7: ("I;16", sixteen)}
        data["annotations"] = anns = [a for a in anns if a["image_id"] != 8]  # image 8: no annotations

        # --- annotations (on images 9..12, which are otherwise fine)
        a = by_image[9]
        a[0]["bbox"] = [10.0, 10.0, 0.0, 5.0]  # zero area
        expect("warning", 9, a[0]["id"], "zero area")
        a[1]["bbox"] = [100.0, 100.0, 10.0, 10.0]  # entirely outside the 64 x 64 image
        expect("warning", 9, a[1]["id"], "lies outside the 64 x 64 image: the annotation is left out")
        a = by_image[10]
        a[0]["segmentation"] = _polygon(200, 200, 10, 10)  # polygon outside the image
        expect("warning", 10, a[0]["id"], "polygon 0 lies outside")
        a[1]["segmentation"] = [[10, 10, 20, 20]]  # 2 points
        expect("warning", 10, a[1]["id"], "fewer than 3")
        expect("warning", 10, a[1]["id"], "no usable polygon")
        a = by_image[11]
        a[0]["category_id"] = 99  # not in categories
        expect("error", 11, a[0]["id"], "category_id 99 is not in 'categories'")
        a[1]["iscrowd"] = 1  # crowd RLE: left out of training, no report
        self.crowd_id = a[1]["id"]
        a = by_image[12]
        a[0]["bbox"] = [float("nan"), 1.0, 5.0, 5.0]
        expect("error", 12, a[0]["id"], "non-finite")
        a[1]["segmentation"] = {"size": [32, 32], "counts": mask_utils.encode(
            np.asfortranarray(np.ones((32, 32), np.uint8)))["counts"].decode()}
        expect("error", 12, a[1]["id"], r"RLE size \[32, 32\] differs")
        if len(a) > 2:
            a[2]["id"] = a[1]["id"]  # duplicate annotation id
            expect("warning", 12, a[1]["id"], "duplicate annotation id")
        orphan = dict(by_image[9][-1], id=5000, image_id=999)  # image id that does not exist
        anns.append(orphan)
        self.expected.append(("warning", None, 5000, "image id 999 is not in 'images'"))
        # --- categories: non-contiguous ids are fine; an unused one is reported.
        data["categories"].append({"id": 40, "name": "unused"})
        self.expected.append(("warning", None, None, r"category 40 \('unused'\) has no usable annotation"))

        self.annotation_file.write_text(json.dumps(data))


@pytest.fixture
def broken(tmp_path):
    return Broken(tmp_path / "data")


def _matches(problem: Problem, expected, root: Path, annotation_file: Path) -> bool:
    severity, name, annotation_id, pattern = expected
    file = str(root / name) if name is not None else str(annotation_file)
    return (problem.severity == severity and problem.file == file and problem.annotation_id == annotation_id
            and re.search(pattern, problem.message) is not None)


@pytest.mark.parametrize("mode", ["decode", "header"])
def test_validate_lists_every_planted_problem_and_nothing_else(broken, mode):
    problems = validate_coco(broken.annotation_file, broken.root, check_images=mode)
    missing = [e for e in broken.expected if not any(_matches(p, e, broken.root, broken.annotation_file) for p in problems)]
    assert not missing, f"not reported: {missing}\nreported:\n" + "\n".join(map(str, problems))
    extra = [p for p in problems if not any(_matches(p, e, broken.root, broken.annotation_file) for e in broken.expected)]
    assert not extra, "unexpected:\n" + "\n".join(map(str, extra))
    assert problems == errors_of(problems) + [p for p in problems if p.severity == "warning"]  # errors first
    assert all(str(p).startswith(p.severity + ": ") for p in problems)


def test_validate_command_prints_the_problems_and_fails_on_errors(broken, tmp_path, capsys):
    code = _run(["validate", "--annotations", str(broken.annotation_file), "--images", str(broken.root)])
    out = capsys.readouterr().out
    assert code == 1
    for severity, name, annotation_id, pattern in broken.expected:
        line = [l for l in out.splitlines() if l.startswith(severity) and (name is None or name in l)
                and (annotation_id is None or f"annotation {annotation_id}" in l) and re.search(pattern, l)]
        assert line, (severity, name, annotation_id, pattern)
    errors = sum(e[0] == "error" for e in broken.expected)
    assert f"{errors} error(s), {len(broken.expected) - errors} warning(s)" in out

    clean = SyntheticShapes((SIZE, SIZE), seed=1).write_coco(tmp_path / "clean", 3)
    assert _run(["validate", "--annotations", clean, "--images", str(tmp_path / "clean")]) == 0
    assert "No problems found" in capsys.readouterr().out


def test_malformed_json_is_one_error_naming_the_file(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [{"id": 1, "file_name": "a.png"},]}')
    problems = validate_coco(path, tmp_path)
    assert len(problems) == 1 and problems[0].severity == "error" and problems[0].file == str(path)
    assert "malformed JSON" in problems[0].message and "line 1" in problems[0].message
    with pytest.raises(ValueError, match="Malformed JSON.*bad.json"):
        CocoSource(path, tmp_path)
    assert _run(["validate", "--annotations", str(path), "--images", str(tmp_path)]) == 1
    assert "malformed JSON" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# What the pipeline does with each case
# ------------------------------------------------------------------------------------------


def test_image_kinds_are_converted_to_rgb(broken):
    for image_id, (mode, reference) in broken.handled_images.items():
        path = broken.root / f"images/{image_id:06d}.png"
        assert Image.open(path).mode == mode
        image = load_image(path)
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        if mode == "L":  # luminance, replicated
            expected = np.asarray(Image.fromarray(reference).convert("L"))
            assert all(np.array_equal(image[..., c], expected) for c in range(3))
        elif mode == "RGBA":  # alpha dropped
            assert np.array_equal(image, reference)
        else:  # 16-bit: rescaled from its own [min, max] to [0, 255]
            assert image.min() == 0 and image.max() == 255 and np.all(image[..., 0] == image[..., 1])


def test_unreadable_files_raise_naming_the_file(broken):
    with pytest.raises(FileNotFoundError, match="000001.png"):
        load_image(broken.root / "images/000001.png")
    with pytest.raises(ValueError, match="000002.png"):
        load_image(broken.root / "images/000002.png")
    with pytest.raises(ValueError, match="000003.jpg.*truncated"):
        load_image(broken.root / "images/000003.jpg")
    with pytest.raises(FileNotFoundError, match="000001.png"):
        CocoSource(broken.annotation_file, broken.root)


def test_exif_orientation_is_ignored_as_by_pycocotools(broken):
    # The stored pixel grid, not the rotated view: 48 x 64 as stored.
    assert load_image(broken.root / "images/rotated.jpg").shape == (48, 64, 3)
    source = CocoSource(broken.annotation_file, broken.root, check_files=False)
    with pytest.raises(ValueError, match="rotated.jpg.*48 x 64.*64 x 48"):
        source.load_image(100)


def test_annotations_are_left_out_clipped_or_refused_as_reported(broken):
    source = CocoSource(broken.annotation_file, broken.root, check_files=False)
    # Non-contiguous and unused category ids map to classes 1..K in sorted order.
    assert source.category_to_class == {1: 1, 2: 2, 3: 3, 40: 4} and source.num_classes == 4
    anns = {ann["id"]: ann for ann in json.loads(broken.annotation_file.read_text())["annotations"]}
    per_image = {}
    for ann in anns.values():
        per_image.setdefault(ann["image_id"], []).append(ann)

    boxes, classes, masks = source.targets(8)  # no annotations: an all-background example
    assert boxes.shape == (0, 4) and classes.shape == (0,) and masks.shape == (0, 128, 128)
    # Zero-area and outside boxes are left out; the other annotations of image 9 stay.
    assert len(source.targets(9)[0]) == len(per_image[9]) - 2
    # A polygon with < 3 points leaves its annotation out; one outside the image gives an empty mask.
    boxes, classes, masks = source.targets(10)
    assert len(boxes) == len(per_image[10]) - 1 and masks[0].sum() == 0
    # Errors name the annotation, its image file and the annotation file.
    bad_category = [a["id"] for a in per_image[11] if a["category_id"] == 99][0]
    with pytest.raises(ValueError, match=rf"Annotation {bad_category} of image 11 .*000011.png.*category_id 99"):
        source.targets(11)
    with pytest.raises(ValueError, match=r"Annotation \d+ of image 12 .*non-finite"):
        source.targets(12)
    # The crowd RLE is left out of the targets (COCO evaluation keeps it as an ignore region).
    crowd = anns[broken.crowd_id]
    kept = [a for a in per_image[11] if not a.get("iscrowd") and a["category_id"] != 99]
    data = json.loads(broken.annotation_file.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["id"] != bad_category]
    fixed = broken.root / "fixed.json"
    fixed.write_text(json.dumps(data))
    assert crowd["iscrowd"] == 1
    assert len(CocoSource(fixed, broken.root, check_files=False).targets(11)[0]) == len(kept)


def test_training_refuses_to_start_on_errors(broken, tmp_path, capsys):
    # The CLI: fails at once, listing the errors, before building a model.
    code = _run(["train", "--annotations", str(broken.annotation_file), "--images", str(broken.root),
                 "--output", str(tmp_path / "out"), "--epochs", "1"])
    err = capsys.readouterr().err
    errors = sum(e[0] == "error" for e in broken.expected)
    assert code == 1 and f"{errors} error(s) in the dataset" in err and "000003.jpg" in err and "truncated" in err
    assert not (tmp_path / "out" / "model.keras").exists()

    # train(): a dataset whose only problem is a corrupt image file.
    from keras_maskrcnn import MaskRCNN
    from keras_maskrcnn.data import coco_dataset
    from keras_maskrcnn.presets import small_model_config
    from keras_maskrcnn.train import train

    root = tmp_path / "one_bad"
    annotations = SyntheticShapes((SIZE, SIZE), seed=2).write_coco(root, 3)
    (root / "images/000002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dataset = coco_dataset(annotations, root, batch_size=2, training=True, min_size=SIZE, max_size=SIZE)
    model = MaskRCNN(num_classes=3, **small_model_config(image_size=SIZE))
    with pytest.raises(DataValidationError, match=r"(?s)1 error\(s\).*000002.png.*cannot read") as info:
        train(model, dataset, tmp_path / "run", epochs=1)
    assert [p.file for p in errors_of(info.value.problems)] == [str(root / "images/000002.png")]
    assert not model.built  # refused before anything was built or trained


def test_an_image_without_annotations_trains_with_finite_losses():
    import tensorflow as tf

    from keras_maskrcnn import MaskRCNN
    from keras_maskrcnn.presets import small_model_config

    config = dict(small_model_config(image_size=SIZE), rpn_post_nms_top_n_train=50, box_batch_size_per_image=32)
    model = MaskRCNN(num_classes=3, **config)
    images = tf.random.uniform([2, SIZE, SIZE, 3], 0, 255)
    targets = {  # image 0 has one object, image 1 none
        "boxes": tf.constant([[[8.0, 8.0, 40.0, 40.0]], [[0.0, 0.0, 0.0, 0.0]]]),
        "classes": tf.constant([[1], [0]]),
        "masks": tf.ones([2, 1, 64, 64], tf.uint8),
    }
    losses = model.compute_losses(images, targets)
    assert all(np.isfinite(float(v)) for v in losses.values())
    nothing = {k: v[1:] for k, v in targets.items()}
    losses = model.compute_losses(images[1:], nothing)
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert float(losses["mask_loss"]) == 0.0 and float(losses["box_loss"]) == 0.0


@pytest.mark.skipif(not DATASETS.is_dir(), reason="shared datasets not available")
@pytest.mark.parametrize("name", ["fruits_nuts", "nuclei"])
def test_shared_datasets_are_clean(name):
    if not (DATASETS / name / "instances.json").is_file():
        pytest.skip(f"{name} not available")
    assert validate_coco(DATASETS / name / "instances.json", DATASETS / name) == []
