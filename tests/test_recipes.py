"""keras_maskrcnn.recipes: the published recipes as presets, through the plan and the command line."""
import inspect
import types

import keras
import pytest

from keras_maskrcnn import plan as plan_module
from keras_maskrcnn import recipes
from keras_maskrcnn.optimizers import CoupledL2SGD
from keras_maskrcnn.plan import plan_training
from keras_maskrcnn.recipes import RECIPES, get_recipe

COCO_SIZES = [(480, 640), (600, 800)]


@pytest.fixture(autouse=True)
def float32_policy(monkeypatch):
    monkeypatch.setattr(plan_module, "resolve_policy", lambda p: "float32" if p == "auto" else p)


@pytest.fixture
def pipeline_without_augmentation(monkeypatch):
    """The data pipeline as it was before augmentation presets: a flip and nothing else."""
    from keras_maskrcnn.data import pipeline

    def build_dataset(num_examples, load_example, batch_size, training, flip_probability=0.5):
        raise AssertionError("not called")

    monkeypatch.setattr(pipeline, "build_dataset", build_dataset)


def _pipeline_offers(name):
    try:
        recipes.check_augmentation(name)
        return True
    except ValueError:
        return False


needs_multiscale = pytest.mark.skipif(not _pipeline_offers("multiscale"), reason="data pipeline without augmentation")


def test_recipes_state_their_sources_and_scale_the_learning_rate():
    assert set(RECIPES) == {"torchvision_v1", "lsj", "lsj_detectron2"}
    v1, lsj = get_recipe("torchvision_v1"), get_recipe("lsj")
    assert v1.learning_rate_for(16) == pytest.approx(0.02) and v1.learning_rate_for(4) == pytest.approx(0.005)
    assert lsj.learning_rate_for(64) == pytest.approx(0.1) and lsj.learning_rate_for(2) == pytest.approx(0.1 / 32)
    assert (v1.optimizer, v1.momentum, v1.weight_decay) == ("sgd_l2", 0.9, 1e-4)
    assert (v1.warmup_steps, v1.warmup_factor) == (1000, 0.001)
    assert v1.decay_epochs_for(26) == [16, 22] and v1.decay_epochs_for(13) == [8, 11]
    assert (lsj.epochs, lsj.decay_epochs, lsj.weight_decay, lsj.sync_batch_norm) == (400, (352, 384), 4e-5, True)
    d2 = get_recipe("lsj_detectron2")
    assert [round(e * 184375 / 100) for e in d2.decay_epochs] == [163889, 177546]  # detectron2's milestones
    assert (d2.norm_weight_decay, d2.warmup_steps, d2.warmup_factor) == (0.0, 500, 0.067)
    assert get_recipe(v1) is v1
    with pytest.raises(ValueError, match="torchvision_v1"):
        get_recipe("torchvision_v3")
    for recipe in RECIPES.values():
        assert recipe.name in recipe.describe() and recipe.source in recipe.describe()


@needs_multiscale
def test_torchvision_v1_plan():
    plan = plan_training(COCO_SIZES, 1000, None, pretrained=True, recipe="torchvision_v1", min_size=800, max_size=1333)
    assert plan.model_config["backbone"] == "resnet50" and plan.model_config["fpn_norm"] is None
    assert (plan.model_config["backbone_norm"], plan.model_config["trainable_backbone_layers"]) == ("frozen_bn", 3)
    assert (plan.min_size, plan.max_size, plan.batch_size, plan.steps_per_epoch) == (800, 1333, 2, 500)
    assert (plan.optimizer, plan.schedule, plan.epochs) == ("sgd_l2", "step", 26)
    assert plan.learning_rate == pytest.approx(0.02 * 2 / 16)
    assert (plan.weight_decay, plan.momentum, plan.warmup_factor) == (1e-4, 0.9, 0.001)
    assert plan.warmup_steps == 500  # the recipe's 1000, within the first epoch as in torchvision's reference
    assert plan.decay_steps == [16 * 500, 22 * 500] and plan.clipnorm is None
    assert (plan.augmentation, plan.sync_batch_norm, plan.norm_weight_decay) == ("multiscale", False, None)
    assert plan.augmentation_options == {"min_sizes": tuple(range(480, 801, 32))}  # torchvision's at short side 800
    text = plan.describe()
    for expected in ("recipe     torchvision_v1", "sgd_l2", "multiscale augmentation (short side 480-800)",
                     "decay at steps 8000, 11000"):
        assert expected in text, text
    optimizer = plan.build_optimizer()
    assert isinstance(optimizer, CoupledL2SGD) and optimizer.weight_decay == 1e-4 and optimizer.momentum == 0.9
    # The data's own size (never enlarged, short side 480): the short sides scale by 480 / 800.
    # From scratch torchvision's rule trains every stage with batch norm.
    scratch = plan_training(COCO_SIZES, 1000, None, pretrained=False, recipe="torchvision_v1")
    assert (scratch.min_size, scratch.max_size) == (480, 800)
    assert scratch.augmentation_options == {"min_sizes": tuple(round(m * 0.6) for m in range(480, 801, 32))}
    assert scratch.model_config["backbone_norm"] == "batch_norm"
    assert scratch.model_config["trainable_backbone_layers"] == 5


