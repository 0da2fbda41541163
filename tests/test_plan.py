"""keras_maskrcnn.plan: the training plan `keras-maskrcnn train` makes when the user does not say."""
import math

import numpy as np
import pytest

from keras_maskrcnn import plan as plan_module
from keras_maskrcnn.plan import EpochTimeEstimate, batch_size_for, image_size_for, plan_training


def test_image_size_never_enlarges_and_caps_at_torchvision():
    assert image_size_for([(256, 256)]) == (256, 256)
    assert image_size_for([(240, 320), (256, 256), (300, 200)]) == (200, 320)
    assert image_size_for([(1080, 1920), (3000, 4000)]) == (800, 1333)
    rng = np.random.default_rng()
    sizes = [tuple(int(v) for v in rng.integers(32, 2000, size=2)) for _ in range(20)]
    min_size, max_size = image_size_for(sizes)
    for h, w in sizes:
        scale = min(min_size / min(h, w), max_size / max(h, w))
        assert scale <= 1.0 + 1e-9, (h, w, min_size, max_size)
    with pytest.raises(ValueError):
        image_size_for([])


def test_batch_size_follows_the_pixels():
    assert batch_size_for(256, 256) == 4
    assert batch_size_for(181, 181) == 8
    assert batch_size_for(128, 128) == 8  # capped
    assert batch_size_for(362, 362) == 2
    assert batch_size_for(512, 512) == 2  # at least 2
    assert batch_size_for(800, 1333) == 2


def _warmed_up_cosine(lr, step, warmup, total, factor=0.001):
    """torchvision's linear warmup from ``factor`` multiplying a cosine decay to 0 at ``total``."""
    alpha = min(step / warmup, 1.0)
    return lr * (factor * (1 - alpha) + alpha) * 0.5 * (1 + math.cos(math.pi * step / total))


def test_from_scratch_plan_is_the_from_scratch_preset_with_adamw(monkeypatch):
    monkeypatch.setattr(plan_module, "resolve_policy", lambda p: "float32" if p == "auto" else p)
    plan = plan_training([(256, 256)] * 160, 160, epochs=12, pretrained=False)
    assert plan.model_config["backbone"] == "resnet18"
    assert plan.model_config["backbone_norm"] == "batch_norm"
    assert plan.model_config["trainable_backbone_layers"] == 5
    assert plan.model_config["box_gt_jitter_copies"] == 4 and plan.model_config["fpn_channels"] == 128
    assert plan.model_config["loss_weights"] == {"class_loss": 4.0}
    assert (plan.min_size, plan.max_size) == (256, 256)
    assert plan.batch_size == 4 and plan.steps_per_epoch == 40 and plan.total_steps == 480
    assert (plan.optimizer, plan.schedule) == ("adamw", "cosine")
    assert plan.learning_rate == pytest.approx(2e-3 * math.sqrt(4 / 8))  # 2e-3 at batch 8, sqrt-scaled
    # AdamW warms up over 40 % of a short run, at most 100 steps, not within one epoch.
    assert plan.clipnorm == 10.0 and plan.warmup_steps == 100
    assert plan_training([(256, 256)] * 160, 160, epochs=5, pretrained=False).warmup_steps == 80  # 40 % of 200
    assert plan.precision == "float32"
    text = plan.describe()
    assert plan.mirror_copies
    for expected in ("resnet18", "256", "float32", "40 steps per epoch", "adamw", "after 100 warmup steps",
                     "loss weights class_loss x4", "each image also mirrored in its batch (8 views per step)"):
        assert expected in text
    # 12 epochs of 160 images are 1920 images seen: the plan says how many epochs reach 3200.
    assert "1920 images seen" in text and "--epochs 20" in text
    assert "--epochs 27" in plan_training([(256, 256)] * 120, 120, epochs=12, pretrained=False).describe()
    assert plan_training([(256, 256)] * 160, 160, epochs=20, pretrained=False).note is None
    longer = plan_training([(256, 256)] * 160, 160, epochs=32, pretrained=False)
    assert longer.note is None and longer.warmup_steps == 100
    schedule = longer.build_optimizer()._learning_rate
    assert float(schedule(50)) == pytest.approx(_warmed_up_cosine(plan.learning_rate, 50, warmup=100, total=1280))
    # A warmup the user asks for is kept whole, even when longer than an epoch (40 steps here).
    asked = plan_training([(256, 256)] * 160, 160, epochs=12, pretrained=False, warmup_steps=50)
    assert asked.warmup_steps == 50 and "after 50 warmup steps" in asked.describe()
    rate = asked.build_optimizer()._learning_rate
    assert float(rate(25)) == pytest.approx(_warmed_up_cosine(plan.learning_rate, 25, warmup=50, total=480))
    assert plan_training([(256, 256)] * 160, 160, epochs=12, pretrained=True).note is None


