"""The ``keras-maskrcnn`` command: ``train``, ``evaluate``, ``predict``, ``export`` and ``validate`` subcommands.

A thin layer over :mod:`keras_maskrcnn.train`, :mod:`keras_maskrcnn.evaluation` and
:mod:`keras_maskrcnn.visualize`; run ``keras-maskrcnn <command> --help`` for the options.
"""
from __future__ import annotations

import argparse
import os
import json
import sys
from typing import Dict, List, Optional, Sequence

from keras_maskrcnn.layers.backbone import BACKBONES

PROG = "keras-maskrcnn"
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")


class CommandError(Exception):
    """A user-facing error: printed as ``keras-maskrcnn <command>: error: ...`` (exit status 1)."""


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help when it has a meaningful default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        meaningful = default is not None and default is not False and default is not argparse.SUPPRESS
        if "default" not in text and meaningful and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _formatter(prog):
    return _HelpFormatter(prog, max_help_position=34)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Mask R-CNN for Keras 3: train on COCO-format data, evaluate with the COCO metric, "
        "draw predictions.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ----------------------------------------------------------------------------- train
    train = sub.add_parser(
        "train",
        help="train a model on a COCO dataset or the built-in synthetic shapes",
        formatter_class=_formatter,
        description="Train Mask R-CNN. Writes OUTPUT/checkpoints/epoch-NNN.keras after every epoch, "
        "OUTPUT/model.keras at the end, TensorBoard logs in OUTPUT/logs, the epoch logs in "
        "OUTPUT/history.csv and the label map in OUTPUT/classes.json.",
    )
    data = train.add_argument_group("data")
    data.add_argument("--annotations", metavar="FILE", help="COCO instances JSON of the training set")
    data.add_argument("--images", metavar="DIR", help="folder the training images' file_name is relative to")
    data.add_argument(
        "--synthetic", metavar="N", type=_positive_int,
        help="train on N built-in synthetic images instead of --annotations/--images "
        "(evaluated on --synthetic-val held-out images)",
    )
    data.add_argument("--synthetic-size", metavar="PX", type=_positive_int, default=256,
                      help="side of the synthetic images")
    data.add_argument("--synthetic-val", metavar="N", type=_non_negative_int, default=8,
                      help="held-out synthetic images written to OUTPUT/synthetic_val for evaluation (0: none)")
    data.add_argument("--val-annotations", metavar="FILE", help="COCO instances JSON to evaluate on during training")
    data.add_argument("--val-images", metavar="DIR", help="image folder of --val-annotations")
    data.add_argument("--eval-every", metavar="N", type=_positive_int, default=1,
                      help="evaluate every N epochs (and after the last)")
    data.add_argument("--eval-max-images", metavar="N", type=_positive_int,
                      help="evaluate on the first N validation images only")
    data.add_argument("--min-size", metavar="PX", type=_positive_int,
                      help="resize images so the short side is PX (default: the smallest short side of the "
                      "training images, at most 800: images are never enlarged)")
    data.add_argument("--max-size", metavar="PX", type=_positive_int,
                      help="... unless the long side would exceed PX (default: the largest long side, at most 1333)")

    model = train.add_argument_group("model")
    model.add_argument("--backbone", choices=sorted(BACKBONES),
                       help="backbone network (default: resnet50 with --backbone-weights; without, the small "
                       "resnet18 preset, which learns from scratch on a CPU)")
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

    run = train.add_argument_group("run")
    run.add_argument("--output", metavar="DIR", required=True, help="output folder (required)")
    run.add_argument("--epochs", metavar="N", type=_positive_int, default=12,
                     help="epochs to train (in total, when resuming)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in OUTPUT: from OUTPUT/backup if it was interrupted, "
                     "else from the newest checkpoint")
    run.add_argument("--keep-checkpoints", metavar="N", type=_non_negative_int, default=0,
                     help="keep only the N newest checkpoints (0: all)")
    run.add_argument("--seed", metavar="N", type=int, default=0,
                     help="random seed (weights, shuffling, flips, synthetic data)")
    run.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1, help="Keras fit verbosity")
    run.add_argument("--backup-every", metavar="N", type=_non_negative_int, default=500,
                     help="back up the training state to OUTPUT/backup every N steps and after every epoch "
                     "(0: after every epoch only); an interrupted run resumes from it when the same command "
                     "is run again")
    run.add_argument("--strategy", choices=("default", "mirrored", "multi_worker"), default="default",
                     help="distribution: one device; mirrored: all GPUs of this machine; multi_worker: the "
                     "workers in the TF_CONFIG environment variable (run the same command on each). "
                     "--batch-size is the global batch, split evenly over the replicas")

    optim = train.add_argument_group("optimisation")
    optim.add_argument("--steps-per-epoch", metavar="N", type=_positive_int,
                       help="batches per epoch (the data repeats as needed); default: one pass over the data")
    optim.add_argument("--batch-size", metavar="N", type=_positive_int,
                       help="images per batch (default: 2 at large sizes, up to 8 for small images)")
    optim.add_argument("--optimizer", choices=("sgd", "adamw"),
                       help="SGD with momentum (torchvision's recipe, for fine-tuning) or AdamW "
                       "(converges much faster when training from scratch; default: sgd with "
                       "--backbone-weights, else adamw)")
    optim.add_argument("--lr", metavar="LR", type=float,
                       help="base learning rate (default: SGD 0.02 * batch size / 16, torchvision's "
                       "recipe; AdamW 2e-3 * sqrt(batch size / 8))")
    optim.add_argument("--lr-schedule", choices=("step", "cosine", "constant"),
                       help="after warmup: step decay, cosine decay to 0, or constant (default: step for "
                       "sgd, cosine for adamw)")
    optim.add_argument("--lr-decay-epochs", metavar="E", type=_positive_int, nargs="+",
                       help="epochs after which the step schedule multiplies the rate by 0.1 "
                       "(default: at 2/3 and 8/9 of training)")
    optim.add_argument("--momentum", metavar="M", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight-decay", metavar="WD", type=float, help="weight decay (0: none; default: 1e-4)")
    optim.add_argument("--warmup-steps", metavar="N", type=_non_negative_int,
                       help="steps of linear warmup from 0.001 * LR (at most one epoch; default: 1000 for sgd, "
                       "100 for adamw)")
    optim.add_argument("--clipnorm", metavar="X", type=float,
                       help="clip the global gradient norm to X (0: no clipping; default: none for sgd, 10 for adamw)")

    # ----------------------------------------------------------------------------- evaluate
    evaluate = sub.add_parser(
        "evaluate",
        help="COCO box and mask AP/AR of a model on a COCO dataset",
        formatter_class=_formatter,
        description="Evaluate a saved model with the official COCO metric (pycocotools) and print the 12 "
        "bbox and 12 segm numbers.",
    )
    evaluate.add_argument("--annotations", metavar="FILE", required=True, help="COCO instances JSON (required)")
    evaluate.add_argument("--images", metavar="DIR", required=True,
                          help="folder the images' file_name is relative to (required)")
    evaluate.add_argument("--model", metavar="FILE", required=True, help="saved model (.keras) (required)")
    evaluate.add_argument("--max-images", metavar="N", type=_positive_int, help="evaluate the first N images only")
    evaluate.add_argument("--batch-size", metavar="N", type=_positive_int, default=2, help="images per batch")
    evaluate.add_argument("--results", metavar="FILE", help="write the detections as a COCO results JSON")
    evaluate.add_argument("--metrics", metavar="FILE", help='write the numbers as JSON {"bbox": {...}, "segm": {...}}')

    # ----------------------------------------------------------------------------- predict
    predict = sub.add_parser(
        "predict",
        help="detect objects in images and draw them",
        formatter_class=_formatter,
        description="Run a saved model on images; writes OUTPUT/<name>.png with the detections drawn and "
        "OUTPUT/results.json (COCO results format plus file_name).",
    )
    predict.add_argument("--model", metavar="FILE", required=True, help="saved model (.keras) (required)")
    predict.add_argument("--output", metavar="DIR", required=True, help="output folder (required)")
    predict.add_argument("--score-threshold", metavar="S", type=float, default=0.5,
                         help="keep (draw and write) detections scoring at least S")
    predict.add_argument("--classes", metavar="FILE",
                         help="label map (classes.json from training, or a COCO annotation file) for names "
                         "and category ids (default: classes.json next to --model, if any)")
    predict.add_argument("--batch-size", metavar="N", type=_positive_int, default=1, help="images per batch")
    predict.add_argument("images", metavar="IMAGE", nargs="+", help="image files or folders of images")
    # ----------------------------------------------------------------------------- convert
    convert = sub.add_parser(
        "convert",
        help="convert a torchvision maskrcnn_resnet50_fpn checkpoint to a .keras or .weights.h5 file",
        formatter_class=_formatter,
    )
    convert.add_argument("--checkpoint", metavar="FILE", required=True, help="torchvision state dict: .pth (read with weights_only=True; needs torch), .safetensors or .npz")
    convert.add_argument("--output", metavar="FILE", required=True, help="a .keras (whole model) or .weights.h5 file")
    convert.add_argument("--num-classes", metavar="N", type=_positive_int, default=None, help="object classes, background excluded (default: the checkpoint's); a different number re-initialises the class-specific predictors for fine-tuning")

    # ----------------------------------------------------------------------------- export
    export = sub.add_parser(
        "export",
        help="write a SavedModel for TF Serving (resizing and normalisation inside the graph)",
        formatter_class=_formatter,
    )
    export.add_argument("--model", metavar="FILE", required=True, help="a .keras model")
    export.add_argument("--output", metavar="DIR", required=True, help="base folder; the SavedModel goes to DIR/<version>")
    export.add_argument("--version", metavar="N", type=_non_negative_int, default=None, help="version folder (default: next free integer)")
    export.add_argument("--full-masks", action="store_true", help="also return uint8 masks pasted at the original image size")
    export.add_argument("--overwrite", action="store_true", help="replace an existing version folder")

    # ----------------------------------------------------------------------------- validate
    validate = sub.add_parser(
        "validate",
        help="check a COCO dataset (annotations and images) before training",
        formatter_class=_formatter,
        description="List the problems of a COCO instances dataset, each with its severity, file and annotation "
        "id: errors (training would fail or learn from wrong data) and warnings (handled as the COCO tools "
        "do). Exit status 1 when there are errors.",
    )
    validate.add_argument("--annotations", metavar="FILE", required=True, help="COCO instances JSON (required)")
    validate.add_argument("--images", metavar="DIR", required=True,
                          help="folder the images' file_name is relative to (required)")
    validate.add_argument("--quick", action="store_true",
                          help="read only image headers (and the ends of JPEG/PNG files) instead of decoding "
                          "every image")
    validate.add_argument("--errors-only", action="store_true", help="do not print the warnings")

    for command, subparser in sub.choices.items():
        subparser.set_defaults(command_parser=subparser)
    return parser


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _require_file(parser: argparse.ArgumentParser, path: Optional[str], option: str) -> None:
    if path is not None and not os.path.isfile(path):
        parser.error(f"{option}: file not found: {path!r}")


def _require_dir(parser: argparse.ArgumentParser, path: Optional[str], option: str) -> None:
    if path is not None and not os.path.isdir(path):
        parser.error(f"{option}: directory not found: {path!r}")


def load_model(path: str):
    """``keras.models.load_model`` of a saved :class:`~keras_maskrcnn.MaskRCNN` (no optimizer)."""
    import keras

    import keras_maskrcnn  # noqa: F401  (registers the custom objects)
    import keras_maskrcnn.train  # noqa: F401  (registers the learning rate schedule)

    try:
        model = keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as e:
        raise CommandError(f"cannot load the model {path!r}: {e}") from e
    if not hasattr(model, "predict_images"):
        raise CommandError(f"{path!r} is a {type(model).__name__}, not a keras_maskrcnn MaskRCNN model.")
    return model


def _print_metrics(metrics: Dict[str, Dict[str, float]]) -> None:
    from keras_maskrcnn.evaluation import METRIC_NAMES

    print(f"{'metric':<8}{'bbox':>9}{'segm':>9}")
    for name in METRIC_NAMES:
        print(f"{name:<8}{metrics['bbox'][name]:>9.4f}{metrics['segm'][name]:>9.4f}")


def _expand_images(paths: Sequence[str]) -> List[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, name))
            )
            if not found:
                raise CommandError(f"no image files in the folder {path!r}")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise CommandError(f"image not found: {path!r}")
    return files


