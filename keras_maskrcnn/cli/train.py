"""``keras-maskrcnn train``: parse the options, then build the model, its data and its optimizer
with the library (:mod:`keras_maskrcnn.training_data`, :class:`keras_maskrcnn.plan.TrainingPlan`)
and train with :func:`keras_maskrcnn.train.train`."""
from __future__ import annotations

import argparse
import os
from typing import Any, Optional, Tuple

from keras_maskrcnn.cli.common import CommandError, formatter, non_negative_int, positive_int, require_dir, require_file
from keras_maskrcnn.layers.backbone import BACKBONES

NAME = "train"
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand and its options."""
    parser = subparsers.add_parser(
        NAME,
        help="train a model on a COCO dataset or the built-in synthetic shapes",
        formatter_class=formatter,
        description="Train Mask R-CNN. Writes OUTPUT/checkpoints/epoch-NNN.keras after every epoch, "
        "OUTPUT/model.keras at the end, TensorBoard logs in OUTPUT/logs, the epoch logs in "
        "OUTPUT/history.csv and the label map in OUTPUT/classes.json.",
    )
    _add_data_options(parser)
    _add_model_options(parser)
    _add_run_options(parser)
    _add_optimizer_options(parser)
    _add_recipe_options(parser)
    return parser


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    """The training and validation data, and the image size."""
    data = parser.add_argument_group("data")
    data.add_argument("--annotations", metavar="FILE", help="COCO instances JSON of the training set")
    data.add_argument("--images", metavar="DIR", help="folder the training images' file_name is relative to")
    data.add_argument(
        "--synthetic", metavar="N", type=positive_int,
        help="train on N built-in synthetic images instead of --annotations/--images "
        "(evaluated on --synthetic-val held-out images)",
    )
    data.add_argument("--synthetic-size", metavar="PX", type=positive_int, default=256,
                      help="side of the synthetic images")
    data.add_argument("--synthetic-val", metavar="N", type=non_negative_int, default=8,
                      help="held-out synthetic images written to OUTPUT/synthetic_val for evaluation (0: none)")
    data.add_argument("--val-annotations", metavar="FILE", help="COCO instances JSON to evaluate on during training")
    data.add_argument("--val-images", metavar="DIR", help="image folder of --val-annotations")
    data.add_argument("--eval-every", metavar="N", type=positive_int, default=1,
                      help="evaluate every N epochs (and after the last)")
    data.add_argument("--eval-max-images", metavar="N", type=positive_int,
                      help="evaluate on the first N validation images only")
    data.add_argument("--min-size", metavar="PX", type=positive_int,
                      help="resize images so the short side is PX (default: the smallest short side of the "
                      "training images, at most 800: images are never enlarged)")
    data.add_argument("--max-size", metavar="PX", type=positive_int,
                      help="... unless the long side would exceed PX (default: the largest long side, at most 1333)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The network, its initial weights and precision."""
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=sorted(BACKBONES),
                       help="backbone network (default: resnet50 with --backbone-weights; without, the from-scratch "
                       "resnet18 preset, which learns from scratch on a CPU)")
    model.add_argument(
        "--preset", metavar="NAME",
        help="fine-tune a preset with published weights (`keras-maskrcnn presets`, e.g. "
        "maskrcnn_resnet50_fpn_v2_coco): its architecture and weights, new predictors for your classes")
    model.add_argument(
        "--backbone-weights", metavar="FILE",
        help="initialise the backbone from a torchvision ResNet state dict (.safetensors or .npz; keys "
        "plain or under 'backbone.body.')",
    )
    model.add_argument(
        "--backbone-norm", choices=("auto", "frozen_bn", "batch_norm"), default="auto",
        help="backbone normalisation: frozen statistics (for pretrained weights) or trainable batch norm; "
        "auto: frozen_bn with --backbone-weights, else batch_norm",
    )
    model.add_argument("--trainable-backbone-layers", metavar="N", type=int, choices=range(6),
                       help="ResNet stages trained, counted from the top (0-5; default: 3 with --backbone-weights, "
                       "else 5)")
    model.add_argument("--mixed-precision", choices=PRECISIONS, default="auto",
                       help="Keras dtype policy; auto: mixed_bfloat16 on CPUs with native bfloat16 (AMX, "
                       "AVX512_BF16), mixed_float16 on NVIDIA GPUs of compute capability >= 7.0, float32 "
                       "elsewhere (mixed_float16 adds loss scaling)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The output folder, length, resuming, seeding and distribution."""
    run = parser.add_argument_group("run")
    run.add_argument("--output", metavar="DIR", required=True, help="output folder (required)")
    run.add_argument("--epochs", metavar="N", type=positive_int,
                     help="epochs to train (in total, when resuming; default: the --recipe's, else 12)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in OUTPUT: from OUTPUT/backup if it was interrupted, "
                     "else from the newest checkpoint")
    run.add_argument("--keep-checkpoints", metavar="N", type=non_negative_int, default=0,
                     help="keep only the N newest checkpoints (0: all)")
    run.add_argument("--seed", metavar="N", type=int, default=0,
                     help="random seed (weights, shuffling, flips, synthetic data)")
    run.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1, help="Keras fit verbosity")
    run.add_argument("--backup-every", metavar="N", type=non_negative_int, default=500,
                     help="back up the training state to OUTPUT/backup every N steps and after every epoch "
                     "(0: after every epoch only); an interrupted run resumes from it when the same command "
                     "is run again")
    run.add_argument("--strategy", choices=("default", "mirrored", "multi_worker"), default="default",
                     help="distribution: one device; mirrored: all GPUs of this machine; multi_worker: the "
                     "workers in the TF_CONFIG environment variable (run the same command on each). "
                     "--batch-size is the global batch, split evenly over the replicas")