def test_pretrained_plan_is_torchvisions_recipe(monkeypatch):
    monkeypatch.setattr(plan_module, "resolve_policy", lambda p: "float32" if p == "auto" else p)
    plan = plan_training([(480, 640), (600, 800)], 1000, epochs=26, pretrained=True)
    assert plan.model_config["backbone"] == "resnet50"
    assert plan.model_config["backbone_norm"] == "frozen_bn"
    assert plan.model_config["trainable_backbone_layers"] == 3
    assert (plan.min_size, plan.max_size) == (480, 800)
    assert plan.batch_size == 2
    assert (plan.optimizer, plan.schedule) == ("sgd", "step")
    assert plan.learning_rate == pytest.approx(0.02 * 2 / 16)
    assert plan.clipnorm is None


def test_explicit_choices_win():
    plan = plan_training(
        [(256, 256)], 10, epochs=2, pretrained=False, backbone="resnet50", min_size=320, max_size=512,
        batch_size=3, steps_per_epoch=7, precision="mixed_bfloat16", optimizer="sgd", learning_rate=0.5,
        schedule="constant", warmup_steps=0, weight_decay=0.0, clipnorm=0.0, trainable_backbone_layers=2,
        backbone_norm="frozen_bn", decay_epochs=[1],
    )
    assert plan.model_config["backbone"] == "resnet50"
    assert (plan.min_size, plan.max_size) == (320, 512)
    assert (plan.batch_size, plan.steps_per_epoch, plan.precision) == (3, 7, "mixed_bfloat16")
    assert (plan.optimizer, plan.learning_rate, plan.schedule) == ("sgd", 0.5, "constant")
    assert (plan.warmup_steps, plan.weight_decay, plan.clipnorm) == (0, 0.0, None)
    assert plan.model_config["trainable_backbone_layers"] == 2
    assert plan.model_config["backbone_norm"] == "frozen_bn"
    assert plan.decay_steps == [7]
    # Only a maximum given: the short side follows it down, never up.
    assert plan_training([(600, 600)], 1, 1, False, max_size=400, precision="float32").min_size == 400


def test_steps_per_epoch_count_the_full_batches_the_pipeline_keeps():
    # coco_dataset drops the last partial batch when there is at least one full one.
    assert plan_training([(256, 256)], 165, 1, False, precision="float32").steps_per_epoch == 41  # batch 4
    assert plan_training([(256, 256)], 3, 1, False, precision="float32").steps_per_epoch == 1


def test_plan_builds_its_optimizer():
    plan = plan_training([(128, 128)], 16, epochs=3, pretrained=False, precision="float32")
    optimizer = plan.build_optimizer()
    assert type(optimizer).__name__ == "FusedAdamW"
    assert optimizer.global_clipnorm == 10.0


