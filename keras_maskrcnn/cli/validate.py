"""``keras-maskrcnn validate``: the problems of a COCO dataset
(:func:`keras_maskrcnn.data.validate.validate_coco`, printed by
:func:`~keras_maskrcnn.data.validate.format_report`)."""
from __future__ import annotations

import argparse

from keras_maskrcnn.cli.common import formatter, require_dir, require_file

NAME = "validate"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``validate`` subcommand and its options."""
    parser = subparsers.add_parser(
        NAME,
        help="check a COCO dataset (annotations and images) before training",
        formatter_class=formatter,
        description="List the problems of a COCO instances dataset, each with its severity, file and annotation "
        "id: errors (training would fail or learn from wrong data) and warnings (handled as the COCO tools "
        "do). Exit status 1 when there are errors.",
    )
    parser.add_argument("--annotations", metavar="FILE", required=True, help="COCO instances JSON (required)")
    parser.add_argument("--images", metavar="DIR", required=True,
                        help="folder the images' file_name is relative to (required)")
    parser.add_argument("--quick", action="store_true",
                        help="read only image headers (and the ends of JPEG/PNG files) instead of decoding "
                        "every image")
    parser.add_argument("--errors-only", action="store_true", help="do not print the warnings")
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``keras-maskrcnn validate``; returns 1 when the dataset has errors."""
    from keras_maskrcnn.data.validate import errors_of, format_report, validate_coco

    require_file(parser, args.annotations, "--annotations")
    require_dir(parser, args.images, "--images")
    problems = validate_coco(args.annotations, args.images, check_images="header" if args.quick else "decode")
    print(format_report(problems, args.annotations, errors_only=args.errors_only))
    return 1 if errors_of(problems) else 0