@needs_multiscale
def test_lsj_plan_and_its_detectron2_variant():
    plan = plan_training(COCO_SIZES, 640, None, pretrained=False, recipe="lsj", min_size=800, max_size=1333)
    config = plan.model_config
    assert (config["fpn_norm"], config["head_norm"], config["box_head_convs"]) == ("batch_norm", "batch_norm", 4)
    assert (config["backbone_norm"], config["trainable_backbone_layers"]) == ("batch_norm", 5)
    assert (plan.min_size, plan.max_size, plan.batch_size) == (800, 1333, 2)
    # torchvision's 1024 crops, resized to 800 by its model before the backbone.
    assert (plan.augmentation, plan.augmentation_options, plan.sync_batch_norm) == ("lsj", {"target_size": 800}, True)
    assert plan.learning_rate == pytest.approx(0.1 * 2 / 64) and plan.weight_decay == 4e-5
    assert plan.epochs == 400 and plan.decay_steps == [352 * 320, 384 * 320]
    assert "lsj augmentation (800 x 800 frame); synchronized batch norm" in plan.describe()
    small = plan_training(COCO_SIZES, 640, 10, pretrained=False, recipe="lsj", min_size=320, batch_size=8)
    assert (small.min_size, small.max_size, small.augmentation_options) == (320, 800, {"target_size": 320})
    assert small.decay_steps == [round(8.8 * 80), round(9.6 * 80)]  # 88 % and 96 % of 10 epochs of 80 steps
    assert small.learning_rate == pytest.approx(0.1 * 8 / 64)
    d2 = plan_training(COCO_SIZES, 640, None, pretrained=False, recipe="lsj_detectron2", batch_size=64, min_size=800)
    assert (d2.epochs, d2.steps_per_epoch, d2.learning_rate) == (100, 10, pytest.approx(0.1))
    assert d2.augmentation_options == {"target_size": 1024}
    assert d2.decay_steps == [889, 963] and (d2.warmup_factor, d2.norm_weight_decay) == (0.067, 0.0)
    optimizer = d2.build_optimizer()
    assert isinstance(optimizer, CoupledL2SGD) and optimizer.norm_weight_decay == 0.0
    assert float(optimizer._learning_rate(0)) == pytest.approx(0.1 * 0.067)  # warmup capped at one epoch (10 steps)
    # The batch follows the frame: 2 images of 800 x 800 at most, 4 of 256 x 256, 8 of 160 x 160.
    assert plan_training([(256, 256)], 64, 1, False, recipe="lsj").batch_size == 4
    assert plan_training([(160, 160)], 64, 1, False, recipe="lsj").batch_size == 8


