"""``keras-maskrcnn convert``: a torchvision ``maskrcnn_resnet50_fpn`` checkpoint to Keras
(:func:`keras_maskrcnn.convert.convert_checkpoint`)."""
from __future__ import annotations

import argparse

from keras_maskrcnn.cli.common import CommandError, formatter, positive_int, require_file

NAME = "convert"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``convert`` subcommand and its options."""
    parser = subparsers.add_parser(
        NAME,
        help="convert a torchvision maskrcnn_resnet50_fpn checkpoint to a .keras or .weights.h5 file",
        formatter_class=formatter,
    )
    parser.add_argument("--checkpoint", metavar="FILE", required=True, help="torchvision state dict: .pth (read without PyTorch by a restricted unpickler that only rebuilds tensors, the same arrays as torch.load with weights_only=True), .safetensors or .npz")
    parser.add_argument("--output", metavar="FILE", required=True, help="a .keras (whole model) or .weights.h5 file")
    parser.add_argument("--num-classes", metavar="N", type=positive_int, default=None, help="object classes, background excluded (default: the checkpoint's); a different number re-initialises the class-specific predictors for fine-tuning")
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``keras-maskrcnn convert``; returns the exit status."""
    from keras_maskrcnn.convert import convert_checkpoint

    require_file(parser, args.checkpoint, "--checkpoint")
    try:
        model = convert_checkpoint(args.checkpoint, args.output, num_classes=args.num_classes)
    except ImportError as e:
        raise CommandError(str(e)) from e
    print(f"Converted {args.checkpoint} to {args.output} ({model.num_classes} classes)")
    return 0
