"""``keras-maskrcnn evaluate``: COCO box and mask AP/AR of a saved model
(:func:`keras_maskrcnn.evaluation.evaluate_coco`)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict

from keras_maskrcnn.cli.common import CommandError, formatter, load_model, positive_int, require_dir, require_file

NAME = "evaluate"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand and its options."""
    parser = subparsers.add_parser(
        NAME,
        help="COCO box and mask AP/AR of a model on a COCO dataset",
        formatter_class=formatter,
        description="Evaluate a saved model with the official COCO metric (pycocotools) and print the 12 "
        "bbox and 12 segm numbers.",
    )
    parser.add_argument("--annotations", metavar="FILE", required=True, help="COCO instances JSON (required)")
    parser.add_argument("--images", metavar="DIR", required=True,
                        help="folder the images' file_name is relative to (required)")
    parser.add_argument("--model", metavar="FILE", required=True, help="saved model (.keras) (required)")
    parser.add_argument("--max-images", metavar="N", type=positive_int, help="evaluate the first N images only")
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=2, help="images per batch")
    parser.add_argument("--results", metavar="FILE", help="write the detections as a COCO results JSON")
    parser.add_argument("--metrics", metavar="FILE", help='write the numbers as JSON {"bbox": {...}, "segm": {...}}')
    return parser


def _print_metrics(metrics: Dict[str, Dict[str, float]]) -> None:
    from keras_maskrcnn.evaluation import METRIC_NAMES

    print(f"{'metric':<8}{'bbox':>9}{'segm':>9}")
    for name in METRIC_NAMES:
        print(f"{name:<8}{metrics['bbox'][name]:>9.4f}{metrics['segm'][name]:>9.4f}")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``keras-maskrcnn evaluate``; returns the exit status."""
    require_file(parser, args.annotations, "--annotations")
    require_dir(parser, args.images, "--images")
    require_file(parser, args.model, "--model")

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
