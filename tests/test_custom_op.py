"""The compiled MultiLevelRoiAlign op (custom_ops/roi_align) against the numpy reference and the
stock-op (crop_and_resize) implementation, and MultiLevelROIAlign's implementation switch.

The op tests need the compiled library. Where it is already built (``make custom-ops``, as CI does)
they use it. Otherwise a module fixture builds it into a temporary folder (``make -C custom_ops
SO=...``, ~15-40 s) when ``make`` and a C++ compiler are found, loads it from there for this module
only and forgets it afterwards: the checkout is left as it was and the rest of ``make test`` keeps
running the stock-op path it would run without the op. Without a compiler, or if the build fails,
the op tests skip (set ``KERAS_MASKRCNN_REQUIRE_CUSTOM_OP=1`` to fail instead).
"""
import logging
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference
from keras_maskrcnn.layers.roi_align import MultiLevelROIAlign, assign_fpn_levels
from keras_maskrcnn.ops import custom_roi_align
from keras_maskrcnn.ops.roi_align import roi_align
from test_roi_align import _KINDS, _interval, limit_case, multilevel_case, reference_multilevel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
OUTPUT_SIZES = [(1, 1), (2, 3), (7, 7), (3, 1)]


def _unavailable(reason):
    if os.environ.get("KERAS_MASKRCNN_REQUIRE_CUSTOM_OP") == "1":
        pytest.fail(f"compiled RoIAlign op required but unavailable: {reason}")
    pytest.skip(f"compiled RoIAlign op unavailable: {reason}")


@pytest.fixture(scope="module")
def op(tmp_path_factory):
    """The loaded op module: the built library, or one built into a temporary folder for this
    module (then forgotten, so that later test modules run without it as before)."""
    if custom_roi_align.available():
        yield custom_roi_align
        return
    if os.environ.get(custom_roi_align.ENV_VAR):
        _unavailable(custom_roi_align.unavailable_reason())
    compiler = os.environ.get("CXX", "g++")
    if not (shutil.which("make") and shutil.which(compiler)):
        _unavailable(f"not built, and make / {compiler} not found to build it")
    build = tmp_path_factory.mktemp("custom_op")
    library = str(build / custom_roi_align.LIBRARY_NAME)
    command = ["make", "-C", os.path.join(ROOT, "custom_ops"), f"PYTHON={sys.executable}", f"SO={library}",
               f"BUILD={build / 'objects'}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        _unavailable(f"`{' '.join(command)}` took over 300 s")
    if result.returncode != 0:
        _unavailable(f"`{' '.join(command)}` failed:\n{(result.stdout + result.stderr)[-3000:]}")
    os.environ[custom_roi_align.ENV_VAR] = library
    try:
        if not custom_roi_align.reload():
            _unavailable(custom_roi_align.unavailable_reason())
        yield custom_roi_align
    finally:
        del os.environ[custom_roi_align.ENV_VAR]
        custom_roi_align.forget()


# ----------------------------------------------------------------------------- inputs and references


def multi_case(rng, num_levels=3, boxes_per_level=6, batch=2, channels=3, max_size=10):
    """Small maps of random sizes (strides 1, 2, 4, ...), boxes of every kind of test_roi_align
    (inside, partly / wholly outside, tiny, empty, on the border, flipped), levels interleaved."""
    scales = [2.0**-level for level in range(num_levels)]
    features, boxes, box_indices, levels = [], [], [], []
    for level, scale in enumerate(scales):
        height, width = (int(v) for v in rng.integers(1, max_size, size=2))
        features.append(rng.normal(size=(batch, height, width, channels)).astype(np.float32))
        unit = 1.0 / scale
        for _ in range(boxes_per_level):
            x1, x2 = _interval(rng, width * unit, unit, rng.choice(_KINDS))
            y1, y2 = _interval(rng, height * unit, unit, rng.choice(_KINDS))
            boxes.append((x1, y1, x2, y2))
            levels.append(level)
            box_indices.append(int(rng.integers(batch)))
    order = rng.permutation(len(boxes))
    boxes = np.asarray(boxes, np.float32)[order]
    return features, boxes, np.asarray(box_indices, np.int32)[order], np.asarray(levels, np.int32)[order], scales


def numpy_multi(features, boxes, box_indices, levels, scales, output_size, ratio, aligned, grad=None):
    """reference.roi_align box by box on each box's level; with ``grad``, also the features' gradients."""
    out = np.zeros((len(boxes), *output_size, features[0].shape[-1]))
    d_features = [np.zeros(f.shape) for f in features]
    for k in range(len(boxes)):
        level = levels[k]
        args = (features[level], boxes[k : k + 1], box_indices[k : k + 1], output_size, scales[level], ratio, aligned)
        if grad is None:
            out[k] = reference.roi_align(*args)[0]
        else:
            o, d = reference.roi_align(*args, grad=grad[k : k + 1])
            out[k] = o[0]
            d_features[level] += d
    return (out, d_features) if grad is not None else out


def stock_multi(features, boxes, box_indices, levels, scales, output_size, ratio, aligned):
    """The crop_and_resize implementation (keras_maskrcnn.ops.roi_align), one call per level."""
    positions, pooled = [], []
    for level, (feature_map, scale) in enumerate(zip(features, scales)):
        idx = tf.cast(tf.where(tf.equal(levels, level))[:, 0], tf.int32)
        positions.append(idx)
        pooled.append(
            roi_align(feature_map, tf.gather(boxes, idx), tf.gather(box_indices, idx), output_size, scale, ratio, aligned)
        )
    return tf.dynamic_stitch(positions, pooled)


def op_and_grad(fn, features, grad):
    """``fn(features)`` and the gradient of ``sum(fn(features) * grad)`` w.r.t. each map."""
    xs = [tf.constant(f) for f in features]
    with tf.GradientTape() as tape:
        tape.watch(xs)
        out = fn(xs)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * grad)
    return out.numpy(), [g.numpy() for g in tape.gradient(loss, xs)]


