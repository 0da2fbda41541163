"""The ``tf.data`` pipeline shared by the COCO and the synthetic datasets.

:func:`build_dataset` turns any per-index example loader into batches of the element structure
documented in :mod:`keras_maskrcnn.data.coco`: it loads in parallel, augments training images
(:mod:`keras_maskrcnn.data.augment`: flip, multi-scale or large-scale jitter, images, boxes and
masks together), resizes evaluation images and pads with :mod:`keras_maskrcnn.transform` (the
same rules as the model, ``predict_images`` and export), pads the instance axis and batches.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from keras_maskrcnn import transform
from keras_maskrcnn.data import augment
from keras_maskrcnn.data.copy_paste import copy_paste as paste_objects
from keras_maskrcnn.data.masks import MASK_SIZE

logger = logging.getLogger(__name__)

# What a loader returns for one dataset index: (image uint8 [H, W, 3], boxes float32 [n, 4]
# (x1, y1, x2, y2) in original pixels, classes int32 [n], coverage masks uint8 [n, N, N], image id).
Example = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


def _truncating(load: Callable[[int], Example], max_instances: Optional[int]) -> Callable[[int], Example]:
    """Wrap ``load`` to keep at most ``max_instances`` instances, warning once when it drops."""
    warned = []

    def wrapped(index: int) -> Example:
        image, boxes, classes, masks, image_id = load(index)
        if max_instances is not None and len(boxes) > max_instances:
            if not warned:
                warned.append(True)
                logger.warning(
                    "Image %s has %d instances; keeping the first max_instances=%d (warned once).",
                    image_id, len(boxes), max_instances,
                )
            boxes, classes, masks = boxes[:max_instances], classes[:max_instances], masks[:max_instances]
        return image, boxes, classes, masks, image_id

    return wrapped


def _pad_instances(tensor: tf.Tensor, count: int) -> tf.Tensor:
    """Zero-pad the leading (instance) axis of ``tensor`` to exactly ``count`` rows."""
    rank = tensor.shape.rank
    paddings = [[0, count - tf.shape(tensor)[0]]] + [[0, 0]] * (rank - 1)
    padded = tf.pad(tensor, paddings)
    return tf.ensure_shape(padded, [count] + tensor.shape[1:].as_list())


def _numpy_loader(load: Callable[[int], Example], mask_size: int) -> Callable:
    """``load`` with its outputs cast to the dtypes and shapes ``tf.numpy_function`` declares."""

    def load_numpy(index):
        image, boxes, classes, masks, image_id = load(int(index))
        return (
            np.asarray(image, np.uint8),
            np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(classes, np.int32).reshape(-1),
            np.asarray(masks, np.uint8).reshape(-1, mask_size, mask_size),
            np.int64(image_id),
        )

    return load_numpy


def _load_tensors(load_numpy: Callable, index: tf.Tensor, mask_size: int) -> Tuple[tf.Tensor, ...]:
    """Run the loader in the graph: image, boxes, classes, masks and image id with static ranks."""
    image, boxes, classes, masks, image_id = tf.numpy_function(
        load_numpy, [index], [tf.uint8, tf.float32, tf.int32, tf.uint8, tf.int64], stateful=False
    )
    return (
        tf.ensure_shape(image, [None, None, 3]),
        tf.ensure_shape(boxes, [None, 4]),
        tf.ensure_shape(classes, [None]),
        tf.ensure_shape(masks, [None, mask_size, mask_size]),
        tf.ensure_shape(image_id, []),
    )


def _two_elements(first, second) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensors(first).concatenate(tf.data.Dataset.from_tensors(second))


def build_dataset(
    num_examples: int,
    load_example: Callable[[int], Example],
    batch_size: int,
    training: bool,
    min_size: Optional[int] = transform.MIN_SIZE,
    max_size: Optional[int] = transform.MAX_SIZE,
    size_divisible: int = transform.SIZE_DIVISIBLE,
    mask_size: int = MASK_SIZE,
    max_instances: Optional[int] = 100,
    flip_probability: float = 0.5,
    shuffle: Optional[bool] = None,
    repeat: bool = False,
    seed: Optional[int] = None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    drop_remainder: bool = False,
    augmentation: Union[str, augment.Augmentation, None] = "flip",
    augmentation_options: Optional[Mapping[str, Any]] = None,
    copy_paste: bool = False,
    mirror_copies: bool = False,
) -> tf.data.Dataset:
    """The ``tf.data`` pipeline behind :func:`~keras_maskrcnn.data.coco.coco_dataset` for any
    per-index example loader (arguments as there).

    ``load_example(index)`` returns :data:`Example` ``(image uint8 [H, W, 3], boxes float32
    [n, 4] original pixels, classes int32 [n], masks uint8 [n, N, N], image_id)``; it runs in
    ``tf.numpy_function`` inside a parallel ``map``. Training images go through ``augmentation``
    (:func:`keras_maskrcnn.data.augment.get`: ``"flip"``, ``"multiscale"``, ``"lsj"``, ``"none"``
    or an :class:`~keras_maskrcnn.data.augment.Augmentation`; ``augmentation_options`` go to the
    preset), evaluation images only through the resize rule. ``copy_paste`` (training only) then
    pastes objects between the images of each batch (:mod:`keras_maskrcnn.data.copy_paste`).
    ``mirror_copies`` (training only) puts each augmented image in its batch twice, as is and
    horizontally mirrored: batches of ``2 * batch_size`` views of ``batch_size`` images (batch
    augmentation, Hoffer et al. 2019), each image followed by its mirror. Random draws are stateless ops
    seeded from ``Dataset.random(seed)``, so the output is reproducible given ``seed``.
    """
    if shuffle is None:
        shuffle = training
    load_numpy = _numpy_loader(_truncating(load_example, max_instances), mask_size)
    augmentation = augment.get(
        augmentation, min_size, max_size, flip_probability, **dict(augmentation_options or {})
    )

    mirror_copies = bool(mirror_copies and training)

    def element(image, boxes, classes, masks, inputs):
        inputs = dict(inputs, images=transform.pad_to_multiple(image, size_divisible), image_sizes=tf.shape(image)[:2])
        if max_instances is not None:
            boxes, classes, masks = (_pad_instances(t, max_instances) for t in (boxes, classes, masks))
        return inputs, {"boxes": boxes, "classes": classes, "masks": masks}

    def prepare(index, random_seed):
        image, boxes, classes, masks, image_id = _load_tensors(load_numpy, index, mask_size)
        if not training:
            original_size = tf.shape(image)[:2]
            image, scale = transform.resize_image(image, min_size, max_size)
            boxes = transform.boxes_to_resized(boxes, scale)
            inputs = {"image_ids": image_id, "original_sizes": original_size, "scales": scale}
            return element(image, boxes, classes, masks, inputs)
        image, boxes, classes, masks = augmentation(image, boxes, classes, masks, random_seed)
        if not mirror_copies:
            return element(image, boxes, classes, masks, {})
        # Mirrored before padding, so the mirror of the valid region stays at the top left.
        mirror_image, mirror_boxes, mirror_masks = augment.horizontal_flip(image, boxes, masks)
        return element(image, boxes, classes, masks, {}), element(mirror_image, mirror_boxes, classes, mirror_masks, {})

    dataset = tf.data.Dataset.range(num_examples)
    if shuffle:
        dataset = dataset.shuffle(max(num_examples, 1), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    dataset = tf.data.Dataset.zip((dataset, randoms))
    dataset = dataset.map(prepare, num_parallel_calls=num_parallel_calls)
    if mirror_copies:
        # Not stacked and unbatched: unbatch of an image without instances ([2, 0, ...]) crashes
        # TensorFlow 2.21 (segmentation fault) on the next padded_batch.
        dataset = dataset.flat_map(_two_elements)
    dataset = dataset.padded_batch(batch_size * (2 if mirror_copies else 1), drop_remainder=drop_remainder)
    if copy_paste and training:
        seeds = tf.data.Dataset.random(seed=None if seed is None else seed + 1, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip((dataset, seeds.batch(2))).map(
            lambda batch, pair: paste_objects(*batch, pair), num_parallel_calls=num_parallel_calls
        )
    return dataset.prefetch(tf.data.AUTOTUNE)
