"""Draw what the training pipeline feeds the model under each augmentation, and time it.

    python examples/show_augmentations.py [--data ../shared/datasets/fruits_nuts] [--output augmentations]

For each augmentation preset of :mod:`keras_maskrcnn.data.augment` (``none``, ``flip``,
``multiscale``, ``lsj``, and ``lsj`` with :mod:`keras_maskrcnn.data.copy_paste`) it takes a few training samples from
:func:`keras_maskrcnn.data.coco_dataset`, draws the boxes and the masks (the box-relative coverage
masks pasted back into the image, where at least half covered) and writes
``OUTPUT/<augmentation>.png``, one row of samples. Without ``--data`` (or where the folder is absent)
it writes a small synthetic COCO set first. ``--time N`` also times N batches of the pipeline
alone per preset (images/s; the first batch excluded).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from keras_maskrcnn import transform
from keras_maskrcnn.data import SyntheticShapes, coco_dataset
from keras_maskrcnn.recipes import augmentation_options
from keras_maskrcnn.visualize import draw_detections, save_png

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "datasets", "fruits_nuts")
PRESETS = ("none", "flip", "multiscale", "lsj", "lsj+copy_paste")


def _dataset(annotations, images, preset, batch, min_size, max_size, seed):
    """``preset``: an augmentation name, with ``+copy_paste`` for copy-paste within the batch."""
    name, _, extra = preset.partition("+")
    return coco_dataset(
        annotations, images, batch, training=True, min_size=min_size, max_size=max_size, seed=seed,
        augmentation=name, augmentation_options=augmentation_options(name, min_size), repeat=True,
        copy_paste=extra == "copy_paste",
    )


def draw_batch(inputs, targets) -> np.ndarray:
    """One row: every image of the batch cropped to its valid size, boxes and masks drawn."""
    images = inputs["images"].numpy()
    sizes = inputs["image_sizes"].numpy()
    panels = []
    for i in range(images.shape[0]):
        valid = targets["classes"][i].numpy() > 0
        boxes = targets["boxes"][i].numpy()[valid]
        coverage = tf.cast(targets["masks"][i][valid], tf.float32) / 255.0
        height, width = images.shape[1], images.shape[2]
        masks = transform.paste_masks_in_image(coverage, tf.constant(boxes, tf.float32), height, width, threshold=0.5)
        drawn = draw_detections(images[i], boxes, targets["classes"][i].numpy()[valid],
                                np.ones(len(boxes), np.float32), masks.numpy(), score_threshold=0.0)
        panels.append(drawn[: sizes[i][0], : sizes[i][1]])
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, [(0, height - p.shape[0]), (0, 4), (0, 0)], constant_values=255) for p in panels]
    return np.concatenate(padded, axis=1)


def images_per_second(dataset, batches: int, batch: int) -> float:
    iterator = iter(dataset)
    next(iterator)  # the first batch starts the pipeline's threads
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder with instances.json and the images it names")
    parser.add_argument("--output", default="augmentations")
    parser.add_argument("--batch", type=int, default=4, help="samples per picture")
    parser.add_argument("--min-size", type=int, default=384)
    parser.add_argument("--max-size", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time", type=int, default=0, metavar="N", help="also time N batches per preset")
    args = parser.parse_args(argv)

    annotations = os.path.join(args.data, "instances.json")
    images = args.data
    if not os.path.exists(annotations):
        folder = tempfile.mkdtemp(prefix="augmentations_")
        annotations = SyntheticShapes((256, 320), seed=args.seed).write_coco(folder, 8)
        images = folder
        print(f"{args.data} has no instances.json: using 8 synthetic images in {folder}")
    os.makedirs(args.output, exist_ok=True)
    for name in PRESETS:
        dataset = _dataset(annotations, images, name, args.batch, args.min_size, args.max_size, args.seed)
        inputs, targets = next(iter(dataset))
        path = save_png(draw_batch(inputs, targets), os.path.join(args.output, f"{name}.png"))
        line = f"{name:>10}: {path}, batch {tuple(inputs['images'].shape)}"
        if args.time:
            line += f", {images_per_second(dataset, args.time, args.batch):.1f} images/s (pipeline alone)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
