"""What the ``keras-maskrcnn`` subcommands share: the user-facing error, argument types, the help
format, path checks and model loading."""
from __future__ import annotations

import argparse
import os
from typing import Optional

PROG = "keras-maskrcnn"


class CommandError(Exception):
    """A user-facing error: printed as ``keras-maskrcnn <command>: error: ...`` (exit status 1)."""


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
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


def formatter(prog):
    """The ``formatter_class`` of every subcommand."""
    return _HelpFormatter(prog, max_help_position=34)


# --------------------------------------------------------------------------------------------
# Checks and loading
# --------------------------------------------------------------------------------------------


def require_file(parser: argparse.ArgumentParser, path: Optional[str], option: str) -> None:
    """A usage error (exit status 2) when ``path`` is given but is not a file."""
    if path is not None and not os.path.isfile(path):
        parser.error(f"{option}: file not found: {path!r}")


def require_dir(parser: argparse.ArgumentParser, path: Optional[str], option: str) -> None:
    """A usage error (exit status 2) when ``path`` is given but is not a folder."""
    if path is not None and not os.path.isdir(path):
        parser.error(f"{option}: directory not found: {path!r}")


def load_model(path: str):
    """``keras.models.load_model`` of a saved :class:`~keras_maskrcnn.MaskRCNN` (no optimizer)."""
    import keras

    import keras_maskrcnn  # noqa: F401  (registers the custom objects and the learning rate schedule)

    try:
        model = keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as e:
        raise CommandError(f"cannot load the model {path!r}: {e}") from e
    if not hasattr(model, "predict_images"):
        raise CommandError(f"{path!r} is a {type(model).__name__}, not a keras_maskrcnn MaskRCNN model.")
    return model