# ----------------------------------------------------------------------------- op: forward


@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_forward_matches_reference_and_stock(op, sampling_ratio, aligned):
    rng = np.random.default_rng([sampling_ratio, int(aligned)])
    for output_size in OUTPUT_SIZES:
        case = multi_case(rng)
        args = (output_size, sampling_ratio, aligned)
        got = op.multilevel_roi_align(*case[:4], output_size, case[4], sampling_ratio, aligned).numpy()
        assert got.shape == (len(case[1]), *output_size, 3)
        np.testing.assert_allclose(got, numpy_multi(*case, *args), rtol=0, atol=TOL, err_msg=str(args))
        np.testing.assert_allclose(got, stock_multi(*case, *args).numpy(), rtol=0, atol=TOL, err_msg=str(args))


@pytest.mark.parametrize("aligned", [False, True])
def test_sample_limits(op, aligned):
    # Samples exactly on y, x = -1 and = H, W count; one pixel further they do not.
    features, boxes, box_indices = limit_case()
    boxes = boxes + (0.5 if aligned else 0.0)
    levels = np.zeros(len(boxes), np.int32)
    got = op.multilevel_roi_align([features], boxes, box_indices, levels, 1, [1.0], 1, aligned).numpy()[:, 0, 0]
    want = reference.roi_align(features, boxes, box_indices, (1, 1), 1.0, 1, aligned)[:, 0, 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    assert np.all(got[[0, 2, 4, 5, 7]] != 0) and np.all(got[[1, 3, 6]] == 0)


@pytest.mark.parametrize("sampling_ratio", [0, -1])
@pytest.mark.parametrize("aligned", [False, True])
def test_adaptive_sampling_matches_reference(op, sampling_ratio, aligned):
    # torchvision's sampling_ratio <= 0: ceil(roi_size / output_size) samples per bin, per box.
    rng = np.random.default_rng([7, int(aligned)])
    for output_size in [(1, 1), (2, 3), (4, 4)]:
        case = multi_case(rng, max_size=14)
        got = op.multilevel_roi_align(*case[:4], output_size, case[4], sampling_ratio, aligned).numpy()
        want = numpy_multi(*case, output_size, sampling_ratio, aligned)
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=str(output_size))
    # Boxes of 1..30 map pixels on one 32 x 32 map: grids of 1 to 15 samples per axis in one call.
    features = rng.normal(size=(1, 32, 32, 2)).astype(np.float32)
    sizes = np.array([1, 2.5, 4, 7, 10, 15.5, 21, 30], np.float32)
    boxes = np.stack([np.full_like(sizes, 1.2), np.full_like(sizes, 0.7), 1.2 + sizes, 0.7 + sizes / 2], axis=1)
    zeros = np.zeros(len(boxes), np.int32)
    got = op.multilevel_roi_align([features], boxes, zeros, zeros, (2, 2), [1.0], sampling_ratio, aligned).numpy()
    want = reference.roi_align(features, boxes, zeros, (2, 2), 1.0, sampling_ratio, aligned)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    # Adaptive with grid 2 everywhere equals sampling_ratio=2.
    boxes = np.array([[0, 0, 8, 8], [4, 2, 12, 10]], np.float32)  # 8 x 8 boxes, output 4: grid 2
    if not aligned:
        np.testing.assert_array_equal(
            op.multilevel_roi_align([features], boxes, [0, 0], [0, 0], 4, [1.0], sampling_ratio, aligned).numpy(),
            op.multilevel_roi_align([features], boxes, [0, 0], [0, 0], 4, [1.0], 2, aligned).numpy(),
        )


