"""The published Mask R-CNN training recipes as named presets: ``keras-maskrcnn train --recipe NAME``.

A :class:`Recipe` states what a published run did: model layout, optimizer, learning rate per
reference batch (scaled linearly with the global batch), warmup, schedule, augmentation and
batch-norm synchronisation. :func:`keras_maskrcnn.plan.plan_training` (``recipe=NAME``) turns it
into a :class:`~keras_maskrcnn.plan.TrainingPlan` for the data and the machine at hand; every
option given explicitly still wins.

>>> from keras_maskrcnn.recipes import get_recipe
>>> recipe = get_recipe("torchvision_v1")
>>> recipe.learning_rate_for(batch_size=4)     # 0.02 per 16 images, linearly scaled
0.005

``torchvision_v1``
    torchvision's detection reference for ``maskrcnn_resnet50_fpn`` (``references/detection``:
    ``train.py --epochs 26 --lr-steps 16 22``, 8 GPUs x 2 images; ``torch.optim.SGD(lr=0.02,
    momentum=0.9, weight_decay=1e-4)`` on every trainable parameter; ``engine.py``'s linear warmup
    over the first min(1000, epoch length) iterations from 0.001; the rate x0.1 after epochs 16
    and 22). Augmentation: torchvision's ``--data-augmentation multiscale`` preset (short side one
    of 480, 512, ..., 800, long side at most 1333, horizontal flip). The published v1 weights
    (box AP 37.9) were trained with the reference's default ``hflip`` instead: pass
    ``--augmentation flip`` for exactly that run. Model: torchvision's v1 layout, frozen batch
    norm and three trainable stages with backbone weights (trainable batch norm and all stages
    without, torchvision's rule).
``lsj``
    torchvision's v2 recipe, which trained ``maskrcnn_resnet50_fpn_v2`` (box AP 47.4, mask AP 41.8;
    pytorch/vision pull request 5773: ``--epochs 400 --lr-steps 352 384 --lr 0.1 --batch-size 2
    --weight-decay 0.00004 --sync-bn --data-augmentation lsj`` on 4 nodes x 8 GPUs, i.e. lr 0.1
    per 64 images, coupled L2 4e-5 on every parameter, warmup as above, x0.1 after 88 % and 96 %
    of training). Large-scale jitter (scale 0.1-2.0 of a 1024 x 1024 frame, a 1024 x 1024 crop
    padded with the mean colour, flip), synchronized batch norm everywhere, torchvision's v2
    layout (batch norm in the FPN and the heads, conv box head), all backbone stages trainable.
    No copy-paste: that command has none (torchvision's ``SimpleCopyPaste`` came two months later,
    pytorch/vision pull request 5825).
``lsj_detectron2``
    detectron2's "new baselines" (``configs/new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py``; the
    setup of Li et al. 2021, whose model torchvision's v2 is): the same augmentation, synchronized
    batch norm, layout, lr and decay, trained from scratch for 100 epochs (184375 iterations of 64
    images) with the decays at 8/9 and 26/27 of training, 500 warmup iterations from 0.067, and no
    weight decay on normalisation parameters (``weight_decay_norm=0`` in ``configs/common/optim.py``).

With ``--epochs`` other than the recipe's, the decays stay at the same fractions of training
(rounded to whole steps); warmup is at most one epoch (as torchvision's). The published runs
trained on COCO with 8-32 GPUs; on other data and hardware a recipe is a starting point.

Image sizes. Both sources evaluate COCO at short side 800 (long side at most 1333), and the
recipes' training sizes are stated for that: multi-scale short sides 480-800; the jitter's square
frame 1024 for detectron2 and, in effect, 800 for torchvision (its model resizes the 1024 x 1024
crops to 800 x 800 before the backbone; this pipeline's images go to the backbone as they are).
The plan evaluates with its own rule (never enlarging the data, :mod:`keras_maskrcnn.plan`; give
``--min-size 800`` on COCO), and :func:`augmentation_options` scales the training sizes by
``min_size / 800``, so training and evaluation keep the recipe's ratio on any data.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, Optional, Tuple, Union


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named training recipe (module docstring). Learning rates are per ``reference_batch_size``
    images; epochs and decay epochs are the recipe's own (see :meth:`decay_epochs_for`).

    Attributes:
        name: the preset's name (``--recipe``).
        source: where the numbers come from.
        model: ``"torchvision_v1"`` or ``"torchvision_v2"``: the
            :mod:`keras_maskrcnn.presets` layout (:meth:`model_config`).
        optimizer: a :func:`~keras_maskrcnn.optimizers.build_optimizer` name (``"sgd_l2"``:
            ``torch.optim.SGD``'s coupled L2).
        learning_rate, reference_batch_size: the base rate for that many images per step.
        momentum, weight_decay, norm_weight_decay: the optimizer's (``None``: no separate decay for
            normalisation parameters).
        warmup_steps, warmup_factor: linear warmup from ``warmup_factor`` times the rate.
        epochs, decay_epochs, decay_factor: the step schedule.
        augmentation: the pipeline's augmentation preset (:mod:`keras_maskrcnn.data.augment`).
        jitter_size: the square frame of ``"lsj"`` at an evaluation short side of 800 (module
            docstring); ``None``: the pipeline's 1024.
        sync_batch_norm: synchronize trainable batch norm over replicas
            (:func:`keras_maskrcnn.layers.norm.synchronize_batch_norm`).
        backbone_norm, trainable_backbone_layers: ``None``: torchvision's rule (frozen batch norm and
            3 stages with backbone weights; trainable batch norm and 5 without).
    """

    name: str
    source: str
    model: str
    learning_rate: float
    reference_batch_size: int
    weight_decay: float
    epochs: int
    decay_epochs: Tuple[float, ...]
    augmentation: str
    optimizer: str = "sgd_l2"
    momentum: float = 0.9
    norm_weight_decay: Optional[float] = None
    warmup_steps: int = 1000
    warmup_factor: float = 0.001
    decay_factor: float = 0.1
    jitter_size: Optional[int] = None
    sync_batch_norm: bool = False
    backbone_norm: Optional[str] = None
    trainable_backbone_layers: Optional[int] = None

    def learning_rate_for(self, batch_size: int) -> float:
        """The recipe's rate scaled linearly to a global batch of ``batch_size`` images."""
        return self.learning_rate * batch_size / self.reference_batch_size

    def decay_epochs_for(self, epochs: int) -> list:
        """The decay epochs (possibly fractional) for a run of ``epochs`` epochs: the recipe's
        scaled by ``epochs / self.epochs``, i.e. at the same fractions of training."""
        return [e * epochs / self.epochs for e in self.decay_epochs]

    def model_config(self, backbone: str, min_size: int, max_size: int) -> Dict[str, Any]:
        """:class:`~keras_maskrcnn.MaskRCNN` arguments of the recipe's layout (norm settings are
        the plan's)."""
        from keras_maskrcnn import presets

        build = {
            "torchvision_v1": presets.torchvision_maskrcnn_resnet50_fpn_config,
            "torchvision_v2": presets.torchvision_maskrcnn_resnet50_fpn_v2_config,
        }[self.model]
        return build(backbone=backbone, min_size=min_size, max_size=max_size)

    def describe(self) -> str:
        """One line: the name and what it does."""
        sync = ", synchronized batch norm" if self.sync_batch_norm else ""
        return (f"{self.name} ({self.model} layout, {self.augmentation} augmentation{sync}; lr "
                f"{self.learning_rate:g} per {self.reference_batch_size} images, {self.epochs} epochs; "
                f"{self.source})")


