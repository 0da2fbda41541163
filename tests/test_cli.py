"""Tests for the ``keras-maskrcnn`` command (keras_maskrcnn.cli), keras_maskrcnn.visualize and
keras_maskrcnn.train, on a tiny saved model and tiny synthetic COCO folders (64 x 64 images)."""
import json
import os

import keras
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.cli import main
from keras_maskrcnn.data import SyntheticShapes
from keras_maskrcnn.optimizers import FusedAdamW
from keras_maskrcnn.evaluation import METRIC_NAMES
from keras_maskrcnn.train import build_optimizer, latest_checkpoint, load_label_map, save_label_map
from keras_maskrcnn.visualize import class_color, draw_detections, save_png

SIZE = 64


def _tiny_model(num_classes=2):
    # Small heads and few proposals keep the CPU cost down; a zero score threshold makes sure the
    # untrained model returns detections.
    return MaskRCNN(
        num_classes=num_classes,
        backbone="resnet50",
        min_size=SIZE,
        max_size=SIZE,
        fpn_channels=16,
        representation_size=16,
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=50,
        detections_per_image=5,
        box_score_threshold=0.0,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    model = _tiny_model()
    model(np.zeros([1, SIZE, SIZE, 3], np.uint8))
    model.save(str(directory / "model.keras"))
    save_label_map(str(directory / "classes.json"), {1: 5, 2: 9}, {1: "apple", 2: "pear"})
    return directory


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("coco")
    annotations = SyntheticShapes((SIZE, SIZE), num_classes=2, instances_per_image=(1, 3), seed=3).write_coco(
        str(directory), 2
    )
    return directory, annotations


def _run(argv):
    """``main(argv)`` -> exit status (0 on a normal return)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


# ------------------------------------------------------------------------------------------ help


HELP_OPTIONS = {
    "train": [
        "--annotations", "--images", "--synthetic", "--output", "--epochs", "--batch-size", "--lr",
        "--momentum", "--weight-decay", "--warmup-steps", "--backbone", "--min-size", "--max-size",
        "--val-annotations", "--val-images", "--eval-every", "--mixed-precision", "--steps-per-epoch",
        "--resume", "--seed", "--clipnorm", "--lr-schedule", "--backbone-norm", "mixed_bfloat16", "mixed_float16",
        "--strategy", "--backup-every", "resnet18", "--loss-weights", "--mirror-copies",
    ],
    "evaluate": ["--annotations", "--images", "--model", "--max-images", "--results"],
    "predict": ["--model", "--output", "--score-threshold", "--classes", "IMAGE"],
    "export": ["--model", "--output", "--version", "--full-masks", "--overwrite"],
    "convert": ["--checkpoint", "--output", "--num-classes", "weights_only"],
    "validate": ["--annotations", "--images", "--quick", "--errors-only"],
}


@pytest.mark.parametrize("command", sorted(HELP_OPTIONS))
def test_help_lists_every_option(command, capsys):
    assert _run([command, "--help"]) == 0
    out = capsys.readouterr().out
    for option in HELP_OPTIONS[command]:
        assert option in out, f"{option} missing from `{command} --help`"


def test_top_level_help_lists_commands(capsys):
    assert _run(["--help"]) == 0
    out = capsys.readouterr().out
    for command in HELP_OPTIONS:
        assert command in out


# ------------------------------------------------------------------------------------------ errors


def test_missing_images_dir_is_a_clear_error(coco_dir, model_dir, tmp_path, capsys):
    _, annotations = coco_dir
    missing = str(tmp_path / "no_such_dir")
    code = _run(["evaluate", "--annotations", annotations, "--images", missing, "--model", str(model_dir / "model.keras")])
    assert code != 0
    err = capsys.readouterr().err
    assert "--images" in err and "not found" in err and "no_such_dir" in err


def test_missing_annotation_file_is_a_clear_error(tmp_path, capsys):
    missing = str(tmp_path / "missing.json")
    code = _run(["train", "--annotations", missing, "--images", str(tmp_path), "--output", str(tmp_path / "out")])
    assert code != 0
    err = capsys.readouterr().err
    assert "--annotations" in err and "not found" in err and "missing.json" in err
    assert not os.path.exists(tmp_path / "out")


def test_train_needs_a_data_source(tmp_path, capsys):
    assert _run(["train", "--output", str(tmp_path / "out")]) != 0
    assert "--synthetic" in capsys.readouterr().err


def test_missing_image_for_predict(model_dir, tmp_path, capsys):
    code = _run(["predict", "--model", str(model_dir / "model.keras"), "--output", str(tmp_path), "nope.png"])
    assert code == 1
    assert "image not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ predict


def test_predict_writes_pngs_and_results(model_dir, tmp_path):
    rng = np.random.default_rng(0)
    shapes = {"a.png": (SIZE, SIZE), "b.jpg": (48, 80)}
    paths = []
    for name, (h, w) in shapes.items():
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    out = tmp_path / "out"
    code = _run(["predict", "--model", str(model_dir / "model.keras"), "--output", str(out),
                 "--score-threshold", "0", *paths])
    assert code == 0
    for name, (h, w) in shapes.items():
        png = out / (os.path.splitext(name)[0] + ".png")
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == (w, h)
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results, "an untrained model with a zero threshold should return detections"
    assert {r["file_name"] for r in results} <= set(paths)
    for r in results:
        assert r["category_id"] in (5, 9)  # from classes.json next to the model
        assert len(r["bbox"]) == 4 and 0.0 <= r["score"] <= 1.0
        h, w = shapes[os.path.basename(r["file_name"])]
        assert mask_utils.decode(r["segmentation"]).shape == (h, w)
        assert r["image_id"] == paths.index(r["file_name"]) + 1


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_prints_metrics(model_dir, coco_dir, tmp_path, capsys):
    directory, annotations = coco_dir
    results, metrics = tmp_path / "results.json", tmp_path / "metrics.json"
    code = _run(["evaluate", "--annotations", annotations, "--images", str(directory),
                 "--model", str(model_dir / "model.keras"), "--max-images", "2",
                 "--results", str(results), "--metrics", str(metrics)])
    assert code == 0
    out = capsys.readouterr().out
    assert "bbox" in out and "segm" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in METRIC_NAMES]
    assert [r[0] for r in rows] == list(METRIC_NAMES)
    assert all(len(r) == 3 and all(-1.0 <= float(v) <= 1.0 for v in r[1:]) for r in rows)
    with open(metrics) as f:
        numbers = json.load(f)
    assert set(numbers) == {"bbox", "segm"} and all(set(v) == set(METRIC_NAMES) for v in numbers.values())
    with open(results) as f:
        assert isinstance(json.load(f), list)


# ------------------------------------------------------------------------------------------ visualize


def test_draw_detections_colours_masks_and_boxes(tmp_path):
    image = np.full((40, 50, 3), 100, np.uint8)
    masks = np.zeros((2, 40, 50), np.uint8)
    masks[0, 10:20, 10:20] = 1
    masks[1, 30:35, 40:45] = 1
    boxes = np.array([[10, 10, 20, 20], [40, 30, 45, 35]], np.float32)
    drawn = draw_detections(image, boxes, np.array([1, 2]), np.array([0.9, 0.1]), masks,
                            class_names={1: "cat", 2: "dog"}, score_threshold=0.5)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert np.all(drawn[14:17, 14:17] != image[14:17, 14:17])  # inside the first mask
    assert np.array_equal(drawn[31:34, 41:44], image[31:34, 41:44])  # below the threshold
    assert np.array_equal(drawn[38:, :5], image[38:, :5])  # far from every detection
    assert np.array_equal(image, np.full((40, 50, 3), 100, np.uint8))  # input untouched
    # Nothing above the threshold: unchanged; no detections at all: unchanged.
    assert np.array_equal(draw_detections(image, boxes, [1, 2], [0.2, 0.1], masks), image)
    empty = draw_detections(image, np.zeros((0, 4)), [], [], np.zeros((0, 40, 50)))
    assert np.array_equal(empty, image)
    assert class_color(3) == class_color(3) and class_color(1) != class_color(2)
    path = save_png(drawn, tmp_path / "sub" / "x.png")
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im), drawn)


# ------------------------------------------------------------------------------------------ train helpers


def test_build_optimizer_warmup_and_step_schedule():
    opt = build_optimizer(0.1, warmup_steps=10, warmup_factor=0.001, schedule="step", decay_steps=[20, 30])
    schedule = opt._learning_rate
    assert isinstance(opt, keras.optimizers.SGD) and callable(schedule)
    values = [float(schedule(s)) for s in (0, 5, 10, 19, 20, 30)]
    np.testing.assert_allclose(values, [1e-4, 0.05 + 0.5e-4, 0.1, 0.1, 0.01, 0.001], rtol=1e-5)
    cosine = build_optimizer(0.1, warmup_steps=0, schedule="cosine", total_steps=100)._learning_rate
    np.testing.assert_allclose([float(cosine(0)), float(cosine(50)), float(cosine(100))], [0.1, 0.05, 0.0], atol=1e-6)
    # The schedule survives serialisation (it is saved with the model's optimizer).
    config = keras.saving.serialize_keras_object(opt)
    restored = keras.saving.deserialize_keras_object(config)
    assert float(restored._learning_rate(5)) == pytest.approx(values[1])
    with pytest.raises(ValueError):
        build_optimizer(0.1, schedule="cosine")
    adamw = build_optimizer(1e-3, warmup_steps=10, schedule="constant", optimizer="adamw", clipnorm=5.0)
    assert isinstance(adamw, FusedAdamW) and adamw.global_clipnorm == 5.0
    assert float(adamw._learning_rate(10)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(0.1, optimizer="lion")


def test_label_map_round_trip_and_coco_categories(tmp_path):
    path = save_label_map(tmp_path / "classes.json", {1: 3, 2: 7}, {1: "a", 2: "b"})
    assert load_label_map(path) == ({1: 3, 2: 7}, {1: "a", 2: "b"})
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [], "categories": [{"id": 9, "name": "z"}, {"id": 4, "name": "y"}]}))
    assert load_label_map(coco) == ({1: 4, 2: 9}, {1: "y", 2: "z"})
    (tmp_path / "checkpoints").mkdir()
    for epoch in (2, 10, 9):
        (tmp_path / "checkpoints" / f"epoch-{epoch:03d}.keras").write_text("")
    assert latest_checkpoint(tmp_path / "checkpoints")[1] == 10


# ------------------------------------------------------------------------------------------ train


@pytest.mark.slow
def test_train_synthetic_writes_model_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    code = _run(["train", "--synthetic", "4", "--synthetic-size", str(SIZE), "--synthetic-val", "2",
                 "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--warmup-steps", "1",
                 "--output", str(out), "--verbose", "2"])
    assert code == 0
    assert (out / "model.keras").is_file()
    assert latest_checkpoint(out / "checkpoints")[1] == 1
    assert (out / "logs").is_dir()
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    for name in ("loss", "rpn_objectness_loss", "rpn_box_loss", "class_loss", "box_loss", "mask_loss", "val_segm_AP"):
        assert name in header
    class_to_category, names = load_label_map(out / "classes.json")
    assert class_to_category == {1: 1, 2: 2, 3: 3} and names[1] == "ellipse"
    model = keras.models.load_model(str(out / "model.keras"), compile=False)
    assert model.num_classes == 3
    # Training again for one more epoch with --resume continues from the checkpoint.
    code = _run(["train", "--synthetic", "4", "--synthetic-size", str(SIZE), "--synthetic-val", "0",
                 "--epochs", "2", "--steps-per-epoch", "1", "--output", str(out), "--resume", "--verbose", "0"])
    assert code == 0
    assert latest_checkpoint(out / "checkpoints")[1] == 2


def test_export_writes_a_versioned_saved_model(model_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert _run(["export", "--model", str(model_dir / "model.keras"), "--output", str(out)]) == 0
    assert (out / "1" / "saved_model.pb").is_file()
    assert "serving_bytes" in capsys.readouterr().out
    # The same version again is refused without --overwrite.
    assert _run(["export", "--model", str(model_dir / "model.keras"), "--output", str(out), "--version", "1"]) == 1


def test_train_without_options_prints_and_follows_its_plan(tmp_path, coco_dir, monkeypatch, capsys):
    # The plan for a small from-scratch dataset: no upscaling, the from-scratch preset, AdamW, the
    # precision "auto" picks (logged), in force while training and not after. Training itself is
    # replaced: this checks the wiring.
    import keras

    import keras_maskrcnn.train as train_module
    from keras_maskrcnn.precision import resolve_policy

    directory, annotations = coco_dir
    seen = {}
    monkeypatch.setattr(train_module, "train", lambda model, dataset, output, **kw: seen.update(
        model=model, dataset=dataset, policy=keras.mixed_precision.global_policy().name, **kw))
    keras.mixed_precision.set_global_policy("float32")
    code = _run(["train", "--annotations", annotations, "--images", str(directory),
                 "--output", str(tmp_path / "run"), "--epochs", "12"])
    assert code == 0
    assert seen["policy"] == resolve_policy("auto") and keras.mixed_precision.global_policy().name == "float32"
    out = capsys.readouterr().out
    assert "keras_maskrcnn precision auto -> " in out
    assert "Training plan:" in out and "resnet18" in out
    assert f"short side {SIZE}, long side at most {SIZE} px" in out
    model = seen["model"]
    assert model.get_config()["backbone"] == "resnet18" and model.backbone_norm == "batch_norm"
    assert (model.min_size, model.max_size) == (SIZE, SIZE)
    assert type(seen["optimizer"]).__name__ == "FusedAdamW"
    assert any(type(c).__name__ == "EpochTimeEstimate" for c in seen["callbacks"])
    inputs, _ = next(iter(seen["dataset"]))
    assert inputs["images"].shape[1:3] == (SIZE, SIZE)  # not enlarged to 800
    assert model.loss_weights["class_loss"] == 4.0 and "loss weights class_loss x4" in out


def test_train_loss_weights_replace_the_plans(tmp_path, coco_dir, monkeypatch, capsys):
    import keras_maskrcnn.train as train_module

    directory, annotations = coco_dir
    seen = {}
    monkeypatch.setattr(train_module, "train", lambda model, dataset, output, **kw: seen.update(model=model))
    code = _run(["train", "--annotations", annotations, "--images", str(directory), "--output", str(tmp_path / "run"),
                 "--epochs", "1", "--mixed-precision", "float32", "--loss-weights", "class_loss=1", "mask_loss=0.5"])
    assert code == 0
    assert seen["model"].loss_weights == dict(
        rpn_objectness_loss=1.0, rpn_box_loss=1.0, class_loss=1.0, box_loss=1.0, mask_loss=0.5)
    assert "loss weights mask_loss x0.5" in capsys.readouterr().out


@pytest.mark.parametrize("flag, mirrored", [([], True), (["--no-mirror-copies"], False)])
def test_train_mirror_copies_from_scratch_by_default(flag, mirrored, tmp_path, coco_dir, monkeypatch, capsys):
    import keras_maskrcnn.train as train_module

    directory, annotations = coco_dir
    seen = {}
    monkeypatch.setattr(train_module, "train", lambda model, dataset, output, **kw: seen.update(dataset=dataset))
    code = _run(["train", "--annotations", annotations, "--images", str(directory), "--output", str(tmp_path / "run"),
                 "--epochs", "1", "--mixed-precision", "float32", "--batch-size", "2", *flag])
    assert code == 0
    assert ("each image also mirrored in its batch (4 views per step)" in capsys.readouterr().out) == mirrored
    assert seen["dataset"].element_spec[0]["images"].shape[0] == (4 if mirrored else 2)


@pytest.mark.parametrize("value, message", [("cls_loss=2", "NAME=W with NAME one of"), ("mask_loss", "NAME=W"),
                                            ("mask_loss=x", "is not a number"), ("mask_loss=-1", ">= 0")])
def test_train_bad_loss_weight_is_a_usage_error(value, message, tmp_path, capsys):
    code = _run(["train", "--synthetic", "4", "--output", str(tmp_path / "out"), "--loss-weights", value])
    assert code == 2
    err = capsys.readouterr().err
    assert "--loss-weights" in err and message in err
    assert not os.path.exists(tmp_path / "out")