def test_larger_maps_match_reference(op):
    # FPN-sized maps (P2 of a 128 x 128 image is 32 x 32), 20 channels: the op agrees with the
    # reference to 1e-5. The stock path rounds sample coordinates differently (normalised crop
    # boxes) and agrees to about 3e-5 here, within its own tolerance of 1e-4.
    features, boxes = multilevel_case(np.random.default_rng(4), batch=2, num_boxes=12, channels=20)
    for aligned in (False, True):
        got = MultiLevelROIAlign((3, 2), sampling_ratio=2, aligned=aligned, implementation="custom_op")(features, boxes)
        np.testing.assert_allclose(got.numpy(), reference_multilevel(features, boxes, (3, 2), 2, aligned), rtol=0, atol=TOL)
        stock = MultiLevelROIAlign((3, 2), sampling_ratio=2, aligned=aligned, implementation="crop_and_resize")
        np.testing.assert_allclose(got.numpy(), stock(features, boxes).numpy(), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- op: gradient


@pytest.mark.parametrize("sampling_ratio", [1, 2, 0])
@pytest.mark.parametrize("channels", [3, 21])
def test_gradient_matches_reference_and_stock(op, sampling_ratio, channels):
    # 21 channels: three CPU shards of 8, 8 and 5 channels; boxes share images and maps.
    rng = np.random.default_rng([sampling_ratio, channels])
    case = multi_case(rng, channels=channels, boxes_per_level=8)
    features, boxes, box_indices, levels, scales = case
    grad = rng.normal(size=(len(boxes), 3, 2, channels)).astype(np.float32)
    args = ((3, 2), sampling_ratio, False)
    out, got = op_and_grad(lambda xs: op.multilevel_roi_align(xs, boxes, box_indices, levels, (3, 2), scales, sampling_ratio), features, grad)
    want_out, want = numpy_multi(*case, *args, grad=grad)
    np.testing.assert_allclose(out, want_out, rtol=0, atol=TOL)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=TOL)
    if sampling_ratio > 0:
        _, stock = op_and_grad(lambda xs: stock_multi(xs, boxes, box_indices, levels, scales, *args), features, grad)
        for g, s in zip(got, stock):
            np.testing.assert_allclose(g, s, rtol=0, atol=TOL)
    # The CPU gradient does not race: repeated runs are bitwise equal.
    _, again = op_and_grad(lambda xs: op.multilevel_roi_align(xs, boxes, box_indices, levels, (3, 2), scales, sampling_ratio), features, grad)
    for g, a in zip(got, again):
        np.testing.assert_array_equal(g, a)


