"""MaskRCNN end to end: output contract, serialisation, precision, the list-of-images helper."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.data import synthetic_dataset
from keras_maskrcnn.model import LOSS_NAMES
from keras_maskrcnn.presets import small_model_config

SMALL = dict(small_model_config(image_size=96), rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, detections_per_image=20)


def small_model(**overrides):
    config = dict(SMALL, **overrides)
    # Low thresholds so untrained weights still give detections to compare.
    config.setdefault("box_score_threshold", 0.0)
    return MaskRCNN(num_classes=3, **config)


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture
def images():
    return np.random.default_rng().integers(0, 256, (2, 96, 128, 3)).astype(np.uint8)


def check_outputs(out, batch, n, height, width, mask_dtype="uint8"):
    assert tuple(out["boxes"].shape) == (batch, n, 4)
    assert tuple(out["scores"].shape) == (batch, n) and tuple(out["classes"].shape) == (batch, n)
    assert tuple(out["masks"].shape) == (batch, n, height, width) and out["masks"].dtype == mask_dtype
    assert tuple(out["num_detections"].shape) == (batch,)
    boxes, classes, num = np.asarray(out["boxes"]), np.asarray(out["classes"]), np.asarray(out["num_detections"])
    for b in range(batch):
        k = num[b]
        assert np.all((classes[b, :k] >= 1) & (classes[b, :k] <= 3)) and np.all(classes[b, k:] == 0)
        assert np.all(boxes[b, :k, 0] >= 0) and np.all(boxes[b, :k, 2] <= width)
        assert np.all(boxes[b, :k, 1] >= 0) and np.all(boxes[b, :k, 3] <= height)
        assert np.all(np.diff(np.asarray(out["scores"])[b, :k]) <= 0)


def test_call_outputs_contract(model, images):
    out = model(images)
    check_outputs(out, 2, 20, 96, 128)
    assert out["num_detections"].numpy().min() > 0
    assert set(np.unique(out["masks"].numpy())) <= {0, 1}
    # Float input in [0, 255] is the same as uint8.
    again = model(images.astype(np.float32))
    np.testing.assert_allclose(again["boxes"].numpy(), out["boxes"].numpy(), atol=1e-4)


def test_mask_output_formats_agree(model, images):
    probs = model(images, mask_output="probability")
    check_outputs(probs, 2, 20, 96, 128, "float32")
    binary = model(images, mask_output="binary")
    np.testing.assert_array_equal(binary["masks"].numpy(), (probs["masks"].numpy() > 0.5).astype(np.uint8))
    box = model(images, mask_output="box")
    assert tuple(box["masks"].shape) == (2, 20, 28, 28)


def test_image_sizes_limit_boxes_to_the_valid_region(model, images):
    out = model({"images": images, "image_sizes": np.array([[96, 128], [50, 70]])})
    k = out["num_detections"].numpy()[1]
    assert np.all(out["boxes"].numpy()[1, :k, 2] <= 70) and np.all(out["boxes"].numpy()[1, :k, 3] <= 50)


def test_graph_has_no_python_loop_over_images_or_boxes(model):
    # Tracing with unknown batch and image size only works if nothing iterates over them in Python.
    fn = tf.function(lambda x: model(x), input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    concrete = fn.get_concrete_function()
    assert concrete.structured_outputs["boxes"].shape.as_list() == [None, 20, 4]
    out = fn(tf.zeros([3, 64, 96, 3], tf.uint8))
    check_outputs(out, 3, 20, 64, 96)


def test_predict_on_batch_and_dataset(model, images):
    out = model.predict(images, verbose=0)
    check_outputs(out, 2, 20, 96, 128)
    ds = synthetic_dataset(3, 2, image_size=(64, 64), training=False, max_instances=8)
    out = model.predict(ds, verbose=0)
    check_outputs(out, 3, 20, 64, 64)


def test_predict_images_maps_back_to_original_sizes(model):
    rng = np.random.default_rng()
    imgs = [rng.integers(0, 256, (48, 64, 3)).astype(np.uint8), rng.uniform(0, 255, (150, 90, 3)).astype(np.float32)]
    results = model.predict_images(imgs, batch_size=2)
    for img, res in zip(imgs, results):
        h, w = img.shape[:2]
        n = len(res["scores"])
        assert res["boxes"].shape == (n, 4) and res["masks"].shape == (n, h, w) and res["masks"].dtype == np.uint8
        assert np.all(res["boxes"][:, 2] <= w + 1e-3) and np.all(res["boxes"][:, 3] <= h + 1e-3)
    # The first image alone, resized by hand (long side capped at max_size 96): boxes scale by 64/96.
    # (Alone in both runs: an untrained model's near-tied scores reorder with batch composition.)
    alone = model.predict_images(imgs[:1], batch_size=1)[0]
    resized = tf.image.resize(imgs[0][None].astype(np.float32), (72, 96)).numpy()
    direct = model.predict(resized, verbose=0)
    k = direct["num_detections"][0]
    np.testing.assert_allclose(alone["boxes"], direct["boxes"][0, :k] * (64 / 96), atol=1e-2)
    np.testing.assert_array_equal(alone["classes"], direct["classes"][0, :k])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        model.predict_images([imgs[0], np.zeros((5, 5))])


def test_save_load_keras_and_weights_round_trip(model, images, tmp_path):
    expected = model(images)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config() == model.get_config()
    got = loaded(images)
    for key in ("boxes", "scores", "classes", "masks", "num_detections"):
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy(), err_msg=key)
    weights = str(tmp_path / "model.weights.h5")
    model.save_weights(weights)
    fresh = small_model()
    fresh.build()
    fresh.load_weights(weights)
    np.testing.assert_array_equal(fresh(images)["boxes"].numpy(), expected["boxes"].numpy())


def test_config_round_trip_with_every_hyperparameter():
    model = small_model(rpn_nms_threshold=0.65, box_nms_threshold=0.45, mask_threshold=0.4, mask_output="probability", aligned=True, sampling_ratio=3, image_mean=(0.5, 0.5, 0.5))
    config = model.get_config()
    clone = MaskRCNN.from_config(config)
    assert clone.get_config() == config
    assert config["rpn_nms_threshold"] == 0.65 and config["aligned"] is True and config["sampling_ratio"] == 3


def test_user_backbone_model(images):
    inp = keras.Input((None, None, 3))
    feats, x = [], inp
    for channels in (8, 16, 16, 32):
        x = keras.layers.Conv2D(channels, 3, strides=4 if not feats else 2, padding="same", activation="relu")(x)
        feats.append(x)
    backbone = keras.Model(inp, feats)
    model = MaskRCNN(num_classes=3, **dict(SMALL, backbone=backbone, fpn_channels=16, representation_size=32))
    check_outputs(model(images), 2, 20, 96, 128)
    clone = MaskRCNN.from_config(model.get_config())
    assert len(clone.backbone.layers) == len(backbone.layers)
    with pytest.raises(ValueError, match="4 feature maps"):
        MaskRCNN(num_classes=3, backbone=keras.Model(inp, feats[:3]))


def test_mixed_bfloat16_builds_and_runs(images):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = small_model()
        out = model(images)
        check_outputs(out, 2, 20, 96, 128)
        assert out["boxes"].dtype == tf.float32
        assert model.backbone.compute_dtype == "bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_invalid_arguments_are_reported():
    with pytest.raises(ValueError, match="num_classes"):
        MaskRCNN(num_classes=0)
    with pytest.raises(ValueError, match="mask_output"):
        MaskRCNN(num_classes=2, mask_output="rle")
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        small_model()(np.zeros((1, 32, 32), np.uint8))


def test_fit_reduces_loss_on_a_fixed_batch(tmp_path):
    keras.utils.set_random_seed(1)
    model = small_model(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, box_batch_size_per_image=64)
    ds = synthetic_dataset(2, 2, image_size=(96, 96), max_instances=8, flip_probability=0.0).cache().repeat()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, clipnorm=10.0))
    history = model.fit(ds, epochs=3, steps_per_epoch=8, verbose=0).history
    for name in ("loss", "rpn_objectness_loss", "rpn_box_loss", "class_loss", "box_loss", "mask_loss"):
        assert name in history and np.all(np.isfinite(history[name]))
    assert history["loss"][-1] < 0.8 * history["loss"][0]
    val = model.evaluate(ds, steps=1, verbose=0, return_dict=True)
    assert np.isfinite(val["loss"])
    # Saved right after training (the model was never called): every weight comes back.
    path = str(tmp_path / "trained.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert len(loaded.weights) == len(model.weights)
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)
    # Inference right after training.
    assert len(model.predict_images([np.zeros((96, 96, 3), np.uint8)])) == 1


def test_fit_with_images_without_instances():
    model = small_model(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, box_batch_size_per_image=64)
    images = np.random.default_rng().uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    inputs = {"images": images, "image_sizes": np.array([[64, 64], [64, 64]], np.int32)}
    targets = {"boxes": np.zeros((2, 0, 4), np.float32), "classes": np.zeros((2, 0), np.int32), "masks": np.zeros((2, 0, 64, 64), np.uint8)}
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    history = model.fit(tf.data.Dataset.from_tensors((inputs, targets)), epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0]) and history["mask_loss"][0] == 0.0


def test_padding_is_zero_after_normalisation(model):
    # An image's detections must not depend on how much padding its batch adds (torchvision pads
    # normalised images with 0).
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96, 3)).astype(np.uint8)
    padded = np.zeros((1, 96, 128, 3), np.uint8)
    padded[0, :64, :96] = image
    x = model._normalize_and_pad(tf.constant(padded), tf.constant([[64, 96]])).numpy()
    assert np.all(x[0, 64:] == 0) and np.all(x[0, :, 96:] == 0)
    alone = model._normalize_and_pad(tf.constant(image[None]), tf.constant([[64, 96]])).numpy()
    np.testing.assert_allclose(x[0, :64, :96], alone[0, :64, :96])


def test_loss_weights_are_checked_and_round_trip():
    assert small_model().loss_weights == {name: 1.0 for name in LOSS_NAMES}
    assert small_model().get_config()["loss_weights"] is None  # a default model's config is unchanged
    model = small_model(loss_weights={"class_loss": 3.0})
    assert model.loss_weights["class_loss"] == 3.0 and model.loss_weights["mask_loss"] == 1.0
    clone = MaskRCNN.from_config(model.get_config())
    assert clone.loss_weights == model.loss_weights and clone.get_config() == model.get_config()
    with pytest.raises(ValueError, match="class_los"):
        small_model(loss_weights={"class_los": 2.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        small_model(loss_weights={"mask_loss": -1.0})


def test_loss_weights_weight_the_total_not_the_logged_losses():
    """The total Keras logs and the optimiser minimises is the weighted sum; each logged loss is
    the unweighted value. Checked on fixed losses (the real ones sample RoIs at random)."""
    from keras_maskrcnn.training_statistics import STATISTIC_NAMES

    rng = np.random.default_rng()
    weights = dict(zip(LOSS_NAMES, rng.uniform(0.0, 4.0, len(LOSS_NAMES))))
    values = dict(zip(LOSS_NAMES, rng.uniform(0.1, 2.0, len(LOSS_NAMES))))
    model = small_model(loss_weights=weights)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    fixed = {name: tf.constant(v, tf.float32) for name, v in values.items()}
    statistics = {name: (tf.constant(1.0), tf.constant(2.0)) for name in STATISTIC_NAMES}
    model._losses_and_statistics = lambda inputs, targets, training: (dict(fixed), statistics)
    results = model.test_step(({"images": np.zeros((1, 64, 64, 3), np.float32)}, {}))
    expected = sum(weights[name] * values[name] for name in LOSS_NAMES)
    np.testing.assert_allclose(float(results["loss"]), expected, rtol=1e-6)
    for name in LOSS_NAMES:
        np.testing.assert_allclose(float(results[name]), values[name], rtol=1e-6)


def test_zero_loss_weights_train_nothing():
    """Weights reach the gradients: with every loss weighted 0 a step changes no weight, with the
    default weights the same step does."""
    ds = synthetic_dataset(2, 2, image_size=(64, 64), max_instances=4, flip_probability=0.0)
    batch = next(iter(ds))
    moved = {}
    for label, loss_weights in (("zero", {name: 0.0 for name in LOSS_NAMES}), ("default", None)):
        keras.utils.set_random_seed(3)
        model = small_model(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, box_batch_size_per_image=64,
                            loss_weights=loss_weights)
        model.build()
        before = [w.numpy().copy() for w in model.trainable_weights]
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        model.train_on_batch(*batch)
        moved[label] = max(float(np.max(np.abs(w.numpy() - b))) for w, b in zip(model.trainable_weights, before))
    assert moved["zero"] == 0.0 and moved["default"] > 1e-4, moved
