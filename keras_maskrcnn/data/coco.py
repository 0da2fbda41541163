"""COCO instance-segmentation input pipeline (``tf.data``) with box-relative coverage masks.

:func:`coco_dataset` reads a COCO instances file (:mod:`.loading`), computes each instance's
coverage mask (:mod:`.masks`) and runs the shared ``tf.data`` pipeline (:mod:`.pipeline`), whose
image geometry (resize, padding) is :mod:`keras_maskrcnn.transform`'s. The public names of those
modules are importable from here too.

Element structure (shared by :func:`coco_dataset` and the synthetic set), ``(inputs, targets)``:

* ``inputs["images"]``: ``[B, H, W, 3]`` float32 RGB in ``[0, 255]``; each image resized, then
  zero-padded at the bottom/right to the batch's common size, a multiple of ``size_divisible``.
* ``inputs["image_sizes"]``: ``[B, 2]`` int32 ``(height, width)`` of the valid (resized) region.
* evaluation only (``training=False``): ``inputs["image_ids"]`` ``[B]`` int64 (COCO image id),
  ``inputs["original_sizes"]`` ``[B, 2]`` int32 ``(height, width)`` of the file and
  ``inputs["scales"]`` ``[B, 2]`` float32 ``(resized / original)`` for y and x.
* ``targets["boxes"]``: ``[B, G, 4]`` float32 ``(x1, y1, x2, y2)`` in resized-image pixels
  (conventions of :mod:`keras_maskrcnn.boxes`); rows past an image's instance count are zero.
* ``targets["classes"]``: ``[B, G]`` int32, contiguous 1-based (:mod:`.categories`); 0 = padding.
* ``targets["masks"]``: ``[B, G, N, N]`` uint8 box-relative coverage masks ("mini masks",
  ``N = mask_size``, default 128): the box is cut into an ``N x N`` grid and cell ``(i, j)``
  holds the fraction of its area the instance's pixels cover, times 255 (:func:`mini_mask`;
  pixel ``(r, c)`` spans ``[c, c + 1] x [r, r + 1]``, as boxes do). Area averages, not point
  samples, so parts thinner than a cell (a 4-pixel bar in a 600-pixel box) keep their weight;
  :func:`keras_maskrcnn.targets.mask_targets` pools them into torchvision's mask targets. Being
  box-relative they are unchanged by resizing; a horizontal flip reverses their columns (and
  maps the box's ``x`` to ``W - x``). Full-image masks are never held per instance: a batch of
  8 images at 1024 x 1024 with 100 instances each holds 8 * 100 * 128 * 128 B = 13.1 MB of masks
  (full-image uint8 masks would take 839 MB).

``G`` is ``max_instances`` (fixed; extra instances are dropped, warned about once) or, with
``max_instances=None``, the largest instance count of the batch (possibly 0: ``[B, 0, 4]``).

How masks are computed from polygons and RLEs: :mod:`.masks`. Which annotations are left out
(``iscrowd``, empty boxes, no segmentation), how images are read and what bad input raises:
:mod:`.loading`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import tensorflow as tf

from keras_maskrcnn import transform
from keras_maskrcnn.data.augment import Augmentation
from keras_maskrcnn.data.loading import CocoSource, PathLike, load_image, read_json_file
from keras_maskrcnn.data.masks import MASK_SIZE, annotation_mini_mask, mini_mask, polygons_to_mini_mask
from keras_maskrcnn.data.pipeline import Example, build_dataset
from keras_maskrcnn.transform import resize_image, resized_size

__all__ = [
    "CocoSource",
    "Example",
    "MASK_SIZE",
    "PathLike",
    "annotation_mini_mask",
    "build_dataset",
    "coco_dataset",
    "load_image",
    "mini_mask",
    "polygons_to_mini_mask",
    "read_json_file",
    "resize_image",
    "resized_size",
]


def coco_dataset(
    annotation_file: Union[PathLike, CocoSource],
    image_dir: Optional[PathLike],
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
    image_ids: Optional[Sequence[int]] = None,
    seed: Optional[int] = None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    drop_remainder: bool = False,
    augmentation: Union[str, Augmentation, None] = "flip",
    augmentation_options: Optional[Mapping[str, Any]] = None,
    copy_paste: bool = False,
    mirror_copies: bool = False,
) -> tf.data.Dataset:
    """A batched, prefetched ``tf.data.Dataset`` of ``(inputs, targets)`` from a COCO file.

    See the module docstring for the element structure. Images are read and their coverage
    masks computed on the fly (PIL and pycocotools in ``tf.numpy_function``; linear in the box's
    pixels: about 0.5 ms for a 40-pixel instance, 5 ms for a 600-pixel one here), so nothing is
    precomputed and memory does not grow with the dataset. One batch of 8 images padded to
    1024 x 1024 with ``max_instances=100`` and ``mask_size=128`` holds 8*1024*1024*3*4 B = 100 MB
    of float32 images and 8*100*128*128 B = 13.1 MB of masks (plus the ``prefetch`` buffer's
    batches); ``mask_size=64`` would take 3.3 MB, 256 52 MB.

    Args:
        annotation_file: COCO instances JSON, or a :class:`CocoSource` (then ``image_dir`` and
            ``image_ids`` are taken from it).
        image_dir: folder the images' ``file_name`` is relative to.
        batch_size: images per batch.
        training: training set (random flips; shuffled by default) or evaluation set (adds
            ``image_ids``, ``original_sizes`` and ``scales`` to the inputs).
        min_size, max_size: resize rule (torchvision's, :func:`keras_maskrcnn.transform.resized_sizes`):
            short side ``min_size`` unless the long side would exceed ``max_size``.
            ``min_size=None`` keeps the original size.
        size_divisible: batch images are zero-padded to a multiple of this.
        mask_size: side ``N`` of the coverage masks (the mask targets' error shrinks about as
            ``1 / N``, see :func:`keras_maskrcnn.targets.mask_targets`; memory grows as ``N^2``).
        max_instances: fixed instance axis ``G`` (extra instances dropped, warned once), or None
            for per-batch padding.
        flip_probability: horizontal flip probability of the augmentation presets (training only).
        shuffle: shuffle images every epoch; default ``training``.
        repeat: repeat indefinitely.
        image_ids: images to use, in this order; default all, sorted by id.
        seed: seed for shuffling and flips (reproducible output when set).
        num_parallel_calls: parallelism of the loading ``map``.
        drop_remainder: drop a last partial batch (static batch dimension).
        augmentation: training augmentation (:mod:`keras_maskrcnn.data.augment`): ``"flip"``
            (default: flip, then the ``min_size``/``max_size`` resize), ``"multiscale"``
            (torchvision's short side 480..800, ``max_size``, flip), ``"lsj"`` (large-scale
            jitter: scale 0.1-2.0 of 1024 x 1024, a 1024 x 1024 crop padded with the mean colour,
            flip; ``min_size`` is not used), ``"none"`` or an ``Augmentation``.
        augmentation_options: arguments of the named preset, e.g. ``{"target_size": 512}`` for
            ``"lsj"`` or ``{"min_sizes": (320, 352)}`` for ``"multiscale"``.
        copy_paste: simple copy-paste between the images of each training batch
            (:mod:`keras_maskrcnn.data.copy_paste`; torchvision's ``--use-copypaste``).
        mirror_copies: each training image enters its batch twice, as is and horizontally
            mirrored (after ``augmentation``): ``2 * batch_size`` views per batch, each image
            followed by its mirror (batch augmentation, Hoffer et al. 2019, "Augment your batch").

    The :class:`CocoSource` (category mapping, class names) is attached as ``.coco_source``
    (and ``.source``, the name the synthetic dataset uses too); it is lost by further
    ``Dataset`` transformations, so keep a reference or build the ``CocoSource`` yourself.
    """
    if isinstance(annotation_file, CocoSource):
        source = annotation_file
    else:
        if image_dir is None:
            raise ValueError("image_dir is required with an annotation file path.")
        source = CocoSource(annotation_file, image_dir, image_ids=image_ids)
    dataset = build_dataset(
        len(source),
        lambda index: source.example(index, mask_size),
        batch_size=batch_size,
        training=training,
        min_size=min_size,
        max_size=max_size,
        size_divisible=size_divisible,
        mask_size=mask_size,
        max_instances=max_instances,
        flip_probability=flip_probability,
        shuffle=shuffle,
        repeat=repeat,
        seed=seed,
        num_parallel_calls=num_parallel_calls,
        drop_remainder=drop_remainder,
        augmentation=augmentation,
        augmentation_options=augmentation_options,
        copy_paste=copy_paste,
        mirror_copies=mirror_copies,
    )
    dataset.coco_source = dataset.source = source
    return dataset
