"""SavedModel export for TF Serving (keras_maskrcnn.export).

One tiny model is exported once (module fixture); a fresh Python process that can import
TensorFlow but not keras or keras_maskrcnn loads it and runs both signatures, and the results are
compared with ``model.predict_images`` on the same images.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.export import (
    OUTPUT_NAMES,
    export_saved_model,
    latest_version_dir,
    next_version,
    resized_sizes,
    saved_model_op_types,
    stock_ops_only,
)
from keras_maskrcnn.inference import resized_shape
from keras_maskrcnn.ops import custom_roi_align
from keras_maskrcnn.presets import small_model_config

# min_size != max_size so that both branches of the resize rule and non-integer scales are used.
CONFIG = dict(
    small_model_config(image_size=96),
    min_size=64,
    max_size=96,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=100,
    detections_per_image=20,
    box_score_threshold=0.0,  # untrained weights still give (20) detections to compare
)

# Runs in a fresh interpreter. `import tensorflow` eagerly imports keras.src.optimizers whenever
# Keras is installed (TF's SavedModel registry hook), so "keras not in sys.modules" can only hold if
# Keras cannot be imported: setting sys.modules[name] = None makes every import of it fail, which
# is what a TensorFlow-only install (TF Serving) looks like.
LOADER = textwrap.dedent(
    """
    import json, sys
    BLOCKED = ("keras", "tf_keras", "keras_maskrcnn")
    for name in BLOCKED:
        sys.modules[name] = None
    import numpy as np
    import tensorflow as tf

    export_dir, inputs_path, outputs_path = sys.argv[1:4]
    inputs = np.load(inputs_path)
    model = tf.saved_model.load(export_dir)
    report = {"signatures": sorted(model.signatures)}
    results = {}
    default = model.signatures["serving_default"]
    for key, value in default(images=tf.constant(inputs["equal"])).items():
        results["default/" + key] = value.numpy()
    serve_bytes = model.signatures["serving_bytes"]
    for key, value in serve_bytes(image_bytes=tf.constant([inputs["png0"].tobytes(), inputs["png1"].tobytes()])).items():
        results["bytes/" + key] = value.numpy()
    for key, value in serve_bytes(image_bytes=tf.constant([inputs["jpeg"].tobytes()])).items():
        results["jpeg/" + key] = value.numpy()
    errors = {}
    for case, data in (("garbage", b"this is not an image"), ("truncated", inputs["png0"].tobytes()[:60])):
        try:
            serve_bytes(image_bytes=tf.constant([inputs["png1"].tobytes(), data]))
            errors[case] = "no error"
        except tf.errors.InvalidArgumentError as e:
            errors[case] = "InvalidArgumentError: " + e.message
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors[case] = type(e).__name__ + ": " + str(e)
    try:
        serve_bytes(image_bytes=tf.zeros([0], tf.string))
        errors["empty"] = "no error"
    except tf.errors.InvalidArgumentError as e:
        errors["empty"] = "InvalidArgumentError: " + e.message
    # The process survives: the signature still works after the failed requests.
    report["after_errors"] = int(serve_bytes(image_bytes=tf.constant([inputs["png0"].tobytes()]))["num_detections"][0])
    report["errors"] = errors
    report["loaded_modules"] = sorted(
        k for k, v in sys.modules.items() if k.split(".")[0] in BLOCKED and v is not None
    )
    np.savez(outputs_path, **results)
    print("REPORT " + json.dumps(report))
    """
)


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")


def _png(array):
    return np.frombuffer(tf.io.encode_png(array).numpy(), np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = MaskRCNN(num_classes=3, **CONFIG)
    model.build()
    # Spread the class scores: untrained heads give near-tied scores whose order is fragile.
    kernel = model.box_head.cls_score.kernel
    kernel.assign(rng.normal(0.0, 0.05, kernel.shape).astype(np.float32))
    # A custom-op switch is forced to the stock path while exporting, and restored afterwards
    # (switched on where the compiled op loads: predict_images below runs with it).
    model.box_roi_align.use_custom_op = custom_roi_align.available()

    images = {
        "equal": rng.integers(0, 256, (2, 50, 70, 3)).astype(np.uint8),  # resized to 64 x 89
        "png0": rng.integers(0, 256, (50, 70, 3)).astype(np.uint8),  # 64 x 89
        "png1": rng.integers(0, 256, (120, 60, 3)).astype(np.uint8),  # 96 x 48 (max_size bound)
        "jpeg_source": rng.integers(0, 256, (41, 77, 3)).astype(np.uint8),
    }
    jpeg = np.frombuffer(tf.io.encode_jpeg(images["jpeg_source"], quality=90).numpy(), np.uint8)
    jpeg_decoded = tf.io.decode_image(jpeg.tobytes(), channels=3, expand_animations=False).numpy()

    base = str(tmp / "maskrcnn")
    export_dir = export_saved_model(model, base, full_masks=True)
    assert model.box_roi_align.use_custom_op is custom_roi_align.available()

    expected = {
        "default": model.predict_images(list(images["equal"]), batch_size=2),
        "bytes": model.predict_images([images["png0"], images["png1"]], batch_size=2),
        "jpeg": model.predict_images([jpeg_decoded], batch_size=1),
    }
    sizes = {"default": [(50, 70), (50, 70)], "bytes": [(50, 70), (120, 60)], "jpeg": [jpeg_decoded.shape[:2]]}

    inputs_path = str(tmp / "inputs.npz")
    outputs_path = str(tmp / "outputs.npz")
    np.savez(inputs_path, equal=images["equal"], png0=_png(images["png0"]), png1=_png(images["png1"]), jpeg=jpeg)
    script = tmp / "load_exported.py"
    script.write_text(LOADER)
    proc = subprocess.run(
        [sys.executable, str(script), export_dir, inputs_path, outputs_path],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")][-1]
    report = json.loads(line[len("REPORT "):])
    outputs = dict(np.load(outputs_path))
    return dict(
        model=model, base=base, export_dir=export_dir, expected=expected, sizes=sizes, report=report, outputs=outputs
    )


def _assert_same_detections(got, want, label):
    """Exported ``got`` (arrays of one image, ``n`` rows) against ``predict_images``' ``want``.

    Detections are matched one to one by class, score (1e-4) and box (0.5 px), so that equal
    scores listed in another order do not fail the comparison. Returns ``want`` index per row.
    """
    n = len(want["scores"])
    assert len(got["scores"]) == n, f"{label}: {len(got['scores'])} detections, expected {n}"
    unused = list(range(n))
    order = []
    for i in range(n):
        for j in unused:
            if (
                got["classes"][i] == want["classes"][j]
                and abs(got["scores"][i] - want["scores"][j]) <= 1e-4
                and np.max(np.abs(got["boxes"][i] - want["boxes"][j])) <= 0.5
            ):
                unused.remove(j)
                order.append(j)
                break
        else:
            raise AssertionError(
                f"{label}: detection {i} (class {got['classes'][i]}, score {got['scores'][i]}, "
                f"box {got['boxes'][i]}) has no counterpart in predict_images"
            )
    return order


@pytest.mark.parametrize("case", ["default", "bytes", "jpeg"])
def test_signatures_reproduce_predict_images(exported, case):
    out = {key.split("/", 1)[1]: value for key, value in exported["outputs"].items() if key.startswith(case + "/")}
    assert set(out) == set(OUTPUT_NAMES) | {"full_masks"}
    batch = len(exported["expected"][case])
    n_max = CONFIG["detections_per_image"]
    assert out["boxes"].shape == (batch, n_max, 4) and out["boxes"].dtype == np.float32
    assert out["scores"].shape == (batch, n_max) and out["classes"].dtype == np.int32
    assert out["num_detections"].shape == (batch,) and out["num_detections"].dtype == np.int32
    assert out["masks"].shape == (batch, n_max, 28, 28) and out["masks"].dtype == np.float32
    sizes = exported["sizes"][case]
    max_h, max_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    assert out["full_masks"].shape == (batch, n_max, max_h, max_w) and out["full_masks"].dtype == np.uint8
    for b, (want, (h, w)) in enumerate(zip(exported["expected"][case], sizes)):
        n = int(out["num_detections"][b])
        assert n > 0
        got = {key: out[key][b, :n] for key in ("boxes", "scores", "classes")}
        order = _assert_same_detections(got, want, f"{case}[{b}]")
        # Padding rows are zero.
        assert not out["boxes"][b, n:].any() and not out["classes"][b, n:].any() and not out["masks"][b, n:].any()
        # Full masks: predict_images' masks at the original size, zero outside it.
        full = out["full_masks"][b, :n]
        assert not out["full_masks"][b, n:].any()
        assert not full[:, h:, :].any() and not full[:, :, w:].any()
        mismatch = np.mean(full[:, :h, :w] != want["masks"][order])
        assert mismatch <= 1e-3, f"{case}[{b}]: {mismatch:.2%} of mask pixels differ"
        assert set(np.unique(full)) <= {0, 1}
        assert np.all((out["masks"][b, :n] >= 0) & (out["masks"][b, :n] <= 1))


def test_loaded_without_keras_and_invalid_bytes_fail_cleanly(exported):
    report = exported["report"]
    assert report["loaded_modules"] == [], report["loaded_modules"]
    assert {"serving_default", "serving_bytes"} <= set(report["signatures"])
    for case in ("garbage", "truncated", "empty"):
        assert report["errors"][case].startswith("InvalidArgumentError"), report["errors"][case]
    assert "Unknown image file format" in report["errors"]["garbage"]
    assert "no image" in report["errors"]["empty"]
    assert report["after_errors"] > 0


def _saved_model_cli(export_dir):
    commands = [[sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]]
    script = shutil.which("saved_model_cli") or os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if os.path.isfile(script):
        commands.append([script])
    for command in commands:
        proc = subprocess.run(
            command + ["show", "--all", "--dir", export_dir], capture_output=True, text=True, env=_env(), timeout=300
        )
        if proc.returncode == 0:
            return proc.stdout
    pytest.skip(f"saved_model_cli unavailable: {proc.stderr[-500:]}")


def test_saved_model_cli_lists_named_signatures(exported):
    text = _saved_model_cli(exported["export_dir"])
    for signature, input_name in (("serving_default", "images"), ("serving_bytes", "image_bytes")):
        assert f"signature_def['{signature}']" in text
        section = text.split(f"signature_def['{signature}']", 1)[1].split("signature_def[", 1)[0]
        assert f"inputs['{input_name}']" in section
        for output in OUTPUT_NAMES + ("full_masks",):
            assert f"outputs['{output}']" in section, (signature, output)
    assert "DT_UINT8" in text and "DT_STRING" in text


def test_versioned_folder_and_stock_ops(exported, tmp_path):
    base, export_dir = exported["base"], exported["export_dir"]
    assert export_dir == os.path.join(base, "1")
    assert os.listdir(base) == ["1"]  # the staging folder was renamed into place
    assert os.path.isfile(os.path.join(export_dir, "saved_model.pb"))
    assert os.path.isdir(os.path.join(export_dir, "variables"))
    assert next_version(base) == 2 and latest_version_dir(base) == export_dir
    assert latest_version_dir(export_dir) == export_dir
    ops = saved_model_op_types(export_dir)
    assert "CropAndResize" in ops and "DecodeImage" in ops
    assert all(hasattr(tf.raw_ops, op) for op in ops)
    with pytest.raises(FileExistsError):
        export_saved_model(exported["model"], base, version=1)
    # Version numbering of a base folder (no export needed).
    assert next_version(str(tmp_path / "missing")) == 1
    for name in ("3", "10", "notes", "007x"):
        os.makedirs(tmp_path / name)
    assert next_version(str(tmp_path)) == 11
    assert latest_version_dir(str(tmp_path)) == str(tmp_path / "10")
    with pytest.raises(ValueError, match="version"):
        export_saved_model(exported["model"], str(tmp_path), version=-1)


def test_resize_rule_matches_predict_images():
    sizes = [(50, 70), (120, 60), (41, 77), (64, 64), (1, 1000), (999, 3), (480, 640), (1080, 1920), (37, 811)]
    for min_size, max_size in ((64, 96), (800, 1333), (96, 96)):
        got = resized_sizes(tf.constant(sizes), min_size, max_size).numpy()
        want = [resized_shape(h, w, min_size, max_size) for h, w in sizes]
        np.testing.assert_array_equal(got, np.array(want), err_msg=f"{min_size}, {max_size}")


def test_stock_ops_only_restores_switches():
    outer = keras.layers.Layer()
    inner = keras.layers.Layer()
    outer.inner = inner
    inner.use_custom_op = True
    with stock_ops_only(outer):
        assert inner.use_custom_op is False
    assert inner.use_custom_op is True
