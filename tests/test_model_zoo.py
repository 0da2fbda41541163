"""Presets with weights: fetched through Keras' file cache (here from file:// URLs of files the test
makes), verified by the hash prefix in the file name, converted once, cached, fine-tuned."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from keras_maskrcnn import MaskRCNN, model_zoo
from keras_maskrcnn.convert import from_torchvision
import tvref
from test_convert import TINY, synthetic_state_dict, weights_of


@pytest.fixture
def tiny_preset(tmp_path, monkeypatch):
    """A preset whose 'published file' is a tiny torchvision-layout state dict with a valid hash name."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    source = tmp_path / "published"
    source.mkdir()
    raw = source / "tiny.npz"
    state = synthetic_state_dict(seed=5)
    np.savez(raw, **state)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    published = source / f"tiny_maskrcnn-{digest[:8]}.npz"
    shutil.move(raw, published)
    num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
    names = ("__background__",) + tuple(f"class{i}" for i in range(1, num_classes + 1))
    config = {k: v for k, v in from_torchvision(state, verbose=False, **TINY).get_config().items()
              if k not in ("name", "trainable", "dtype", "num_classes")}
    preset = model_zoo.Preset("tiny", published.as_uri(), "test preset", config, class_names=names)
    monkeypatch.setitem(model_zoo.PRESETS, "tiny", preset)
    return preset, state, published


def test_fetch_convert_cache_and_load_offline(tiny_preset):
    preset, state, published = tiny_preset
    expected = weights_of(from_torchvision(state, verbose=False, **TINY))
    model = MaskRCNN.from_preset("tiny", **TINY)
    assert set(weights_of(model)) == set(expected)
    for path, value in weights_of(model).items():
        np.testing.assert_array_equal(value, expected[path], err_msg=path)
    assert os.path.exists(model_zoo.converted_path(preset))
    os.remove(published)  # no "network" any more: the converted cache is enough
    again = MaskRCNN.from_preset("tiny", **TINY)
    for path, value in weights_of(again).items():
        np.testing.assert_array_equal(value, expected[path], err_msg=path)


def test_num_classes_gives_new_predictors_and_keeps_the_rest(tiny_preset):
    model = MaskRCNN.from_preset("tiny", num_classes=2, **TINY)
    coco = weights_of(MaskRCNN.from_preset("tiny", **TINY))
    assert model.num_classes == 2 and model.box_head.cls_score.kernel.shape[-1] == 3
    for path, value in weights_of(model).items():
        if "cls_score" in path or "bbox_pred" in path or "logits" in path:
            continue
        np.testing.assert_array_equal(value, coco[path], err_msg=path)


def test_wrong_hash_is_refused_and_the_file_not_used(tiny_preset, tmp_path, monkeypatch):
    preset, _, published = tiny_preset
    bad_name = published.with_name("tiny_maskrcnn-00000000.npz")
    shutil.copy(published, bad_name)
    bad = model_zoo.Preset("bad", bad_name.as_uri(), "corrupt", preset.config, class_names=preset.class_names)
    monkeypatch.setitem(model_zoo.PRESETS, "bad", bad)
    with pytest.raises(ValueError, match="expected a SHA-256 starting with 00000000, found [0-9a-f]{64}"):
        MaskRCNN.from_preset("bad", **TINY)
    cached = os.path.join(model_zoo.cache_dir(), bad_name.name)
    assert not os.path.exists(cached) and os.path.exists(cached + ".bad")
    assert not os.path.exists(model_zoo.converted_path(bad))


def test_offline_error_names_the_url_and_the_place_for_the_file(tiny_preset, tmp_path, monkeypatch):
    preset, _, _ = tiny_preset
    missing = (tmp_path / "nowhere" / "tiny_maskrcnn-1234abcd.npz").as_uri()
    offline = model_zoo.Preset("offline", missing, "unreachable", preset.config, class_names=preset.class_names)
    monkeypatch.setitem(model_zoo.PRESETS, "offline", offline)
    with pytest.raises(OSError) as error:
        MaskRCNN.from_preset("offline", **TINY)
    message = str(error.value)
    assert missing in message and os.path.join(model_zoo.cache_dir(), "tiny_maskrcnn-1234abcd.npz") in message