def test_compute_gradient(op):
    rng = np.random.default_rng(31)
    features, boxes, box_indices, levels, scales = multi_case(rng, num_levels=2, boxes_per_level=3, channels=2, max_size=5)

    def custom(a, b):
        return op.multilevel_roi_align([a, b], boxes, box_indices, levels, (2, 2), scales, 2, True)

    def stock(a, b):
        return stock_multi([a, b], boxes, box_indices, levels, scales, (2, 2), 2, True)

    theoretical, numerical = tf.test.compute_gradient(custom, [tf.constant(f) for f in features])
    stock_theoretical, _ = tf.test.compute_gradient(stock, [tf.constant(f) for f in features])
    for t, n, s in zip(theoretical, numerical, stock_theoretical):
        assert np.abs(t).max() > 0
        np.testing.assert_allclose(t, n, rtol=0, atol=2e-3)  # float32 finite differences
        np.testing.assert_allclose(t, s, rtol=0, atol=TOL)


def test_second_order_gradient(op):
    # The gradient op is linear in its upstream gradient; its own gradient is the forward op.
    rng = np.random.default_rng(5)
    features, boxes, box_indices, levels, scales = multi_case(rng, num_levels=2, boxes_per_level=3, channels=2, max_size=5)
    xs = [tf.constant(f) for f in features]
    upstream = tf.constant(rng.normal(size=(len(boxes), 2, 2, 2)).astype(np.float32))
    with tf.GradientTape() as outer:
        outer.watch(upstream)
        with tf.GradientTape() as inner:
            inner.watch(xs)
            out = op.multilevel_roi_align(xs, boxes, box_indices, levels, 2, scales)
        d_features = inner.gradient(out, xs, output_gradients=upstream)
        total = tf.add_n([tf.reduce_sum(d * x) for d, x in zip(d_features, xs)])
    # total = sum(upstream * op(xs)), so d total / d upstream = op(xs).
    np.testing.assert_allclose(outer.gradient(total, upstream).numpy(), out.numpy(), rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- op: shapes, dtypes, errors


def test_unknown_shapes_and_no_boxes(op):
    spec = [tf.TensorSpec([None, None, None, 3], tf.float32)] * 2
    fn = tf.function(
        lambda f, b, i, lv: op.multilevel_roi_align(f, b, i, lv, (2, 2), [1.0, 0.5], 2, True),
        input_signature=[spec, tf.TensorSpec([None, 4]), tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32)],
    )
    assert fn.get_concrete_function().structured_outputs.shape.as_list() == [None, 2, 2, 3]
    case = multi_case(np.random.default_rng(3), num_levels=2)
    np.testing.assert_allclose(fn(*case[:4]).numpy(), numpy_multi(*case, (2, 2), 2, True), rtol=0, atol=TOL)
    empty = fn(case[0], np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros(0, np.int32))
    assert empty.shape == (0, 2, 2, 3)
    xs = [tf.constant(f) for f in case[0]]
    with tf.GradientTape() as tape:
        tape.watch(xs)
        loss = tf.reduce_sum(op.multilevel_roi_align(xs, tf.zeros([0, 4]), tf.zeros([0], tf.int32), tf.zeros([0], tf.int32), 2, [1.0, 0.5]))
    for g, f in zip(tape.gradient(loss, xs), case[0]):
        assert g.shape == f.shape and not np.any(g.numpy())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision(op, dtype):
    rng = np.random.default_rng(11)
    features, boxes, box_indices, levels, scales = multi_case(rng, channels=4)
    low = [tf.cast(f, dtype) for f in features]
    with tf.GradientTape() as tape:
        tape.watch(low)
        out = op.multilevel_roi_align(low, boxes, box_indices, levels, 3, scales)
        loss = tf.reduce_sum(tf.cast(out, tf.float32))
    grads = tape.gradient(loss, low)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    rounded = [tf.cast(f, tf.float32).numpy() for f in low]
    ones = np.ones((len(boxes), 3, 3, 4), np.float32)
    want, want_grads = numpy_multi(rounded, boxes, box_indices, levels, scales, (3, 3), 2, False, grad=ones)
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), want, rtol=1e-2, atol=1e-2)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(tf.cast(g, tf.float32).numpy(), w, rtol=1e-2, atol=1e-2)


