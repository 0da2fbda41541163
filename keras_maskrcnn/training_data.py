"""The images a training run learns from: a COCO dataset or the built-in synthetic shapes.

:class:`TrainingData` says what :func:`~keras_maskrcnn.plan.plan_training` needs to know about
them (how many, their sizes, the classes) and builds their pipeline
(:func:`~keras_maskrcnn.data.coco_dataset` or :meth:`~keras_maskrcnn.data.SyntheticShapes.dataset`)
once the plan has chosen the image and batch sizes. ``keras-maskrcnn train`` uses it:

>>> from keras_maskrcnn.plan import plan_training
>>> data = coco_training_data("train.json", "images/")
>>> plan = plan_training(data.image_sizes, data.num_images, epochs=12, pretrained=False)
>>> model = plan.build_model(data.num_classes)
>>> dataset = plan.build_dataset(data, model)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Tuple, Union

import tensorflow as tf

from keras_maskrcnn.data import CocoSource, SyntheticShapes, coco_dataset
from keras_maskrcnn.plan import coco_image_sizes

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass
class TrainingData:
    """Training images and their label map.

    Attributes:
        source: a :class:`~keras_maskrcnn.data.CocoSource` or a
            :class:`~keras_maskrcnn.data.SyntheticShapes` generator.
        num_images: images in one pass over the data.
        image_sizes: ``(height, width)`` of the images (one entry when they all have one size).
        num_classes: object classes (background excluded).
        class_to_category, class_names: the label map, keyed by the contiguous class id.
    """

    source: Any
    num_images: int
    image_sizes: List[Tuple[int, int]]
    num_classes: int
    class_to_category: Dict[int, int]
    class_names: Dict[int, str]

    def dataset(self, batch_size: int, **kwargs: Any) -> tf.data.Dataset:
        """The training pipeline (shuffled, flipped); ``kwargs`` as :func:`~keras_maskrcnn.data.coco_dataset`."""
        if isinstance(self.source, SyntheticShapes):
            return self.source.dataset(self.num_images, batch_size, training=True, **kwargs)
        return coco_dataset(self.source, None, batch_size, training=True, **kwargs)


def coco_training_data(annotation_file: PathLike, image_dir: PathLike) -> TrainingData:
    """The images of a COCO instances file; ``ValueError`` when it lists no images or no categories."""
    source = CocoSource(annotation_file, image_dir)
    if len(source) == 0:
        raise ValueError(f"{os.fspath(annotation_file)!r} lists no images")
    if source.num_classes == 0:
        raise ValueError(f"{os.fspath(annotation_file)!r} has no categories")
    return TrainingData(
        source=source,
        num_images=len(source),
        image_sizes=coco_image_sizes(source),
        num_classes=source.num_classes,
        class_to_category=source.class_to_category,
        class_names=source.class_names,
    )


def synthetic_training_data(num_images: int, image_size: int, seed: int = 0) -> TrainingData:
    """``num_images`` synthetic shapes images of ``image_size`` x ``image_size`` pixels."""
    generator = SyntheticShapes((image_size, image_size), seed=seed)
    return TrainingData(
        source=generator,
        num_images=num_images,
        image_sizes=[(image_size, image_size)],
        num_classes=generator.num_classes,
        class_to_category=generator.class_to_category,
        class_names=generator.class_names,
    )


def synthetic_validation_set(directory: PathLike, num_images: int, image_size: int, seed: int = 0) -> Tuple[str, str]:
    """Write ``num_images`` held-out synthetic images as a COCO dataset in ``directory``, with
    the seed after ``seed`` (other images than :func:`synthetic_training_data` with ``seed``).

    Returns:
        ``(annotation_file, image_dir)``.
    """
    directory = os.fspath(directory)
    held_out = SyntheticShapes((image_size, image_size), seed=seed + 1)  # other seed: other images
    return held_out.write_coco(directory, num_images), directory


__all__ = ["TrainingData", "coco_training_data", "synthetic_training_data", "synthetic_validation_set"]