@needs_multiscale
def test_explicit_options_win_over_the_recipe():
    plan = plan_training(
        COCO_SIZES, 1000, 13, pretrained=True, recipe="torchvision_v1", learning_rate=0.01, weight_decay=0.0,
        momentum=0.8, warmup_steps=10, augmentation="flip", optimizer="sgd", trainable_backbone_layers=5,
        sync_batch_norm=True,
    )
    assert (plan.learning_rate, plan.weight_decay, plan.momentum, plan.warmup_steps) == (0.01, 0.0, 0.8, 10)
    assert (plan.optimizer, plan.augmentation, plan.sync_batch_norm) == ("sgd", "flip", True)
    assert plan.model_config["trainable_backbone_layers"] == 5
    assert plan.decay_steps == [round(8 * 500), round(11 * 500)]  # 16/26 and 22/26 of 13 epochs
    # AdamW is not the recipe's optimizer: its own defaults, not the recipe's SGD rate.
    adamw = plan_training(COCO_SIZES, 1000, None, pretrained=True, recipe="torchvision_v1", optimizer="adamw")
    assert (adamw.schedule, adamw.decay_steps, adamw.clipnorm) == ("cosine", None, 10.0)
    with pytest.raises(ValueError, match="norm_weight_decay"):
        plan_training(COCO_SIZES, 1000, None, True, recipe="torchvision_v1", optimizer="sgd", norm_weight_decay=0.0)


def test_without_a_recipe_the_plan_is_unchanged():
    plan = plan_training(COCO_SIZES, 1000, None, pretrained=True)
    assert (plan.recipe, plan.augmentation, plan.sync_batch_norm, plan.epochs) == (None, None, False, 12)
    assert (plan.optimizer, plan.weight_decay, plan.momentum, plan.warmup_factor) == ("sgd", 1e-4, 0.9, 0.001)
    assert "recipe" not in plan.describe() and "training   " not in plan.describe()
    assert type(plan.build_optimizer()) is keras.optimizers.SGD


def test_a_pipeline_without_the_augmentation_is_a_clear_error(pipeline_without_augmentation):
    with pytest.raises(ValueError, match="has no augmentation option.*--augmentation flip"):
        plan_training(COCO_SIZES, 1000, None, pretrained=True, recipe="torchvision_v1")
    plan = plan_training(COCO_SIZES, 1000, None, pretrained=True, recipe="torchvision_v1", augmentation="flip")
    assert plan.augmentation == "flip"
    seen = {}

    class Data:
        num_images = 1000

        def dataset(self, batch_size, **kwargs):
            seen.update(kwargs)

    plan.build_dataset(Data(), types.SimpleNamespace(size_divisible=32, gt_mask_size=128))
    assert "augmentation" not in seen  # the old pipeline's flip, no option passed


@needs_multiscale
def test_plan_passes_the_augmentation_and_synchronizes_batch_norm():
    from keras_maskrcnn.data import pipeline

    assert "augmentation" in inspect.signature(pipeline.build_dataset).parameters
    plan = plan_training([(64, 64)], 4, 1, pretrained=False, recipe="lsj", backbone="resnet18", max_size=64)
    seen = {}

    class Data:
        num_images = 4

        def dataset(self, batch_size, **kwargs):
            seen.update(kwargs, batch_size=batch_size)

    model = plan.build_model(num_classes=2)
    norms = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and all(n.synchronized for n in norms)
    plan.build_dataset(Data(), model)
    assert (seen["augmentation"], seen["augmentation_options"]) == ("lsj", {"target_size": 64})


@needs_multiscale
def test_train_command_with_a_recipe(tmp_path, monkeypatch, capsys):
    import keras_maskrcnn.train as train_module
    from keras_maskrcnn.cli import main

    seen = {}
    monkeypatch.setattr(train_module, "train", lambda model, dataset, output, **kw: seen.update(model=model, **kw))
    code = main(["train", "--synthetic", "2", "--synthetic-size", "64", "--synthetic-val", "0", "--recipe", "lsj",
                 "--backbone", "resnet18", "--max-size", "64", "--batch-size", "2", "--output", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "recipe     lsj" in out and "lsj augmentation" in out and "synchronized batch norm" in out
    assert seen["epochs"] == 400 and isinstance(seen["optimizer"], CoupledL2SGD)
    assert seen["optimizer"].weight_decay == 4e-5
    norms = [l for l in seen["model"]._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and all(n.synchronized for n in norms)


def test_train_command_reports_a_missing_augmentation(tmp_path, pipeline_without_augmentation, capsys):
    from keras_maskrcnn.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--synthetic", "2", "--synthetic-size", "64", "--synthetic-val", "0",
              "--recipe", "torchvision_v1", "--output", str(tmp_path)])
    assert exit_.value.code == 1
    assert "has no augmentation option" in capsys.readouterr().err
