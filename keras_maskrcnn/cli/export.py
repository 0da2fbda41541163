"""``keras-maskrcnn export``: a SavedModel for TF Serving
(:func:`keras_maskrcnn.export.export_saved_model`)."""
from __future__ import annotations

import argparse

from keras_maskrcnn.cli.common import CommandError, formatter, load_model, non_negative_int, require_file

NAME = "export"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand and its options."""
    parser = subparsers.add_parser(
        NAME,
        help="write a SavedModel for TF Serving (resizing and normalisation inside the graph)",
        formatter_class=formatter,
    )
    parser.add_argument("--model", metavar="FILE", required=True, help="a .keras model")
    parser.add_argument("--output", metavar="DIR", required=True, help="base folder; the SavedModel goes to DIR/<version>")
    parser.add_argument("--version", metavar="N", type=non_negative_int, default=None, help="version folder (default: next free integer)")
    parser.add_argument("--full-masks", action="store_true", help="also return uint8 masks pasted at the original image size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version folder")
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``keras-maskrcnn export``; returns the exit status."""
    from keras_maskrcnn.export import export_saved_model

    require_file(parser, args.model, "--model")
    model = load_model(args.model)
    try:
        path = export_saved_model(
            model, args.output, version=args.version, full_masks=args.full_masks, overwrite=args.overwrite
        )
    except (FileExistsError, RuntimeError) as e:
        raise CommandError(str(e)) from e
    print(f"SavedModel written to {path} (signatures: serving_default, serving_bytes)")
    return 0
