"""A training plan that fits the data and the machine: model, image size, precision, recipe.

``keras-maskrcnn train`` (and anyone who wants the same defaults from Python) asks
:func:`plan_training` what to do when the user has not said. The rules:

* **Image size**: never upscale by default. The short side is the smallest short side among
  the training images (at most torchvision's 800), the long side the largest long side (at most
  1333), so no training image is enlarged and COCO-sized photos get torchvision's sizes.
* **Model**: with pretrained backbone weights, torchvision's ResNet-50 FPN configuration
  (frozen batch norm, three trainable stages). Without weights, the from-scratch preset
  (:func:`keras_maskrcnn.presets.from_scratch_config`: ResNet-18, trainable batch norm, a
  128-channel FPN, jittered ground truth RoIs, the classification loss weighted 4x) at the data's
  size: a ResNet-50 from scratch learns nothing in the time a CPU has.
* **Recipe**: with weights, torchvision's schedule (SGD momentum 0.9, lr 0.02 per 16 images,
  warmup, step decay) with Keras' decoupled weight decay (``"sgd"``; torchvision's coupled L2 is
  the ``torchvision_v1`` recipe's ``"sgd_l2"``). Without, the from-scratch recipe of
  ``benchmarks/train_synthetic.py`` (AdamW, lr scaled from 2e-3 at batch 8, cosine decay to 0
  over the run, a linear warmup over 40 % of a short run, at most 100 steps, gradient clipping).
  A named recipe (``recipe=``, :mod:`keras_maskrcnn.recipes`: ``torchvision_v1``, ``lsj``, ``lsj_detectron2``) replaces these
  rules with a published run's model layout, optimizer, schedule, augmentation and batch-norm
  synchronisation, the learning rate scaled linearly with the batch.
* **Batch**: 2 images at large sizes (torchvision's per-GPU batch), more for small images
  (trainable batch norm needs several images per batch): about 256 x 256 x 4 pixels. For a fixed
  number of epochs from scratch, batch 4 at 256 x 256 learnt more than batch 8 (twice the steps,
  held-out segm AP50 0.630 against 0.603, four seeds each), in about 20 % less time per epoch in
  bfloat16 and the same in float32 (BENCHMARKS.md, "Session 17").
* **Mirror copies** (from scratch only): each batch also holds the horizontal mirror of each of
  its images (batch augmentation, Hoffer et al. 2019): twice the compute per step for the same
  steps and epochs, and for a fixed number of epochs from scratch more held-out AP than either
  the plain batch or a batch of twice as many distinct images (BENCHMARKS.md, "Session 19").
* **Precision**: ``"auto"`` (:mod:`keras_maskrcnn.precision`).

Everything the user sets explicitly wins; :meth:`TrainingPlan.describe` says what was chosen,
and :meth:`TrainingPlan.build_model`, :meth:`TrainingPlan.build_dataset` and
:meth:`TrainingPlan.build_optimizer` build it with the library functions the examples call
(:class:`~keras_maskrcnn.MaskRCNN`, :func:`~keras_maskrcnn.data.coco_dataset`,
:func:`~keras_maskrcnn.optimizers.build_optimizer`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import keras

from keras_maskrcnn import presets, transform
from keras_maskrcnn.callbacks import EpochTimeEstimate  # noqa: F401  (re-exported: it was defined here)
from keras_maskrcnn.model_training import checked_loss_weights
from keras_maskrcnn.optimizers import build_optimizer
from keras_maskrcnn.precision import resolve_policy
from keras_maskrcnn.recipes import Recipe, augmentation_options, augmentation_supported, check_augmentation, get_recipe

PathLike = Union[str, "os.PathLike[str]"]

TORCHVISION_MIN_SIZE, TORCHVISION_MAX_SIZE = transform.MIN_SIZE, transform.MAX_SIZE
# Pixels per batch the plan aims at (4 images of 256 x 256), and the batch size range.
BATCH_PIXELS = 4 * 256 * 256
MAX_AUTO_BATCH = 8
DEFAULT_EPOCHS = 12  # without a recipe
# From scratch, held-out AP still rises steeply until about this many training images seen (the
# plan's from_scratch_config at batch 4 on 160 synthetic shapes, BENCHMARKS.md "Session 18": 1920
# images seen -> segm AP50 0.63-0.72, 3200 -> 0.79; session 9's plan: 5120 -> 0.77); a shorter
# from-scratch plan says so.
FROM_SCRATCH_IMAGES_SEEN = 3200
# AdamW from scratch warms up over 40 % of a short run, at most 100 steps: the 20 steps (one epoch)
# it had before left the box head's classifier at the class prior for two epochs (BENCHMARKS.md,
# "Session 16").
FROM_SCRATCH_WARMUP = 100
FROM_SCRATCH_WARMUP_FRACTION = 0.4


@dataclasses.dataclass
class TrainingPlan:
    """What to train and how. ``model_config`` holds :class:`~keras_maskrcnn.MaskRCNN` arguments
    (``num_classes`` excluded); the optimizer fields are :func:`keras_maskrcnn.optimizers.build_optimizer`'s."""

    model_name: str
    model_config: Dict[str, Any]
    precision: str
    batch_size: int
    epochs: int
    steps_per_epoch: int
    optimizer: str
    learning_rate: float
    schedule: str
    warmup_steps: int
    weight_decay: float
    clipnorm: Optional[float]
    momentum: float = 0.9
    decay_steps: Optional[Sequence[int]] = None
    warmup_factor: float = 0.001
    norm_weight_decay: Optional[float] = None
    recipe: Optional[Recipe] = None
    augmentation: Optional[str] = None  # None: the pipeline's default (flip)
    augmentation_options: Optional[Dict[str, Any]] = None
    sync_batch_norm: bool = False
    copy_paste: bool = False  # data.copy_paste between the images of each batch
    mirror_copies: bool = False  # each image also mirrored in its batch (data.coco_dataset's mirror_copies)
    note: Optional[str] = None  # advice printed with the plan

    @property
    def min_size(self) -> int:
        return self.model_config["min_size"]

    @property
    def max_size(self) -> int:
        return self.model_config["max_size"]

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def build_model(self, num_classes: int, backbone_weights: Optional[PathLike] = None) -> keras.Model:
        """The planned :class:`~keras_maskrcnn.MaskRCNN` for ``num_classes`` classes, its backbone
        initialised from ``backbone_weights`` (a torchvision ResNet state dict, ``.safetensors`` or
        ``.npz``, keys plain or under ``backbone.body.``) when given. For distributed training,
        call it inside ``strategy.scope()``. With ``sync_batch_norm`` its batch norm layers are
        synchronized (:func:`keras_maskrcnn.layers.norm.synchronize_batch_norm`)."""
        from keras_maskrcnn.layers.norm import synchronize_batch_norm
        from keras_maskrcnn.model import MaskRCNN

        model = MaskRCNN(num_classes=num_classes, **self.model_config)
        if self.sync_batch_norm:
            synchronize_batch_norm(model)
        if backbone_weights:
            from keras_maskrcnn.convert import load_torchvision_resnet, read_state_dict

            state_dict = read_state_dict(os.fspath(backbone_weights))
            prefix = "backbone.body." if any(k.startswith("backbone.body.") for k in state_dict) else ""
            load_torchvision_resnet(model.backbone, state_dict, prefix=prefix)
        return model

    def build_dataset(self, data: Any, model: keras.Model, repeat: bool = False, seed: Optional[int] = None):
        """The training pipeline of ``data`` (a :class:`~keras_maskrcnn.training_data.TrainingData`)
        at the planned image size and batch size, with ``model``'s padding and mask size;
        ``repeat`` for a fixed number of steps per epoch; ``augmentation`` (with its options) goes to
        the pipeline (``ValueError`` if it does not offer it)."""
        augment = dict(copy_paste=True) if self.copy_paste else {}
        if self.mirror_copies:
            augment.update(mirror_copies=True)
        if self.augmentation is not None:
            check_augmentation(self.augmentation)
            if augmentation_supported():
                augment.update(augmentation=self.augmentation, augmentation_options=self.augmentation_options)
        return data.dataset(
            self.batch_size,
            min_size=self.min_size,
            max_size=self.max_size,
            size_divisible=model.size_divisible,
            mask_size=model.gt_mask_size,
            repeat=repeat,
            seed=seed,
            drop_remainder=data.num_images >= self.batch_size,
            **augment,
        )

    def build_optimizer(self) -> keras.optimizers.Optimizer:
        """:func:`~keras_maskrcnn.optimizers.build_optimizer` with the planned recipe. For distributed
        training, call it inside ``strategy.scope()``."""
        return build_optimizer(
            learning_rate=self.learning_rate,
            optimizer=self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            warmup_factor=self.warmup_factor,
            schedule=self.schedule,
            total_steps=self.total_steps,
            decay_steps=self.decay_steps,
            clipnorm=self.clipnorm,
            norm_weight_decay=self.norm_weight_decay,
        )

    def describe(self) -> str:
        """A few lines for the user: the recipe, model, image size, precision and the schedule."""
        clip = f", gradient norm clipped at {self.clipnorm:g}" if self.clipnorm else ""
        recipe = [f"  recipe     {self.recipe.describe()}"] if self.recipe else []
        extras = []
        if self.augmentation:
            extras.append(f"{self.augmentation} augmentation{_options_text(self.augmentation_options)}")
        extras += ["copy-paste"] if self.copy_paste else []
        if self.mirror_copies:
            extras.append(f"each image also mirrored in its batch ({2 * self.batch_size} views per step)")
        extras += ["synchronized batch norm"] if self.sync_batch_norm else []
        if self.decay_steps and self.schedule == "step":
            extras.append("decay at steps " + ", ".join(str(s) for s in self.decay_steps))
        if self.norm_weight_decay is not None:
            extras.append(f"norm weight decay {self.norm_weight_decay:g}")
        weights = {k: w for k, w in (self.model_config.get("loss_weights") or {}).items() if w != 1.0}
        if weights:
            extras.append("loss weights " + ", ".join(f"{k} x{w:g}" for k, w in weights.items()))
        return "\n".join(["Training plan:"] + recipe + [
            f"  model      {self.model_name}",
            f"  images     short side {self.min_size}, long side at most {self.max_size} px",
            f"  precision  {self.precision}",
            f"  batches    {self.batch_size} images, {self.steps_per_epoch} steps per epoch, {self.epochs} epochs "
            f"({self.total_steps} steps)",
            f"  optimizer  {self.optimizer}, lr {self.learning_rate:g}, {self.schedule} schedule after "
            f"{self.warmup_steps} warmup steps, weight decay {self.weight_decay:g}{clip}",
        ] + ([f"  training   {'; '.join(extras)}"] if extras else []) + ([f"  note       {self.note}"] if self.note else []))