RECIPES: Dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="torchvision_v1",
            source="torchvision references/detection, maskrcnn_resnet50_fpn",
            model="torchvision_v1",
            learning_rate=0.02,
            reference_batch_size=16,
            weight_decay=1e-4,
            epochs=26,
            decay_epochs=(16, 22),
            augmentation="multiscale",
        ),
        Recipe(
            name="lsj",
            source="torchvision v2, pytorch/vision#5773",
            model="torchvision_v2",
            learning_rate=0.1,
            reference_batch_size=64,
            weight_decay=4e-5,
            epochs=400,
            decay_epochs=(352, 384),
            augmentation="lsj",
            jitter_size=800,  # ScaleJitter/FixedSizeCrop at 1024, then the model's resize to 800
            sync_batch_norm=True,
            backbone_norm="batch_norm",
            trainable_backbone_layers=5,
        ),
        Recipe(
            name="lsj_detectron2",
            source="detectron2 configs/new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py",
            model="torchvision_v2",
            learning_rate=0.1,
            reference_batch_size=64,
            weight_decay=4e-5,
            norm_weight_decay=0.0,
            epochs=100,
            decay_epochs=(100 * 8 / 9, 100 * 26 / 27),  # iterations 163889 and 177546 of 184375
            warmup_steps=500,
            warmup_factor=0.067,
            augmentation="lsj",
            jitter_size=1024,
            sync_batch_norm=True,
            backbone_norm="batch_norm",
            trainable_backbone_layers=5,
        ),
    )
}