def test_invalid_inputs_raise(op):
    features = [np.zeros((2, 4, 4, 3), np.float32), np.zeros((2, 2, 2, 3), np.float32)]
    boxes = np.array([[0, 0, 2, 2]], np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="box_indices"):
        op.multilevel_roi_align(features, boxes, [2], [0], 2, [1.0, 0.5])
    with pytest.raises(tf.errors.InvalidArgumentError, match="levels"):
        op.multilevel_roi_align(features, boxes, [0], [2], 2, [1.0, 0.5])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="channels|Dimension"):
        op.multilevel_roi_align([features[0], np.zeros((2, 2, 2, 5), np.float32)], boxes, [0], [0], 2, [1.0, 0.5])
    with pytest.raises(ValueError, match="spatial_scales"):
        op.multilevel_roi_align(features, boxes, [0], [0], 2, [1.0])


# ----------------------------------------------------------------------------- MultiLevelROIAlign


@pytest.mark.parametrize("aligned", [False, True])
def test_layer_implementations_agree(op, aligned):
    features, boxes = multilevel_case(np.random.default_rng(int(aligned) + 40), batch=2, num_boxes=10)
    grad = np.random.default_rng(1).normal(size=(2, 10, 3, 2, 3)).astype(np.float32)
    results = {}
    for impl in ("custom_op", "crop_and_resize"):
        layer = MultiLevelROIAlign((3, 2), sampling_ratio=2, aligned=aligned, implementation=impl)
        assert layer.use_custom_op == (impl == "custom_op")
        results[impl] = op_and_grad(lambda xs: layer(xs, boxes), features, grad)
    (out, grads), (stock_out, stock_grads) = results["custom_op"], results["crop_and_resize"]
    np.testing.assert_allclose(out, reference_multilevel(features, boxes, (3, 2), 2, aligned), rtol=0, atol=TOL)
    np.testing.assert_allclose(out, stock_out, rtol=0, atol=1e-4)  # see test_larger_maps_match_reference
    for g, s in zip(grads, stock_grads):
        np.testing.assert_allclose(g, s, rtol=0, atol=1e-4)


def test_layer_mixed_bfloat16_and_unknown_shapes(op):
    layer = MultiLevelROIAlign(2, implementation="custom_op")
    spec = [tf.TensorSpec([None, None, None, 3], tf.bfloat16)] * 4
    fn = tf.function(layer.call, input_signature=[spec, tf.TensorSpec([None, None, 4], tf.float32)])
    features, boxes = multilevel_case(np.random.default_rng(8), batch=2, num_boxes=3)
    low = [tf.cast(f, tf.bfloat16) for f in features]
    out = fn(low, boxes)
    assert out.dtype == tf.bfloat16 and out.shape == (2, 3, 2, 2, 3)
    want = reference_multilevel([tf.cast(f, tf.float32).numpy() for f in low], boxes, (2, 2), 2, False)
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), want, rtol=1e-2, atol=1e-2)
    assert fn(low, np.zeros((2, 0, 4), np.float32)).shape == (2, 0, 2, 2, 3)


def _graph_op_types(layer, features, boxes):
    fn = tf.function(lambda f, b: layer(f, b))
    return {node.op for node in fn.get_concrete_function(features, boxes).graph.as_graph_def().node}


def test_use_custom_op_switch_selects_the_graph(op):
    features, boxes = multilevel_case(np.random.default_rng(2), batch=1, num_boxes=4)
    features = [tf.constant(f) for f in features]
    layer = MultiLevelROIAlign(2, implementation="custom_op")
    ops_custom = _graph_op_types(layer, features, boxes)
    assert "MultiLevelRoiAlign" in ops_custom and "CropAndResize" not in ops_custom
    layer.use_custom_op = False  # what keras_maskrcnn.export does while tracing
    ops_stock = _graph_op_types(layer, features, boxes)
    assert "MultiLevelRoiAlign" not in ops_stock and "CropAndResize" in ops_stock
    assert all(hasattr(tf.raw_ops, t) for t in ops_stock)


