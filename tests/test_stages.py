"""The model's composition: the RPN and RoI-heads stages, injected heads saved and reloaded, the
box coder, matcher and sampler as named pieces, and files of keras_maskrcnn 0.1.0."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.boxes import BoxCoder
from keras_maskrcnn.layers.mask_head import MaskHead
from keras_maskrcnn.matching import BACKGROUND, BalancedPositiveNegativeSampler, Matcher
from keras_maskrcnn.roi_heads import RoIHeads, positive_slots
from keras_maskrcnn.rpn import RegionProposalNetwork
from keras_maskrcnn.saving import is_legacy_file, load_model

DATA = os.path.join(os.path.dirname(__file__), "data")
TINY = dict(
    backbone="resnet18",
    backbone_norm="batch_norm",
    fpn_channels=16,
    representation_size=32,
    mask_head_convs=1,
    mask_head_channels=16,
    anchor_sizes=(8, 16, 32, 64, 128),
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=30,
    detections_per_image=10,
    box_score_threshold=0.0,
    min_size=64,
    max_size=64,
)


@keras.saving.register_keras_serializable(package="test_stages")
class TinyBoxHead(keras.layers.Layer):
    """A user's box head: one FC layer on average-pooled RoI features."""

    def __init__(self, num_classes, width=8, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.width = num_classes, width
        self.hidden = keras.layers.Dense(width, activation="relu")
        self.logits = keras.layers.Dense(num_classes + 1)
        self.deltas = keras.layers.Dense(4 * (num_classes + 1))

    def build(self, input_shape):
        self.hidden.build((None, input_shape[-1]))
        self.logits.build((None, self.width))
        self.deltas.build((None, self.width))

    def call(self, roi_features, training=None, valid=None):
        x = self.hidden(tf.reduce_mean(roi_features, axis=[2, 3]))
        deltas = self.deltas(x)
        return self.logits(x), tf.reshape(deltas, tf.concat([tf.shape(deltas)[:2], [self.num_classes + 1, 4]], 0))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "width": self.width}


@keras.saving.register_keras_serializable(package="test_stages")
class TinyMaskHead(MaskHead):
    """A user's mask head: the library's head with a different default depth."""

    def __init__(self, num_classes, channels=8, num_convs=1, **kwargs):
        super().__init__(num_classes, channels=channels, num_convs=num_convs, **kwargs)


def test_injected_heads_save_and_reload_with_identical_predictions(tmp_path):
    model = MaskRCNN(num_classes=2, box_head=TinyBoxHead(2, name="box_head"), mask_head=TinyMaskHead(2), **TINY)
    assert model.roi_heads.box_head is model.box_head and isinstance(model.box_head, TinyBoxHead)
    image = np.random.default_rng().integers(0, 255, (1, 64, 64, 3)).astype("uint8")
    expected = model(image)
    config = model.get_config()
    assert config["box_head"]["class_name"] == "TinyBoxHead" and "rpn_head" not in config
    path = str(tmp_path / "custom.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.box_head, TinyBoxHead) and isinstance(loaded.mask_head, TinyMaskHead)
    got = loaded(image)
    for key in ("boxes", "scores", "classes", "masks", "num_detections"):
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy(), err_msg=key)


def test_stages_own_their_settings_and_serialise_nested():
    model = MaskRCNN(num_classes=2, rpn_fg_iou_threshold=0.6, box_batch_size_per_image=32, box_gt_jitter_copies=3,
                     box_gt_jitter_std=0.2, **TINY)
    assert isinstance(model.rpn, RegionProposalNetwork) and isinstance(model.roi_heads, RoIHeads)
    assert model.rpn.fg_iou_threshold == 0.6 and model.roi_heads.sampler.batch_size_per_image == 32
    assert (model.roi_heads.gt_jitter_copies, model.roi_heads.gt_jitter_std) == (3, 0.2)
    assert model.get_config()["box_gt_jitter_copies"] == 3 and model.stage_config()["roi_heads_config"]["gt_jitter_std"] == 0.2
    assert MaskRCNN.from_config(model.get_config()).roi_heads.gt_jitter_copies == 3
    assert model.roi_heads.box_coder == BoxCoder((10.0, 10.0, 5.0, 5.0))
    for stage in (model.rpn, model.roi_heads):
        again = keras.layers.deserialize(keras.layers.serialize(stage))
        assert type(again) is type(stage) and again.get_config() == stage.get_config()


def _settings(model):
    return {k: v for k, v in model.get_config().items() if k not in ("name", "trainable", "dtype")}