def test_epoch_time_estimate_reports_once():
    now = [0.0]
    printed = []
    callback = EpochTimeEstimate(steps_per_epoch=20, epochs=12, measure_steps=3, clock=lambda: now[0],
                                 print_fn=printed.append)
    callback.on_train_begin()
    for step, t in enumerate([30.0, 32.0, 34.0, 36.0, 38.0, 40.0]):
        now[0] = t
        callback.on_train_batch_end(step)
    assert len(printed) == 1
    # First step 30 s; then 2 s per step: 40 s (0.7 min) per epoch, 8 min for 12 epochs.
    assert "first step 30 s" in printed[0] and "2.00 s per step" in printed[0]
    assert "0.7 min per epoch" in printed[0] and "8 min for 12 epochs" in printed[0]


def test_loss_weights_replace_the_presets(monkeypatch):
    monkeypatch.setattr(plan_module, "resolve_policy", lambda p: "float32")
    sizes = [(256, 256)] * 16
    plan = plan_training(sizes, 16, epochs=1, pretrained=False, loss_weights={"mask_loss": 2.0})
    assert plan.model_config["loss_weights"] == {"mask_loss": 2.0}  # replaced, not merged: class_loss back to 1
    assert "loss weights mask_loss x2" in plan.describe() and "class_loss" not in plan.describe()
    plain = plan_training(sizes, 16, epochs=1, pretrained=False, loss_weights={})
    assert plain.model_config["loss_weights"] is None and "loss weights" not in plain.describe()
    assert plan_training(sizes, 16, epochs=1, pretrained=True).model_config["loss_weights"] is None  # torchvision's
    with pytest.raises(ValueError, match="cls_loss"):
        plan_training(sizes, 16, epochs=1, pretrained=False, loss_weights={"cls_loss": 2.0})
    with pytest.raises(ValueError, match=">= 0"):
        plan_training(sizes, 16, epochs=1, pretrained=False, loss_weights={"class_loss": -1.0})


def test_mirror_copies_from_scratch_only_unless_asked(monkeypatch):
    monkeypatch.setattr(plan_module, "resolve_policy", lambda p: "float32")
    sizes = [(256, 256)] * 16
    assert plan_training(sizes, 16, epochs=1, pretrained=False).mirror_copies
    pretrained = plan_training(sizes, 16, epochs=1, pretrained=True)
    assert not pretrained.mirror_copies and "mirrored" not in pretrained.describe()
    assert not plan_training(sizes, 16, epochs=1, pretrained=False, recipe="torchvision_v1").mirror_copies
    assert not plan_training(sizes, 16, epochs=1, pretrained=False, mirror_copies=False).mirror_copies
    assert plan_training(sizes, 16, epochs=1, pretrained=True, mirror_copies=True).mirror_copies


def test_plan_dataset_carries_the_mirror_copies(monkeypatch):
    """The planned pipeline gives each step batch_size images and their mirrors; steps per epoch
    and the schedule count images, as without copies."""
    from keras_maskrcnn.model import MaskRCNN
    from keras_maskrcnn.training_data import synthetic_training_data

    monkeypatch.setattr(plan_module, "resolve_policy", lambda p: "float32")
    data = synthetic_training_data(8, 64, seed=int(np.random.default_rng().integers(1000)))
    model = MaskRCNN(num_classes=data.num_classes, backbone="resnet18", min_size=64, max_size=64)
    for copies, views in ((True, 8), (False, 4)):
        plan = plan_training(data.image_sizes, data.num_images, epochs=1, pretrained=False, batch_size=4,
                             mirror_copies=copies)
        assert plan.steps_per_epoch == 2
        inputs, targets = next(iter(plan.build_dataset(data, model, seed=1)))
        assert inputs["images"].shape[0] == views and targets["boxes"].shape[0] == views
    np.testing.assert_array_equal(inputs["images"][0].numpy()[:, ::-1], next(iter(
        plan_training(data.image_sizes, 8, 1, False, batch_size=4).build_dataset(data, model, seed=1)))[0]["images"][1])
