"""Input pipelines: COCO files and a built-in synthetic dataset, with one element structure.

See :mod:`keras_maskrcnn.data.coco` for the ``(inputs, targets)`` structure (images, image
sizes, boxes, contiguous classes and box-relative coverage masks).
"""
from keras_maskrcnn.data.categories import category_to_class, class_to_category
from keras_maskrcnn.data.coco import (
    MASK_SIZE,
    CocoSource,
    build_dataset,
    coco_dataset,
    load_image,
    mini_mask,
    resize_image,
    resized_size,
)
from keras_maskrcnn.data.synthetic import SHAPE_NAMES, SyntheticImage, SyntheticShapes, synthetic_dataset

__all__ = [
    "CocoSource",
    "MASK_SIZE",
    "SHAPE_NAMES",
    "SyntheticImage",
    "SyntheticShapes",
    "build_dataset",
    "category_to_class",
    "class_to_category",
    "coco_dataset",
    "load_image",
    "mini_mask",
    "resize_image",
    "resized_size",
    "synthetic_dataset",
]
