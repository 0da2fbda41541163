"""The ``keras-maskrcnn`` command: ``train``, ``evaluate``, ``predict``, ``convert``, ``export``,
``validate`` and ``presets`` subcommands.

A thin layer over the library: each subcommand (a module of this package with ``add_parser``
and ``run``) parses its options and calls the functions the examples call
(:mod:`keras_maskrcnn.train`, :mod:`keras_maskrcnn.plan`, :mod:`keras_maskrcnn.evaluation`,
:mod:`keras_maskrcnn.data.validate`, ...); run ``keras-maskrcnn <command> --help`` for the options.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from keras_maskrcnn.cli import convert, evaluate, export, predict, presets, train, validate
from keras_maskrcnn.cli.common import PROG, CommandError, load_model

# Re-exported: they were defined here.
from keras_maskrcnn.cli.predict import IMAGE_EXTENSIONS  # noqa: F401,E402
from keras_maskrcnn.cli.train import PRECISIONS  # noqa: F401,E402

SUBCOMMANDS = (train, evaluate, predict, convert, export, validate, presets)  # in the order of --help
COMMANDS = {module.NAME: module.run for module in SUBCOMMANDS}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``keras-maskrcnn`` and its subcommands; each subcommand's parser is stored
    in its namespace as ``command_parser`` (its prog and usage go into error messages)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Mask R-CNN for Keras 3: train on COCO-format data, evaluate with the COCO metric, "
        "draw predictions.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        subparser = module.add_parser(sub)
        subparser.set_defaults(command_parser=subparser)
    return parser


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


__all__ = ["COMMANDS", "CommandError", "build_parser", "load_model", "main"]