def test_config_round_trip_keeps_implementation():
    for impl in ("auto", "crop_and_resize"):
        layer = MultiLevelROIAlign(3, implementation=impl)
        config = layer.get_config()
        assert config["implementation"] == impl
        assert MultiLevelROIAlign.from_config(config).get_config() == config
    assert MultiLevelROIAlign(3).implementation == "auto"
    with pytest.raises(ValueError, match="implementation"):
        MultiLevelROIAlign(3, implementation="cuda")


def test_custom_op_unavailable_is_an_error(monkeypatch):
    monkeypatch.setattr(custom_roi_align, "available", lambda: False)
    monkeypatch.setattr(custom_roi_align, "unavailable_reason", lambda: "_roi_align_ops.so not built")
    with pytest.raises(RuntimeError, match=r"not available \(_roi_align_ops.so not built\).*make -C custom_ops"):
        MultiLevelROIAlign(3, implementation="custom_op")
    assert not MultiLevelROIAlign(3, implementation="crop_and_resize").use_custom_op


def test_auto_falls_back_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(custom_roi_align, "auto_fallback_reason", lambda: "test reason")
    monkeypatch.setattr(custom_roi_align, "_fallback_logged", False)
    with caplog.at_level(logging.INFO, logger="keras_maskrcnn"):
        layers = [MultiLevelROIAlign(3) for _ in range(3)]
    assert not any(layer.use_custom_op for layer in layers)
    lines = [r.getMessage() for r in caplog.records if r.name == "keras_maskrcnn"]
    assert len(lines) == 1 and "crop_and_resize" in lines[0] and "test reason" in lines[0]
    features, boxes = multilevel_case(np.random.default_rng(0), batch=1, num_boxes=3)
    np.testing.assert_allclose(
        layers[0](features, boxes).numpy(), reference_multilevel(features, boxes, (3, 3), 2, False), rtol=0, atol=1e-4
    )


def test_auto_uses_the_op_when_available(op, monkeypatch):
    monkeypatch.setattr(custom_roi_align, "auto_fallback_reason", lambda: None)
    assert MultiLevelROIAlign(3).use_custom_op


# ----------------------------------------------------------------------------- tiny Mask R-CNN


def test_tiny_model_trains_and_predicts_like_crop_and_resize(op):
    from keras_maskrcnn import MaskRCNN
    from keras_maskrcnn.data import synthetic_dataset
    from keras_maskrcnn.presets import small_model_config

    keras.utils.set_random_seed(3)
    config = dict(
        small_model_config(image_size=96),
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        box_batch_size_per_image=64,
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=100,
        detections_per_image=20,
        box_score_threshold=0.0,
        mask_output="probability",
    )
    model = MaskRCNN(num_classes=3, **config)
    poolers = [model.box_roi_align, model.mask_roi_align]
    for layer in poolers:
        layer.use_custom_op = True
    ds = synthetic_dataset(2, 2, image_size=(96, 96), max_instances=8, flip_probability=0.0).cache().repeat()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, clipnorm=10.0))
    history = model.fit(ds, epochs=3, steps_per_epoch=3, verbose=0).history
    assert np.all(np.isfinite(history["loss"])) and history["loss"][-1] < history["loss"][0], history["loss"]
    for name in ("class_loss", "box_loss", "mask_loss"):
        assert np.isfinite(history[name][-1])

    images = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3)).astype(np.uint8)
    custom = model(images, training=False)
    for layer in poolers:
        layer.use_custom_op = False
    stock = model(images, training=False)
    num = custom["num_detections"].numpy()
    assert num.sum() > 0
    np.testing.assert_array_equal(num, stock["num_detections"].numpy())
    np.testing.assert_array_equal(custom["classes"].numpy(), stock["classes"].numpy())
    np.testing.assert_allclose(custom["scores"].numpy(), stock["scores"].numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(custom["boxes"].numpy(), stock["boxes"].numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(custom["masks"].numpy(), stock["masks"].numpy(), rtol=0, atol=1e-3)
