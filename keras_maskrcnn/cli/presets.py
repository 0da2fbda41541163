"""``keras-maskrcnn presets``: the published weights :meth:`MaskRCNN.from_preset` can load
(:mod:`keras_maskrcnn.model_zoo`), with their COCO AP as published."""
from __future__ import annotations

import argparse

from keras_maskrcnn.cli.common import formatter

NAME = "presets"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``presets`` subcommand."""
    return subparsers.add_parser(
        NAME, help="list the presets with published weights and their COCO box / mask AP", formatter_class=formatter
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``keras-maskrcnn presets``; returns the exit status."""
    from keras_maskrcnn.model_zoo import cache_dir, list_presets

    rows = list_presets()
    width = max(len(row["name"]) for row in rows)
    print(f"{'name':<{width}}  {'box AP':>6}  {'mask AP':>7}  description")
    for row in rows:
        box = "-" if row["box_ap"] is None else f"{row['box_ap']:.1f}"
        mask = "-" if row["mask_ap"] is None else f"{row['mask_ap']:.1f}"
        print(f"{row['name']:<{width}}  {box:>6}  {mask:>7}  {row['description']}")
    print(f"\nWeights are downloaded on first use into {cache_dir()} and verified by their SHA-256 prefix.")
    return 0