def _unique_png_names(files: Sequence[str]) -> List[str]:
    names, used = [], set()
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        name, k = f"{stem}.png", 1
        while name in used:
            name, k = f"{stem}_{k}.png", k + 1
        used.add(name)
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.synthetic is None and (args.annotations is None or args.images is None):
        parser.error("give --annotations FILE and --images DIR, or --synthetic N")
    if args.synthetic is not None and (args.annotations is not None or args.images is not None):
        parser.error("--synthetic cannot be combined with --annotations/--images")
    if (args.val_annotations is None) != (args.val_images is None):
        parser.error("--val-annotations and --val-images go together")
    _require_file(parser, args.annotations, "--annotations")
    _require_dir(parser, args.images, "--images")
    _require_file(parser, args.val_annotations, "--val-annotations")
    _require_dir(parser, args.val_images, "--val-images")
    _require_file(parser, args.backbone_weights, "--backbone-weights")

    from keras_maskrcnn.distribute import get_strategy, is_chief

    # First: MultiWorkerMirroredStrategy must exist before TensorFlow runs anything.
    strategy = get_strategy(args.strategy)
    replicas = strategy.num_replicas_in_sync

    import keras

    from keras_maskrcnn import MaskRCNN
    from keras_maskrcnn.data import CocoSource, SyntheticShapes, coco_dataset
    from keras_maskrcnn.plan import EpochTimeEstimate, coco_image_sizes, plan_training
    from keras_maskrcnn.train import train

    # Fail fast on bad data, with every problem listed (not one crash hours in).
    for annotations, images in ((args.annotations, args.images), (args.val_annotations, args.val_images)):
        if annotations is not None:
            _check_dataset(annotations, images)

    keras.utils.set_random_seed(args.seed)
    repeat = args.steps_per_epoch is not None
    val_annotations, val_images = args.val_annotations, args.val_images
    if args.synthetic is not None:
        size = args.synthetic_size
        generator = SyntheticShapes((size, size), seed=args.seed)
        source_len, image_sizes = args.synthetic, [(size, size)]
        num_classes = generator.num_classes
        class_to_category, class_names = generator.class_to_category, generator.class_names
        if val_annotations is None and args.synthetic_val > 0:
            val_images = os.path.join(args.output, "synthetic_val")
            held_out = SyntheticShapes((size, size), seed=args.seed + 1)  # other seed: other images
            val_annotations = held_out.write_coco(val_images, args.synthetic_val)
    else:
        source = CocoSource(args.annotations, args.images)
        if len(source) == 0:
            raise CommandError(f"{args.annotations!r} lists no images")
        if source.num_classes == 0:
            raise CommandError(f"{args.annotations!r} has no categories")
        source_len, image_sizes = len(source), coco_image_sizes(source)
        num_classes = source.num_classes
        class_to_category, class_names = source.class_to_category, source.class_names

    plan = plan_training(
        image_sizes, source_len, args.epochs, pretrained=bool(args.backbone_weights), backbone=args.backbone,
        min_size=args.min_size, max_size=args.max_size, batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch, precision=args.mixed_precision, optimizer=args.optimizer,
        learning_rate=args.lr, schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, clipnorm=args.clipnorm, momentum=args.momentum,
        decay_epochs=args.lr_decay_epochs, trainable_backbone_layers=args.trainable_backbone_layers,
        backbone_norm=None if args.backbone_norm == "auto" else args.backbone_norm,
    )
    if plan.batch_size % replicas:
        raise CommandError(
            f"--batch-size {plan.batch_size} is not a multiple of the {replicas} replicas of --strategy {args.strategy}"
        )
    if is_chief(strategy):
        print(plan.describe())
        if replicas > 1:
            print(f"  replicas   {replicas} ({args.strategy}), {plan.batch_size // replicas} image(s) per replica")
    keras.mixed_precision.set_global_policy(plan.precision)
    with strategy.scope():  # the model's and the optimizer's variables belong to the strategy
        model = MaskRCNN(num_classes=num_classes, **plan.model_config)
        if args.backbone_weights:
            from keras_maskrcnn.convert import load_torchvision_resnet, read_state_dict

            state_dict = read_state_dict(args.backbone_weights)
            prefix = "backbone.body." if any(k.startswith("backbone.body.") for k in state_dict) else ""
            load_torchvision_resnet(model.backbone, state_dict, prefix=prefix)

    data_kwargs = dict(
        min_size=plan.min_size,
        max_size=plan.max_size,
        size_divisible=model.size_divisible,
        mask_size=model.gt_mask_size,
        repeat=repeat,
        seed=args.seed,
        drop_remainder=source_len >= plan.batch_size,
    )
    if args.synthetic is not None:
        dataset = generator.dataset(args.synthetic, plan.batch_size, training=True, **data_kwargs)
    else:
        dataset = coco_dataset(source, None, plan.batch_size, training=True, **data_kwargs)

    with strategy.scope():
        optimizer = plan.build_optimizer()
    train(
        model,
        dataset,
        args.output,
        epochs=args.epochs,
        optimizer=optimizer,
        steps_per_epoch=args.steps_per_epoch,
        callbacks=[EpochTimeEstimate(plan.steps_per_epoch, args.epochs)] if is_chief(strategy) else (),
        val_annotations=val_annotations,
        val_images=val_images,
        eval_every=args.eval_every,
        eval_max_images=args.eval_max_images,
        resume=args.resume,
        keep_checkpoints=args.keep_checkpoints or None,
        class_to_category=class_to_category,
        class_names=class_names,
        verbose=args.verbose,
        backup_every=args.backup_every or None,
        validate=False,  # done above
    )
    if is_chief(strategy):
        print(f"Saved {os.path.join(args.output, 'model.keras')}")
    return 0