def test_settings_grouped_by_stage_build_the_same_model_as_flat_ones():
    grouped = MaskRCNN(
        3,
        backbone="resnet18",
        backbone_config={"norm": "batch_norm", "trainable_layers": 4, "stage_channels": (64, 128, 256, 128)},
        fpn_config={"channels": 16, "norm": "batch_norm"},
        rpn_config={"anchor_sizes": (8, 16, 32, 64, 128), "nms_threshold": 0.6, "pre_nms_top_n_test": 100,
                    "post_nms_top_n_test": 30, "batch_size_per_image": 64},
        roi_heads_config={"representation_size": 32, "mask_head_convs": 1, "mask_head_channels": 16,
                          "score_threshold": 0.0, "nms_threshold": 0.4, "detections_per_image": 10,
                          "batch_size_per_image": 32, "box_coder_weights": (5.0, 5.0, 2.0, 2.0),
                          "gt_jitter_copies": 2},
        transform_config={"min_size": 64, "max_size": 96, "mask_threshold": 0.4},
    )
    flat = MaskRCNN(
        3, backbone="resnet18", backbone_norm="batch_norm", trainable_backbone_layers=4,
        backbone_stage_channels=(64, 128, 256, 128), fpn_channels=16,
        fpn_norm="batch_norm", anchor_sizes=(8, 16, 32, 64, 128), rpn_nms_threshold=0.6,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30, rpn_batch_size_per_image=64,
        representation_size=32, mask_head_convs=1, mask_head_channels=16, box_score_threshold=0.0,
        box_nms_threshold=0.4, detections_per_image=10, box_batch_size_per_image=32,
        box_coder_weights=(5.0, 5.0, 2.0, 2.0), box_gt_jitter_copies=2, min_size=64, max_size=96, mask_threshold=0.4,
    )
    assert _settings(grouped) == _settings(flat)
    assert grouped.rpn.proposal_layer.nms_threshold == 0.6 and grouped.roi_heads.detection_layer.nms_threshold == 0.4
    assert grouped.roi_heads.sampler.batch_size_per_image == 32 and grouped.rpn.batch_size_per_image == 64
    assert grouped.backbone.out_channels == flat.backbone.out_channels == (64, 128, 256, 128)

    stages = grouped.stage_config()
    assert stages["rpn_config"]["nms_threshold"] == 0.6 and stages["roi_heads_config"]["nms_threshold"] == 0.4
    assert stages["transform_config"] == {"image_mean": list(flat.image_mean), "image_std": list(flat.image_std),
                                          "min_size": 64, "max_size": 96, "size_divisible": 32, "mask_threshold": 0.4}
    assert "rpn_nms_threshold" not in stages
    assert _settings(MaskRCNN.from_config(stages)) == _settings(flat)


def test_grouped_settings_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"rpn_config has no setting 'rpn_nms_threshold'.*'nms_threshold'"):
        MaskRCNN(3, backbone="resnet18", rpn_config={"rpn_nms_threshold": 0.6})
    with pytest.raises(ValueError, match=r"rpn_nms_threshold=0.5 and rpn_config\['nms_threshold'\]=0.6 disagree"):
        MaskRCNN(3, backbone="resnet18", rpn_nms_threshold=0.5, rpn_config={"nms_threshold": 0.6})
    # The same value given both ways is not a conflict.
    assert MaskRCNN(3, backbone="resnet18", rpn_nms_threshold=0.6, rpn_config={"nms_threshold": 0.6}).proposal_layer.nms_threshold == 0.6


def test_a_0_1_file_is_refused_with_what_to_do_and_loads_with_the_converter():
    path = os.path.join(DATA, "maskrcnn_v0_1.keras")
    expected = np.load(os.path.join(DATA, "maskrcnn_v0_1_outputs.npz"))
    assert is_legacy_file(path)
    with pytest.raises(ValueError, match=r"saving\.load_model"):
        keras.saving.load_model(path)
    model = load_model(path)
    got = model(expected["image"])
    np.testing.assert_array_equal(got["classes"].numpy(), expected["classes"])
    # Same weights, same graph up to op fusion: last-bit differences only (measured 4e-6 px).
    np.testing.assert_allclose(got["boxes"].numpy(), expected["boxes"], atol=1e-4)
    np.testing.assert_allclose(got["scores"].numpy(), expected["scores"], atol=1e-5)
    np.testing.assert_allclose(got["masks"].numpy(), expected["masks"], atol=1e-4)


def test_box_coder_round_trip_and_clip():
    rng = np.random.default_rng()
    reference = np.concatenate([rng.uniform(0, 50, (20, 2)), rng.uniform(60, 120, (20, 2))], 1).astype("float32")
    boxes = reference + rng.uniform(-5, 5, (20, 4)).astype("float32")
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0), clip=2.0)
    np.testing.assert_allclose(coder.decode(coder.encode(boxes, reference), reference).numpy(), boxes, atol=1e-3)
    # dw = 100 / 5 = 20 is clipped at 2: the box is exp(2) times the reference width.
    wide = coder.decode(tf.constant([[0.0, 0.0, 100.0, 0.0]]), tf.constant([[0.0, 0.0, 10.0, 10.0]])).numpy()[0]
    np.testing.assert_allclose(wide[2] - wide[0], 10 * np.exp(2.0), rtol=1e-5)
    assert BoxCoder.from_config(coder.get_config()) == coder


def test_matcher_and_sampler_named_pieces():
    iou = tf.constant([[[0.9, 0.1], [0.5, 0.2], [0.1, 0.05]]])
    matches = Matcher(0.7, 0.3)(iou, tf.constant([[True, True]])).numpy()[0]
    assert list(matches) == [0, -2, BACKGROUND]
    sampler = BalancedPositiveNegativeSampler(4, 0.5)
    pos, neg = sampler(tf.constant([[0, 1, 0, -1, -1, -1, -1]]), tf.ones([1, 7], tf.bool))
    assert sampler.max_positive == 2 and pos.numpy().sum() == 2 and neg.numpy().sum() == 2
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)


def test_positive_slots_take_positives_in_order_then_the_rest():
    positive = tf.constant([[False, True, False, True, True], [False, False, False, False, False]])
    slots = positive_slots(positive, 3).numpy()
    assert list(slots[0]) == [1, 3, 4]
    assert list(slots[1]) == [0, 1, 2]