def get_recipe(recipe: Union[str, Recipe]) -> Recipe:
    """The :class:`Recipe` called ``recipe`` (a :class:`Recipe` is returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}.")
    return RECIPES[recipe]


REFERENCE_MIN_SIZE = 800
"""The evaluation short side the recipes' training sizes are stated for (COCO, both sources)."""
MULTISCALE_SHORT_SIDES = tuple(range(480, 801, 32))
"""torchvision's ``multiscale`` preset: ``RandomShortestSize(min_size=(480, 512, ..., 800))``."""
LSJ_FRAME = 1024
"""The pipeline's (torchvision's and detectron2's) large-scale-jitter frame."""


def augmentation_options(augmentation: Optional[str], min_size: int, recipe: Optional[Recipe] = None) -> Optional[dict]:
    """The pipeline options (``augmentation_options``) of ``augmentation`` for training that is
    evaluated at short side ``min_size``: the recipe's sizes (stated for 800) scaled by
    ``min_size / 800``; multiples of 32 for the jitter frame. ``None`` for the other presets."""
    ratio = min_size / REFERENCE_MIN_SIZE
    if augmentation == "multiscale":
        return {"min_sizes": tuple(sorted({max(1, round(m * ratio)) for m in MULTISCALE_SHORT_SIDES}))}
    if augmentation == "lsj":
        frame = (recipe.jitter_size if recipe is not None and recipe.jitter_size else None) or LSJ_FRAME
        return {"target_size": max(32, round(frame * ratio / 32) * 32)}
    return None


def augmentation_supported() -> bool:
    """Whether the data pipeline takes an ``augmentation`` preset name
    (``keras_maskrcnn.data.pipeline.build_dataset(augmentation=...)``)."""
    from keras_maskrcnn.data import pipeline

    return "augmentation" in inspect.signature(pipeline.build_dataset).parameters


def check_augmentation(name: str) -> None:
    """Raise ``ValueError`` unless the data pipeline offers the augmentation preset ``name``
    (listed in ``keras_maskrcnn.data.augment.NAMES``). ``"flip"`` is the pipeline's default and
    always available."""
    if not augmentation_supported():
        if name == "flip":
            return
        raise ValueError(
            f"augmentation {name!r} is not available: this version's data pipeline "
            "(keras_maskrcnn.data.pipeline.build_dataset) has no augmentation option, only a horizontal "
            "flip. Train with --augmentation flip (augmentation='flip' from Python) instead."
        )
    try:
        from keras_maskrcnn.data.augment import NAMES
    except ImportError:  # an augmentation argument without the module of presets
        NAMES = ()
    if name not in NAMES:
        raise ValueError(f"Unknown augmentation {name!r}; the data pipeline offers {tuple(NAMES)}.")


__all__ = ["RECIPES", "Recipe", "augmentation_options", "augmentation_supported", "check_augmentation", "get_recipe"]