def test_published_presets_are_listed_with_their_ap_and_hash():
    listed = {p["name"]: p for p in model_zoo.list_presets()}
    assert listed["maskrcnn_resnet50_fpn_v2_coco"]["mask_ap"] == 41.8
    assert listed["maskrcnn_resnet50_fpn_coco"]["box_ap"] == 37.9
    assert model_zoo.get_preset("maskrcnn_resnet50_fpn_v2_coco").hash_prefix == "73cbd019"
    assert model_zoo.COCO_CLASS_NAMES[1] == "person" and model_zoo.COCO_CLASS_NAMES.count("N/A") == 10
    assert model_zoo.get_preset("maskrcnn_resnet50_fpn_v2_coco").config["fpn_norm"] == "batch_norm"
    with pytest.raises(ValueError, match="available"):
        model_zoo.get_preset("nope")


_TORCHVISION_WEIGHTS = {
    "maskrcnn_resnet50_fpn_coco": ("maskrcnn_resnet50_fpn", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"),
    "maskrcnn_resnet50_fpn_v2_coco": ("maskrcnn_resnet50_fpn_v2", "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"),
    "resnet50_imagenet": (None, "ResNet50_Weights.IMAGENET1K_V1"),
    "resnet101_imagenet": (None, "ResNet101_Weights.IMAGENET1K_V1"),
}


@tvref.requires_torchvision
def test_presets_carry_what_torchvision_publishes():
    """Each preset's URL (so its hash prefix), COCO AP, class names and preprocessing are the ones
    torchvision's weight enums publish, read from the reference environment (nothing is downloaded)."""
    assert set(_TORCHVISION_WEIGHTS) == set(model_zoo.PRESETS)
    script = """
import json
from torchvision import models
from torchvision.models import detection
info = {}
for name, (builder, weights) in json.loads(str(inputs["table"])).items():
    enum, member = weights.split(".")
    w = getattr(getattr(models, enum, None) or getattr(detection, enum), member)
    entry = {"url": w.url, "metrics": w.meta["_metrics"], "categories": w.meta["categories"]}
    if builder:
        t = getattr(detection, builder)(weights=None, weights_backbone=None).transform
        entry.update(min_size=list(t.min_size), max_size=t.max_size, mean=t.image_mean, std=t.image_std)
    info[name] = entry
outputs["info"] = np.array(json.dumps(info))
"""
    published = json.loads(str(tvref.run(script, table=np.array(json.dumps(_TORCHVISION_WEIGHTS)))["info"]))
    for name, preset in model_zoo.PRESETS.items():
        tv = published[name]
        assert preset.url == tv["url"], name
        if preset.kind == "maskrcnn":
            assert (preset.box_ap, preset.mask_ap) == (tv["metrics"]["COCO-val2017"]["box_map"],
                                                       tv["metrics"]["COCO-val2017"]["mask_map"]), name
            assert list(preset.class_names) == tv["categories"], name
            assert preset.config["min_size"] == tv["min_size"][0] and preset.config["max_size"] == tv["max_size"], name
            # Both state the statistics of [0, 1] images (``transform.normalize`` divides by 255 first).
            np.testing.assert_allclose(preset.config["image_mean"], tv["mean"], rtol=1e-6)
            np.testing.assert_allclose(preset.config["image_std"], tv["std"], rtol=1e-6)


def test_cli_presets_lists_names_and_ap(capsys):
    from keras_maskrcnn.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "maskrcnn_resnet50_fpn_v2_coco" in out and "41.8" in out and "resnet101_imagenet" in out


def test_cli_predict_with_a_preset_draws_its_class_names(tiny_preset, tmp_path, capsys):
    import json

    from PIL import Image

    from keras_maskrcnn.cli import main

    preset, _, _ = tiny_preset
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype("uint8")).save(image)
    out = tmp_path / "out"
    assert main(["predict", "--preset", "tiny", "--output", str(out), "--score-threshold", "0", str(image)]) == 0
    assert (out / "photo.png").exists()
    results = json.loads((out / "results.json").read_text())
    assert all(1 <= r["category_id"] <= len(preset.class_names) - 1 for r in results)
    with pytest.raises(SystemExit):
        main(["predict", "--preset", "tiny", "--model", "m.keras", "--output", str(out), str(image)])


def test_cli_train_fine_tunes_a_preset(tiny_preset, tmp_path, capsys):
    from keras_maskrcnn.cli import main

    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--synthetic", "4", "--synthetic-size", "64", "--synthetic-val", "0",
            "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--output", str(out)]
    assert main(argv) == 0
    assert any(name.endswith(".keras") for name in os.listdir(out))
    with pytest.raises(SystemExit):
        main(argv + ["--backbone", "resnet50"])