def _add_optimizer_options(parser: argparse.ArgumentParser) -> None:
    """The optimizer and its learning-rate schedule."""
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps-per-epoch", metavar="N", type=positive_int,
                       help="batches per epoch (the data repeats as needed); default: one pass over the data")
    optim.add_argument("--batch-size", metavar="N", type=positive_int,
                       help="images per batch (default: 2 at large sizes, up to 8 for small images)")
    optim.add_argument("--optimizer", choices=("sgd", "sgd_l2", "adamw"),
                       help="sgd: Keras' SGD with momentum and decoupled weight decay (for fine-tuning); "
                       "sgd_l2: torch.optim.SGD's update, weight decay as an L2 gradient through the momentum "
                       "(torchvision's recipes); adamw: converges much faster when training from scratch "
                       "(default: the --recipe's; else sgd with --backbone-weights, adamw without)")
    optim.add_argument("--lr", metavar="LR", type=float,
                       help="base learning rate (default: SGD 0.02 * batch size / 16, torchvision's "
                       "recipe; AdamW 2e-3 * sqrt(batch size / 8))")
    optim.add_argument("--lr-schedule", choices=("step", "cosine", "constant"),
                       help="after warmup: step decay, cosine decay to 0, or constant (default: step for "
                       "sgd, cosine for adamw)")
    optim.add_argument("--lr-decay-epochs", metavar="E", type=positive_int, nargs="+",
                       help="epochs after which the step schedule multiplies the rate by 0.1 "
                       "(default: at 2/3 and 8/9 of training)")
    optim.add_argument("--momentum", metavar="M", type=float, help="SGD momentum (default: 0.9)")
    optim.add_argument("--weight-decay", metavar="WD", type=float,
                       help="weight decay (0: none; default: the --recipe's, else 1e-4)")
    optim.add_argument("--norm-weight-decay", metavar="WD", type=float,
                       help="sgd_l2 only: weight decay of the batch norm parameters (default: the --recipe's, "
                       "else --weight-decay)")
    optim.add_argument("--warmup-steps", metavar="N", type=non_negative_int,
                       help="steps of linear warmup from 0.001 * LR (at most one epoch; default: 1000 for sgd, "
                       "100 for adamw)")
    optim.add_argument("--clipnorm", metavar="X", type=float,
                       help="clip the global gradient norm to X (0: no clipping; default: none for sgd, 10 for adamw)")
    optim.add_argument("--loss-weights", metavar="NAME=W", nargs="+", type=_loss_weight,
                       help="weights of the losses in the total, e.g. class_loss=1 (names: rpn_objectness_loss, "
                       "rpn_box_loss, class_loss, box_loss, mask_loss; those not named weigh 1; default: "
                       "class_loss=4 from scratch, else all 1)")


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """A published recipe, and the training options it sets that have no other flag."""
    from keras_maskrcnn.recipes import RECIPES

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument(
        "--recipe", choices=sorted(RECIPES),
        help="a published training recipe (keras_maskrcnn.recipes): torchvision_v1 (SGD + L2 1e-4, lr 0.02 per "
        "16 images, 26 epochs, decay after 16 and 22, multi-scale); lsj (torchvision v2: large-scale jitter "
        "at 1024, synchronized batch norm, lr 0.1 per 64 images, L2 4e-5, 400 epochs); lsj_detectron2 "
        "(detectron2's 100-epoch LSJ baseline). The learning rate scales with --batch-size; options given "
        "explicitly win",
    )
    recipe.add_argument("--augmentation", choices=("flip", "multiscale", "lsj", "none"),
                        help="training augmentation of the data pipeline (default: the --recipe's, else flip)")
    recipe.add_argument("--copy-paste", action="store_true",
                        help="simple copy-paste: each training image receives a random subset of the objects of "
                        "another image of its batch (torchvision's --use-copypaste; Ghiasi et al. 2021)")
    recipe.add_argument("--mirror-copies", action=argparse.BooleanOptionalAction,
                        help="each batch also holds the horizontal mirror of each of its images: twice the work "
                        "per step, more learnt per epoch (batch augmentation; default: on when training from "
                        "scratch, else off)")
    recipe.add_argument("--sync-batch-norm", action=argparse.BooleanOptionalAction,
                        help="batch norm statistics over all replicas of --strategy (default: the --recipe's, "
                        "else off)")