def _options_text(options: Optional[Dict[str, Any]]) -> str:
    """`` (short side 480-800)`` / `` (1024 x 1024 frame)`` for the plan printout."""
    if not options:
        return ""
    if "min_sizes" in options:
        return f" (short side {min(options['min_sizes'])}-{max(options['min_sizes'])})"
    if "target_size" in options:
        return f" ({options['target_size']} x {options['target_size']} frame)"
    return f" {options}"


def image_size_for(image_sizes: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    """``(min_size, max_size)`` that enlarges none of the ``(height, width)`` images.

    The smallest short side and the largest long side, capped at torchvision's 800 / 1333.
    """
    if not image_sizes:
        raise ValueError("image_size_for needs at least one image size.")
    short = min(min(h, w) for h, w in image_sizes)
    long = max(max(h, w) for h, w in image_sizes)
    min_size = min(short, TORCHVISION_MIN_SIZE)
    return min_size, max(min(long, TORCHVISION_MAX_SIZE), min_size)


def steps_per_epoch_for(num_images: int, batch_size: int) -> int:
    """Full batches in one pass over ``num_images`` images (at least 1)."""
    return max(num_images // batch_size, 1)


def batch_size_for(min_size: int, max_size: int) -> int:
    """Images per batch: about :data:`BATCH_PIXELS` pixels, between 2 and :data:`MAX_AUTO_BATCH`."""
    pixels = min_size * max_size
    return int(min(MAX_AUTO_BATCH, max(2, BATCH_PIXELS // pixels)))


def plan_training(
    image_sizes: Sequence[Tuple[int, int]],
    num_images: int,
    epochs: Optional[int],
    pretrained: bool,
    backbone: Optional[str] = None,
    min_size: Optional[int] = None,
    max_size: Optional[int] = None,
    batch_size: Optional[int] = None,
    steps_per_epoch: Optional[int] = None,
    precision: Optional[str] = "auto",
    optimizer: Optional[str] = None,
    learning_rate: Optional[float] = None,
    schedule: Optional[str] = None,
    warmup_steps: Optional[int] = None,
    weight_decay: Optional[float] = None,
    clipnorm: Optional[float] = None,
    momentum: Optional[float] = None,
    decay_epochs: Optional[Sequence[float]] = None,
    trainable_backbone_layers: Optional[int] = None,
    backbone_norm: Optional[str] = None,
    recipe: Union[str, Recipe, None] = None,
    augmentation: Optional[str] = None,
    sync_batch_norm: Optional[bool] = None,
    norm_weight_decay: Optional[float] = None,
    copy_paste: Optional[bool] = None,
    loss_weights: Optional[Mapping[str, float]] = None,
    mirror_copies: Optional[bool] = None,
) -> TrainingPlan:
    """The plan for training on ``num_images`` images of ``image_sizes`` for ``epochs`` epochs.

    Every argument left ``None`` is chosen by the rules of the module docstring, or by ``recipe``
    (a :mod:`keras_maskrcnn.recipes` name or :class:`~keras_maskrcnn.recipes.Recipe`) when one is
    given; ``epochs=None`` is the recipe's (12 without one). ``pretrained`` says whether backbone
    weights will be loaded. ``augmentation`` names a data-pipeline preset (``ValueError`` if the
    pipeline does not offer it); ``momentum`` defaults to 0.9. ``precision="auto"`` is resolved
    here (logged). ``copy_paste`` pastes objects between the images of each batch
    (:mod:`keras_maskrcnn.data.copy_paste`; off unless asked). ``loss_weights`` replaces the
    model's weights of its five losses (:class:`~keras_maskrcnn.MaskRCNN`'s ``loss_weights``: those
    not named weigh 1; the from-scratch preset weighs the classification loss 4). ``mirror_copies``
    puts each image in its batch twice, as is and mirrored (``None``: on for the from-scratch plan,
    off with weights or a recipe).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    recipe = None if recipe is None else get_recipe(recipe)
    epochs = epochs or (recipe.epochs if recipe else DEFAULT_EPOCHS)
    min_size, max_size = _image_size(image_sizes, min_size, max_size)
    model_name, config = _model(pretrained, backbone, min_size, max_size, recipe, backbone_norm,
                                trainable_backbone_layers)
    if loss_weights is not None:
        checked_loss_weights(loss_weights)  # ValueError for an unknown name or a bad weight, before training
        config["loss_weights"] = dict(loss_weights) or None
    augmentation = augmentation or (recipe.augmentation if recipe else None)
    if augmentation is not None:
        check_augmentation(augmentation)
    options = augmentation_options(augmentation, min_size, recipe)
    frame = options["target_size"] if augmentation == "lsj" else None  # every LSJ image is this square
    batch_size = batch_size or (batch_size_for(frame, frame) if frame else batch_size_for(min_size, max_size))
    steps = steps_per_epoch or steps_per_epoch_for(num_images, batch_size)  # full batches: the pipeline drops the rest
    optimizer, defaults = _optimizer_defaults(optimizer, pretrained, batch_size, steps, epochs, recipe)
    if norm_weight_decay is not None and optimizer != "sgd_l2":
        raise ValueError(f"norm_weight_decay needs optimizer 'sgd_l2', not {optimizer!r}.")
    schedule = schedule or defaults["schedule"]
    if decay_epochs is None and recipe is not None and schedule == "step":
        decay_epochs = recipe.decay_epochs_for(epochs)
    return TrainingPlan(
        model_name=model_name,
        model_config=config,
        precision=resolve_policy(precision),
        batch_size=batch_size,
        epochs=epochs,
        steps_per_epoch=steps,
        optimizer=optimizer,
        learning_rate=learning_rate or defaults["learning_rate"],
        schedule=schedule,
        warmup_steps=defaults["warmup"] if warmup_steps is None else warmup_steps,
        weight_decay=defaults["weight_decay"] if weight_decay is None else weight_decay,
        clipnorm=defaults["clipnorm"] if clipnorm is None else (clipnorm or None),
        momentum=defaults["momentum"] if momentum is None else momentum,
        decay_steps=[max(1, round(e * steps)) for e in decay_epochs] if decay_epochs else None,
        warmup_factor=defaults["warmup_factor"],
        norm_weight_decay=defaults["norm_weight_decay"] if norm_weight_decay is None else norm_weight_decay,
        recipe=recipe,
        augmentation=augmentation,
        augmentation_options=options,
        sync_batch_norm=bool(recipe and recipe.sync_batch_norm) if sync_batch_norm is None else sync_batch_norm,
        copy_paste=bool(copy_paste),
        mirror_copies=not (pretrained or recipe) if mirror_copies is None else bool(mirror_copies),
        note=None if pretrained or recipe else _from_scratch_note(epochs, steps * batch_size),
    )


def _from_scratch_note(epochs: int, images_per_epoch: int) -> Optional[str]:
    """Advice when a from-scratch plan ends long before the model stops improving."""
    seen = epochs * images_per_epoch
    if seen >= FROM_SCRATCH_IMAGES_SEEN:
        return None
    suggested = math.ceil(FROM_SCRATCH_IMAGES_SEEN / images_per_epoch)
    return (f"trains on {seen} images seen in all; from scratch, held-out AP still rises steeply until about "
            f"{FROM_SCRATCH_IMAGES_SEEN} (BENCHMARKS.md): --epochs {suggested} gets there")


def _image_size(image_sizes, min_size, max_size) -> Tuple[int, int]:
    """``(min_size, max_size)``: the user's, else the data's (:func:`image_size_for`: never enlarging)."""
    auto_min, auto_max = image_size_for(image_sizes)
    if min_size is None:
        min_size = auto_min if max_size is None else min(auto_min, max_size)
    if max_size is None:
        max_size = max(auto_max, min_size)
    return min_size, max_size


def _model(pretrained, backbone, min_size, max_size, recipe, backbone_norm, trainable_backbone_layers):
    """``(description, MaskRCNN arguments)``: the recipe's layout, torchvision's with weights or a
    backbone other than resnet18, else the from-scratch preset; norm and trainable stages by
    torchvision's rule unless the user or the recipe says."""
    if recipe is not None:
        name = backbone or "resnet50"
        config = recipe.model_config(name, min_size, max_size)
        model_name = f"{name} FPN (torchvision's {recipe.model[-2:]} configuration)"
        backbone_norm = backbone_norm or recipe.backbone_norm
        if trainable_backbone_layers is None:
            trainable_backbone_layers = recipe.trainable_backbone_layers
    elif pretrained or (backbone not in (None, "resnet18")):
        name = backbone or "resnet50"
        config = presets.torchvision_maskrcnn_resnet50_fpn_config(backbone=name, min_size=min_size, max_size=max_size)
        model_name = f"{name} FPN (torchvision's configuration)"
    else:
        config = presets.from_scratch_config(image_size=min_size)
        config["max_size"] = max_size
        model_name = "resnet18 FPN, from-scratch preset (presets.from_scratch_config)"
    config["backbone_norm"] = backbone_norm or ("frozen_bn" if pretrained else "batch_norm")
    config["trainable_backbone_layers"] = (
        trainable_backbone_layers if trainable_backbone_layers is not None else (3 if pretrained else 5)
    )
    model_name += f", {config['backbone_norm']}, {config['trainable_backbone_layers']} trainable stages"
    return model_name, config


def _optimizer_defaults(optimizer, pretrained, batch_size, steps, epochs, recipe) -> Tuple[str, Dict[str, Any]]:
    """The optimizer's name and the defaults of its recipe: the named recipe's (for its own
    optimizer or plain ``"sgd"``), torchvision's schedule for SGD, the from-scratch recipe for AdamW.
    ``steps`` is the number of steps per epoch. SGD warms up within the first epoch, as torchvision's
    reference scripts do (``min(1000, len(data_loader) - 1)``); AdamW from scratch over
    :data:`FROM_SCRATCH_WARMUP_FRACTION` of a short run (:data:`FROM_SCRATCH_WARMUP` steps at most)."""
    common = dict(momentum=0.9, warmup_factor=0.001, norm_weight_decay=None)
    if recipe is not None and optimizer in (None, recipe.optimizer, "sgd"):
        optimizer = optimizer or recipe.optimizer
        return optimizer, dict(
            learning_rate=recipe.learning_rate_for(batch_size), schedule="step", warmup=min(recipe.warmup_steps, steps),
            warmup_factor=recipe.warmup_factor, weight_decay=recipe.weight_decay, clipnorm=None,
            momentum=recipe.momentum, norm_weight_decay=recipe.norm_weight_decay if optimizer == "sgd_l2" else None,
        )
    optimizer = optimizer or ("sgd" if pretrained else "adamw")
    if optimizer == "adamw":
        lr = 2e-3 * math.sqrt(batch_size / 8)  # the synthetic benchmark's best, sqrt-scaled
        warmup = min(FROM_SCRATCH_WARMUP, round(FROM_SCRATCH_WARMUP_FRACTION * steps * epochs))
        return optimizer, dict(common, learning_rate=lr, schedule="cosine", warmup=warmup,
                               weight_decay=1e-4, clipnorm=10.0)
    lr = 0.02 * batch_size / 16  # torchvision: 0.02 for 16 images, linear scaling
    return optimizer, dict(common, learning_rate=lr, schedule="step", warmup=min(1000, steps), weight_decay=1e-4,
                           clipnorm=None)


def coco_image_sizes(source) -> list:
    """``(height, width)`` of every image of a :class:`~keras_maskrcnn.data.CocoSource`, from its
    annotation file, or from the image file's header where the file gives none."""
    from PIL import Image

    sizes = []
    for image_id in source.image_ids:
        info = source.coco.imgs[image_id]
        if info.get("height") and info.get("width"):
            sizes.append((int(info["height"]), int(info["width"])))
        else:
            with Image.open(source.image_path(image_id)) as image:
                sizes.append((image.height, image.width))
    return sizes