def _check_dataset(annotations: str, images: str) -> None:
    """Raise :class:`CommandError` listing the errors of a COCO dataset (quick image checks)."""
    from keras_maskrcnn.data.validate import errors_of, validate_coco

    problems = validate_coco(annotations, images, check_images="header")
    errors = errors_of(problems)
    if errors:
        listing = "\n  ".join(str(p) for p in errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        raise CommandError(
            f"{len(errors)} error(s) in the dataset {annotations!r} (see `{PROG} validate` for the full report):"
            f"\n  {listing}{more}"
        )
    warnings = len(problems) - len(errors)
    if warnings:
        print(f"{annotations}: {warnings} warning(s); `{PROG} validate --annotations {annotations} --images {images}` lists them")


def run_validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from keras_maskrcnn.data.validate import errors_of, validate_coco

    _require_file(parser, args.annotations, "--annotations")
    _require_dir(parser, args.images, "--images")
    problems = validate_coco(args.annotations, args.images, check_images="header" if args.quick else "decode")
    errors = errors_of(problems)
    for problem in errors if args.errors_only else problems:
        print(problem)
    if problems:
        print(f"{len(errors)} error(s), {len(problems) - len(errors)} warning(s) in {args.annotations}.")
    else:
        print(f"No problems found in {args.annotations}.")
    return 1 if errors else 0


def run_evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _require_file(parser, args.annotations, "--annotations")
    _require_dir(parser, args.images, "--images")
    _require_file(parser, args.model, "--model")

    from keras_maskrcnn.data import CocoSource
    from keras_maskrcnn.evaluation import evaluate_coco

    source = CocoSource(args.annotations, args.images)
    model = load_model(args.model)
    if model.num_classes != source.num_classes:
        raise CommandError(
            f"the model has {model.num_classes} classes but {args.annotations!r} has {source.num_classes} categories"
        )
    metrics = evaluate_coco(
        model,
        source.coco,
        args.images,
        batch_size=args.batch_size,
        max_images=args.max_images,
        results_file=args.results,
    )
    _print_metrics(metrics)
    if args.metrics:
        parent = os.path.dirname(args.metrics)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(args.metrics, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=1)
    if args.results:
        print(f"Wrote {args.results}")
    return 0


def run_predict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _require_file(parser, args.model, "--model")
    _require_file(parser, args.classes, "--classes")

    import numpy as np

    from keras_maskrcnn.data import load_image
    from keras_maskrcnn.evaluation import predictions_to_coco_results, write_coco_results
    from keras_maskrcnn.train import load_label_map
    from keras_maskrcnn.visualize import draw_detections, save_png

    files = _expand_images(args.images)
    classes_file = args.classes
    if classes_file is None:
        default = os.path.join(os.path.dirname(os.path.abspath(args.model)), "classes.json")
        classes_file = default if os.path.isfile(default) else None
    model = load_model(args.model)
    if classes_file is not None:
        class_to_category, class_names = load_label_map(classes_file)
        if len(class_to_category) != model.num_classes:
            raise CommandError(
                f"{classes_file!r} has {len(class_to_category)} classes but the model has {model.num_classes}"
            )
    else:
        class_to_category = {k: k for k in range(1, model.num_classes + 1)}
        class_names = None

    os.makedirs(args.output, exist_ok=True)
    names = _unique_png_names(files)
    results = []
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        images = [load_image(path) for path in chunk]
        predictions = model.predict_images(images, batch_size=args.batch_size)
        for offset, (path, image, prediction) in enumerate(zip(chunk, images, predictions)):
            keep = np.asarray(prediction["scores"]) >= args.score_threshold
            kept = {k: np.asarray(prediction[k])[keep] for k in ("boxes", "scores", "classes", "masks")}
            drawn = draw_detections(image, **kept, class_names=class_names, score_threshold=args.score_threshold)
            save_png(drawn, os.path.join(args.output, names[start + offset]))
            image_id = start + offset + 1
            for entry in predictions_to_coco_results(image_id, kept, class_to_category):
                entry["file_name"] = path
                results.append(entry)
            print(f"{path}: {int(keep.sum())} detections -> {os.path.join(args.output, names[start + offset])}")
    write_coco_results(results, os.path.join(args.output, "results.json"))
    print(f"Wrote {os.path.join(args.output, 'results.json')}")
    return 0


def run_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from keras_maskrcnn.export import export_saved_model

    _require_file(parser, args.model, "--model")
    model = load_model(args.model)
    try:
        path = export_saved_model(
            model, args.output, version=args.version, full_masks=args.full_masks, overwrite=args.overwrite
        )
    except (FileExistsError, RuntimeError) as e:
        raise CommandError(str(e)) from e
    print(f"SavedModel written to {path} (signatures: serving_default, serving_bytes)")
    return 0


def run_convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from keras_maskrcnn.convert import convert_checkpoint

    _require_file(parser, args.checkpoint, "--checkpoint")
    try:
        model = convert_checkpoint(args.checkpoint, args.output, num_classes=args.num_classes)
    except ImportError as e:
        raise CommandError(str(e)) from e
    print(f"Converted {args.checkpoint} to {args.output} ({model.num_classes} classes)")
    return 0


COMMANDS = {
    "train": run_train,
    "evaluate": run_evaluate,
    "predict": run_predict,
    "export": run_export,
    "convert": run_convert,
    "validate": run_validate,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``keras-maskrcnn``; returns 0 on success.

    Bad arguments (including missing files and folders) exit with status 2 and a usage message,
    as argparse does; errors found while running exit with status 1 and a one-line message.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    subparser = args.command_parser  # its prog and usage go into the error messages
    try:
        return COMMANDS[args.command](args, subparser)
    except (CommandError, FileNotFoundError, NotADirectoryError, ValueError, FloatingPointError) as e:
        subparser.exit(1, f"{subparser.prog}: error: {e}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
