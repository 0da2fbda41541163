"""A training plan that fits the data and the machine: model, image size, precision, recipe.

``keras-maskrcnn train`` (and anyone who wants the same defaults from Python) asks
:func:`plan_training` what to do when the user has not said. The rules:

* **Image size**: never upscale by default. The short side is the smallest short side among
  the training images (at most torchvision's 800), the long side the largest long side (at most
  1333), so no training image is enlarged and COCO-sized photos get torchvision's sizes.
* **Model**: with pretrained backbone weights, torchvision's ResNet-50 FPN configuration
  (frozen batch norm, three trainable stages). Without weights, the small preset
  (:func:`keras_maskrcnn.presets.small_model_config`: ResNet-18, trainable batch norm, narrow
  heads) at the data's size: a ResNet-50 from scratch learns nothing in the time a CPU has.
* **Recipe**: with weights, torchvision's (SGD momentum 0.9, lr 0.02 per 16 images, warmup, step
  decay). Without, the from-scratch recipe of ``benchmarks/train_synthetic.py`` (AdamW, lr
  scaled from 2e-3 at batch 8, cosine decay to 0 over the run, short warmup, gradient clipping).
* **Batch**: 2 images at large sizes (torchvision's per-GPU batch), more for small images
  (trainable batch norm needs several images per batch): about 256 x 256 x 8 pixels.
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
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import keras

from keras_maskrcnn import presets, transform
from keras_maskrcnn.callbacks import EpochTimeEstimate  # noqa: F401  (re-exported: it was defined here)
from keras_maskrcnn.optimizers import build_optimizer
from keras_maskrcnn.precision import resolve_policy

PathLike = Union[str, "os.PathLike[str]"]

TORCHVISION_MIN_SIZE, TORCHVISION_MAX_SIZE = transform.MIN_SIZE, transform.MAX_SIZE
# Pixels per batch the plan aims at (8 images of 256 x 256), and the batch size range.
BATCH_PIXELS = 8 * 256 * 256
MAX_AUTO_BATCH = 8


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
        call it inside ``strategy.scope()``."""
        from keras_maskrcnn.model import MaskRCNN

        model = MaskRCNN(num_classes=num_classes, **self.model_config)
        if backbone_weights:
            from keras_maskrcnn.convert import load_torchvision_resnet, read_state_dict

            state_dict = read_state_dict(os.fspath(backbone_weights))
            prefix = "backbone.body." if any(k.startswith("backbone.body.") for k in state_dict) else ""
            load_torchvision_resnet(model.backbone, state_dict, prefix=prefix)
        return model

    def build_dataset(self, data: Any, model: keras.Model, repeat: bool = False, seed: Optional[int] = None):
        """The training pipeline of ``data`` (a :class:`~keras_maskrcnn.training_data.TrainingData`)
        at the planned image size and batch size, with ``model``'s padding and mask size;
        ``repeat`` for a fixed number of steps per epoch."""
        return data.dataset(
            self.batch_size,
            min_size=self.min_size,
            max_size=self.max_size,
            size_divisible=model.size_divisible,
            mask_size=model.gt_mask_size,
            repeat=repeat,
            seed=seed,
            drop_remainder=data.num_images >= self.batch_size,
        )

    def build_optimizer(self) -> keras.optimizers.Optimizer:
        """:func:`~keras_maskrcnn.optimizers.build_optimizer` with the planned recipe (warmup of at
        most one epoch). For distributed training, call it inside ``strategy.scope()``."""
        return build_optimizer(
            learning_rate=self.learning_rate,
            optimizer=self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            warmup_steps=min(self.warmup_steps, self.steps_per_epoch),
            schedule=self.schedule,
            total_steps=self.total_steps,
            decay_steps=self.decay_steps,
            clipnorm=self.clipnorm,
        )

    def describe(self) -> str:
        """A few lines for the user: the model, image size, precision and the schedule."""
        clip = f", gradient norm clipped at {self.clipnorm:g}" if self.clipnorm else ""
        return "\n".join([
            "Training plan:",
            f"  model      {self.model_name}",
            f"  images     short side {self.min_size}, long side at most {self.max_size} px",
            f"  precision  {self.precision}",
            f"  batches    {self.batch_size} images, {self.steps_per_epoch} steps per epoch, {self.epochs} epochs "
            f"({self.total_steps} steps)",
            f"  optimizer  {self.optimizer}, lr {self.learning_rate:g}, {self.schedule} schedule after "
            f"{min(self.warmup_steps, self.steps_per_epoch)} warmup steps, weight decay {self.weight_decay:g}{clip}",
        ])


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
    epochs: int,
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
    momentum: float = 0.9,
    decay_epochs: Optional[Sequence[int]] = None,
    trainable_backbone_layers: Optional[int] = None,
    backbone_norm: Optional[str] = None,
) -> TrainingPlan:
    """The plan for training on ``num_images`` images of ``image_sizes`` for ``epochs`` epochs.

    Every argument left ``None`` is chosen by the rules of the module docstring; ``pretrained``
    says whether backbone weights will be loaded. ``precision="auto"`` is resolved here (logged).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    auto_min, auto_max = image_size_for(image_sizes)
    if min_size is None:
        min_size = auto_min if max_size is None else min(auto_min, max_size)
    if max_size is None:
        max_size = max(auto_max, min_size)
    if pretrained or (backbone not in (None, "resnet18")):
        name = backbone or "resnet50"
        config = presets.torchvision_maskrcnn_resnet50_fpn_config(backbone=name, min_size=min_size, max_size=max_size)
        model_name = f"{name} FPN (torchvision's configuration)"
    else:
        config = presets.small_model_config(image_size=min_size)
        config["max_size"] = max_size
        model_name = "resnet18 FPN, small preset (presets.small_model_config)"
    config["backbone_norm"] = backbone_norm or ("frozen_bn" if pretrained else "batch_norm")
    config["trainable_backbone_layers"] = (
        trainable_backbone_layers if trainable_backbone_layers is not None else (3 if pretrained else 5)
    )
    model_name += f", {config['backbone_norm']}, {config['trainable_backbone_layers']} trainable stages"
    batch_size = batch_size or batch_size_for(min_size, max_size)
    steps = steps_per_epoch or steps_per_epoch_for(num_images, batch_size)  # full batches, as the pipeline drops the rest
    optimizer = optimizer or ("sgd" if pretrained else "adamw")
    if optimizer == "adamw":
        default_lr = 2e-3 * math.sqrt(batch_size / 8)  # the synthetic benchmark's best, sqrt-scaled
        defaults = dict(schedule="cosine", warmup=min(100, steps), weight_decay=1e-4, clipnorm=10.0)
    else:
        default_lr = 0.02 * batch_size / 16  # torchvision: 0.02 for 16 images, linear scaling
        defaults = dict(schedule="step", warmup=1000, weight_decay=1e-4, clipnorm=None)
    return TrainingPlan(
        model_name=model_name,
        model_config=config,
        precision=resolve_policy(precision),
        batch_size=batch_size,
        epochs=epochs,
        steps_per_epoch=steps,
        optimizer=optimizer,
        learning_rate=learning_rate or default_lr,
        schedule=schedule or defaults["schedule"],
        warmup_steps=defaults["warmup"] if warmup_steps is None else warmup_steps,
        weight_decay=defaults["weight_decay"] if weight_decay is None else weight_decay,
        clipnorm=defaults["clipnorm"] if clipnorm is None else (clipnorm or None),
        momentum=momentum,
        decay_steps=[e * steps for e in decay_epochs] if decay_epochs else None,
    )


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