def _loss_weight(text: str) -> Tuple[str, float]:
    """``NAME=W`` -> ``(NAME, W)`` for ``--loss-weights``; names and weights checked by the model's
    own rule (:func:`keras_maskrcnn.model_training.checked_loss_weights`)."""
    from keras_maskrcnn.model_training import LOSS_NAMES, checked_loss_weights

    usage = f"expected NAME=W with NAME one of {', '.join(LOSS_NAMES)} and W >= 0, got {text!r}"
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(usage)
    try:
        weight = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: weight {value!r} is not a number") from None
    try:
        checked_loss_weights({name: weight})
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{usage}: {error}") from None
    return name, weight


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Usage errors (exit status 2): the data options and the paths given."""
    if args.synthetic is None and (args.annotations is None or args.images is None):
        parser.error("give --annotations FILE and --images DIR, or --synthetic N")
    if args.synthetic is not None and (args.annotations is not None or args.images is not None):
        parser.error("--synthetic cannot be combined with --annotations/--images")
    if (args.val_annotations is None) != (args.val_images is None):
        parser.error("--val-annotations and --val-images go together")
    require_file(parser, args.annotations, "--annotations")
    require_dir(parser, args.images, "--images")
    require_file(parser, args.val_annotations, "--val-annotations")
    require_dir(parser, args.val_images, "--val-images")
    require_file(parser, args.backbone_weights, "--backbone-weights")
    if args.preset is not None and (args.backbone_weights or args.backbone):
        parser.error("--preset brings its own backbone and weights: drop --backbone / --backbone-weights")


def _data(args: argparse.Namespace) -> Tuple[Any, Optional[str], Optional[str]]:
    """The training data, and the validation set's annotation file and image folder (held-out
    synthetic images written to OUTPUT/synthetic_val unless given)."""
    from keras_maskrcnn.training_data import coco_training_data, synthetic_training_data, synthetic_validation_set

    if args.synthetic is None:
        return coco_training_data(args.annotations, args.images), args.val_annotations, args.val_images
    data = synthetic_training_data(args.synthetic, args.synthetic_size, seed=args.seed)
    if args.val_annotations is None and args.synthetic_val > 0:
        directory = os.path.join(args.output, "synthetic_val")
        annotation_file, image_dir = synthetic_validation_set(
            directory, args.synthetic_val, args.synthetic_size, seed=args.seed
        )
        return data, annotation_file, image_dir
    return data, args.val_annotations, args.val_images


def _plan(args: argparse.Namespace, data: Any):
    """:func:`~keras_maskrcnn.plan.plan_training` with the options the user gave."""
    from keras_maskrcnn.plan import plan_training

    return plan_training(
        data.image_sizes, data.num_images, args.epochs, pretrained=bool(args.backbone_weights or args.preset),
        backbone=args.backbone,
        min_size=args.min_size, max_size=args.max_size, batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch, precision=args.mixed_precision, optimizer=args.optimizer,
        learning_rate=args.lr, schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, clipnorm=args.clipnorm, momentum=args.momentum,
        decay_epochs=args.lr_decay_epochs, trainable_backbone_layers=args.trainable_backbone_layers,
        backbone_norm=None if args.backbone_norm == "auto" else args.backbone_norm, recipe=args.recipe,
        augmentation=args.augmentation, sync_batch_norm=args.sync_batch_norm, norm_weight_decay=args.norm_weight_decay,
        copy_paste=args.copy_paste, loss_weights=None if args.loss_weights is None else dict(args.loss_weights),
        mirror_copies=args.mirror_copies,
    )


def _preset_model(name: str, num_classes: int, plan: Any):
    """The preset's architecture and weights with new predictors for ``num_classes``, at the plan's
    image size and trainable stages."""
    from keras_maskrcnn.model import MaskRCNN

    keep = ("min_size", "max_size", "trainable_backbone_layers", "loss_weights")
    return MaskRCNN.from_preset(name, num_classes=num_classes, **{k: plan.model_config[k] for k in keep})


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``keras-maskrcnn train``; returns the exit status."""
    _check_arguments(args, parser)

    from keras_maskrcnn.distribute import get_strategy, is_chief

    # First: MultiWorkerMirroredStrategy must exist before TensorFlow runs anything.
    strategy = get_strategy(args.strategy)
    replicas = strategy.num_replicas_in_sync
    chief = is_chief(strategy)

    import keras

    from keras_maskrcnn.data.validate import check_dataset
    from keras_maskrcnn.plan import EpochTimeEstimate
    from keras_maskrcnn.train import train

    # Fail fast on bad data, with every problem listed (not one crash hours in).
    for annotation_file, image_dir in ((args.annotations, args.images), (args.val_annotations, args.val_images)):
        if annotation_file is not None:
            check_dataset(annotation_file, image_dir)

    keras.utils.set_random_seed(args.seed)
    data, val_annotations, val_images = _data(args)
    plan = _plan(args, data)  # ValueError (exit status 1): e.g. an augmentation the pipeline does not offer
    if plan.batch_size % replicas:
        raise CommandError(
            f"--batch-size {plan.batch_size} is not a multiple of the {replicas} replicas of --strategy {args.strategy}"
        )
    if chief:
        print(plan.describe())
        if replicas > 1:
            print(f"  replicas   {replicas} ({args.strategy}), {plan.batch_size // replicas} image(s) per replica")
    # The plan's precision for this run only: main() called from Python (or a test) gets the
    # process's policy back afterwards.
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(plan.precision)
    try:
        with strategy.scope():  # the model's and the optimizer's variables belong to the strategy
            if args.preset is not None:
                model = _preset_model(args.preset, data.num_classes, plan)
            else:
                model = plan.build_model(data.num_classes, backbone_weights=args.backbone_weights)
        dataset = plan.build_dataset(data, model, repeat=args.steps_per_epoch is not None, seed=args.seed)
        with strategy.scope():
            optimizer = plan.build_optimizer()
        train(
            model,
            dataset,
            args.output,
            epochs=plan.epochs,
            optimizer=optimizer,
            steps_per_epoch=args.steps_per_epoch,
            callbacks=[EpochTimeEstimate(plan.steps_per_epoch, plan.epochs)] if chief else (),
            val_annotations=val_annotations,
            val_images=val_images,
            eval_every=args.eval_every,
            eval_max_images=args.eval_max_images,
            resume=args.resume,
            keep_checkpoints=args.keep_checkpoints or None,
            class_to_category=data.class_to_category,
            class_names=data.class_names,
            verbose=args.verbose,
            backup_every=args.backup_every or None,
            validate=False,  # done above
        )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    if chief:
        print(f"Saved {os.path.join(args.output, 'model.keras')}")
    return 0
