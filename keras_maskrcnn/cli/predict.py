"""``keras-maskrcnn predict``: run a saved model on image files, draw the detections and write
them as COCO results (:mod:`keras_maskrcnn.visualize`, :mod:`keras_maskrcnn.evaluation`)."""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Sequence, Tuple

from keras_maskrcnn.cli.common import CommandError, formatter, load_model, positive_int, require_file

NAME = "predict"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``predict`` subcommand and its options."""
    parser = subparsers.add_parser(
        NAME,
        help="detect objects in images and draw them",
        formatter_class=formatter,
        description="Run a saved model on images; writes OUTPUT/<name>.png with the detections drawn and "
        "OUTPUT/results.json (COCO results format plus file_name).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="FILE", help="saved model (.keras) (this or --preset is required)")
    source.add_argument("--preset", metavar="NAME",
                        help="a preset with published weights (`keras-maskrcnn presets`), e.g. "
                        "maskrcnn_resnet50_fpn_v2_coco: downloaded on first use, drawn with COCO class names")
    parser.add_argument("--output", metavar="DIR", required=True, help="output folder (required)")
    parser.add_argument("--score-threshold", metavar="S", type=float, default=0.5,
                        help="keep (draw and write) detections scoring at least S")
    parser.add_argument("--classes", metavar="FILE",
                        help="label map (classes.json from training, or a COCO annotation file) for names "
                        "and category ids (default: classes.json next to --model, if any)")
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=1, help="images per batch")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files or folders of images")
    return parser


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


def _label_map(classes_file: Optional[str], num_classes: int) -> Tuple[Dict[int, int], Optional[Dict[int, str]]]:
    """``(class_to_category, class_names)`` from ``classes_file``; the identity without one."""
    from keras_maskrcnn.label_maps import load_label_map

    if classes_file is None:
        return {k: k for k in range(1, num_classes + 1)}, None
    class_to_category, class_names = load_label_map(classes_file)
    if len(class_to_category) != num_classes:
        raise CommandError(f"{classes_file!r} has {len(class_to_category)} classes but the model has {num_classes}")
    return class_to_category, class_names


def _preset_model(name: str):
    """``(model, class_to_category, class_names)`` of a preset: its class ids are the category ids
    of its dataset (COCO's for the COCO presets), its names the preset's; unused slots ("N/A") unnamed."""
    from keras_maskrcnn.model import MaskRCNN
    from keras_maskrcnn.model_zoo import get_preset

    preset = get_preset(name)
    if preset.kind != "maskrcnn":
        raise CommandError(f"Preset {name!r} holds backbone weights only; it cannot detect anything.")
    model = MaskRCNN.from_preset(name)
    names = {i: n for i, n in enumerate(preset.class_names) if i > 0 and n != "N/A"}
    return model, {i: i for i in range(1, model.num_classes + 1)}, names


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``keras-maskrcnn predict``; returns the exit status."""
    require_file(parser, args.model, "--model")
    require_file(parser, args.classes, "--classes")
    if args.preset is not None and args.classes is not None:
        raise CommandError("--classes is for --model; a --preset carries its own class names.")

    import numpy as np

    from keras_maskrcnn.data import load_image
    from keras_maskrcnn.evaluation import predictions_to_coco_results, write_coco_results
    from keras_maskrcnn.visualize import draw_detections, save_png

    files = _expand_images(args.images)
    if args.preset is not None:
        model, class_to_category, class_names = _preset_model(args.preset)
    else:
        classes_file = args.classes
        if classes_file is None:
            default = os.path.join(os.path.dirname(os.path.abspath(args.model)), "classes.json")
            classes_file = default if os.path.isfile(default) else None
        model = load_model(args.model)
        class_to_category, class_names = _label_map(classes_file, model.num_classes)

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
