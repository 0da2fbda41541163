"""Training augmentations of the ``tf.data`` pipeline: flip, multi-scale and large-scale jitter.

Each augmentation moves an image, its ``[n, 4]`` boxes ``(x1, y1, x2, y2)`` (pixels, see
:mod:`keras_maskrcnn.boxes`), classes and box-relative ``[n, N, N]`` coverage masks
(:mod:`keras_maskrcnn.data.masks`) together, as graph ops (no Python per element), with its
random draws made by stateless ops from one per-image seed. Every draw is also a plain argument
of a function (:func:`scale_jitter_size`, :func:`crop_offsets`, ...), so tests can force the
draws torchvision made.

Presets, by name (:func:`get`; ``build_dataset(augmentation=...)``):

* ``"flip"`` (:class:`Flip`): horizontal flip, then the model's resize rule (``min_size`` /
  ``max_size``, :mod:`keras_maskrcnn.transform`). The default; the pipeline's behaviour before.
* ``"multiscale"`` (:class:`MultiScale`): torchvision's ``RandomShortestSize(min_size=(480, 512,
  ..., 800), max_size=1333)`` + ``RandomHorizontalFlip`` (the detection reference's
  ``--data-augmentation multiscale``, Mask R-CNN v1's recipe).
* ``"lsj"`` (:class:`LargeScaleJitter`): large-scale jitter of torchvision v2 / detectron2's "new
  baselines": ``ScaleJitter(target_size=(1024, 1024), scale_range=(0.1, 2.0))``,
  ``FixedSizeCrop(size=(1024, 1024), fill=mean)`` (a random crop where the scaled image is larger,
  padding with the mean colour at the bottom/right where it is smaller), ``RandomHorizontalFlip``.
* ``"none"``: the resize rule only.

Geometry: sizes follow torchvision's rules exactly (multi-scale *is* the model's resize rule,
:func:`keras_maskrcnn.transform.resized_sizes`, with a drawn ``min_size``; scale jitter is
:func:`scale_jitter_size`, in torchvision's float32 arithmetic). Boxes are scaled with
:func:`keras_maskrcnn.transform.boxes_to_resized` (bit-identical to torchvision's), shifted by
the crop, clipped to it; instances left with no width or height are dropped (as torchvision's
``FixedSizeCrop``). Images are resampled by :func:`resample`: bilinear *with* antialiasing, as
``torchvision.transforms.v2.Resize(antialias=True)`` (its default) resamples; TF's antialiased
bilinear kernel is the same triangle filter (measured: within 0.004 of 255 of torchvision on
float tensors, downscaling 0.1x-0.7x and upscaling; without antialiasing a 10x downscale of a
noisy image differs by up to 120). torchvision rounds uint8 and PIL images to integers after
resizing (up to 1 of 255); the pipeline keeps float32.

Masks: being box-relative, coverage masks do not change when the image is resized or padded, and
a flip reverses their columns. A crop that cuts a box re-samples that instance's mask to the
visible part (:func:`crop_coverage_masks`): the visible window of the old ``N x N`` grid is cut
into ``N x N`` new cells, each the area-weighted mean of the old cells it overlaps. The one
approximation is that the coverage of an old cell is spread evenly over it (the same one
:func:`keras_maskrcnn.targets.mask_targets` makes); its error against coverage masks computed
from the full-resolution mask is measured in ``tests/test_augment.py`` (mean cell error 0.0045;
single cells off by up to 0.98 where a crop keeps a sliver of a large box, whose visible part
spans only a few old cells). torchvision instead resizes full-image masks by nearest neighbour,
which moves their edges by up to one resized pixel (against exactly transformed masks, IoU 0.90
on average for solid objects where the coverage masks reach 0.99).

Order and image sizes are torchvision's: multi-scale resizes then flips; LSJ jitters, crops or
pads, then flips (so the padding of a flipped image is on the left; ``image_sizes`` is the whole
``target_size``, as torchvision's model sees it). In training this project's model does not resize
again; torchvision's ``GeneralizedRCNNTransform`` resizes every training image once more to its
``min_size`` (800 by default), detectron2 does not.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import tensorflow as tf

from keras_maskrcnn import boxes as box_ops
from keras_maskrcnn import transform

MULTISCALE_MIN_SIZES = tuple(range(480, 801, 32))
"""torchvision's multi-scale short sides: 480, 512, ..., 800."""
MULTISCALE_MAX_SIZE = 1333
LSJ_SIZE = (1024, 1024)
LSJ_SCALE_RANGE = (0.1, 2.0)
MEAN_FILL = tuple(255.0 * m for m in transform.IMAGE_MEAN)
"""Padding colour of :class:`LargeScaleJitter`: the normalisation mean in ``[0, 255]`` RGB, so
padded pixels normalise to 0 (torchvision's detection reference pads with ``(123, 117, 104)``)."""

Targets = Tuple[tf.Tensor, tf.Tensor, tf.Tensor]  # boxes [n, 4], classes [n], masks [n, N, N]


# --------------------------------------------------------------------------- image and boxes
def resample(image: tf.Tensor, size: tf.Tensor, antialias: bool = True) -> tf.Tensor:
    """:func:`keras_maskrcnn.transform.resize_images` of one image, antialiased by default as
    ``torchvision.transforms.v2.Resize``."""
    return transform.resize_images(image, size, antialias=antialias)


def resize_with_boxes(
    image: tf.Tensor, boxes: tf.Tensor, size: tf.Tensor, antialias: bool = True
) -> Tuple[tf.Tensor, tf.Tensor]:
    """Resample ``image`` to ``size`` ``(h, w)`` and scale its ``[n, 4]`` boxes with it
    (:func:`keras_maskrcnn.transform.boxes_to_resized`, clipped to the new image; coverage masks are
    unchanged)."""
    original = tf.shape(image)[:2]
    scale = tf.cast(size, tf.float32) / tf.cast(original, tf.float32)
    boxes = transform.boxes_to_resized(boxes, scale)
    # float32 scaling can put an edge box a few ulps past the new border (48.000004 for 48): clip.
    boxes = box_ops.clip_boxes(boxes[None], tf.reshape(size, [1, 2]))[0]
    return resample(image, size, antialias), boxes


def resample_window(
    image: tf.Tensor, size: tf.Tensor, top: tf.Tensor, left: tf.Tensor, window: tf.Tensor, antialias: bool = True
) -> tf.Tensor:
    """:func:`keras_maskrcnn.transform.resize_window`: only the kept window of a resized image."""
    return transform.resize_window(image, size, top, left, window, antialias)


def horizontal_flip(image: tf.Tensor, boxes: tf.Tensor, masks: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Horizontal flip of an ``[H, W, C]`` image, its ``[n, 4]`` boxes and ``[n, N, N]`` coverage masks."""
    width = tf.cast(tf.shape(image)[1], boxes.dtype)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    boxes = tf.stack([width - x2, y1, width - x1, y2], axis=-1)
    return tf.reverse(image, [1]), boxes, tf.reverse(masks, [2])


def shortest_size(size: tf.Tensor, min_sizes: Sequence[int], max_size: Optional[int], index: tf.Tensor) -> tf.Tensor:
    """torchvision's ``RandomShortestSize`` for the drawn ``index`` into ``min_sizes``: int32 ``(h, w)``.

    It is the model's resize rule with ``min_size = min_sizes[index]``
    (:func:`keras_maskrcnn.transform.resized_sizes`, float64 as torchvision's Python floats).
    """
    candidates = tf.stack([transform.resized_sizes(size, m, max_size) for m in min_sizes])
    return tf.gather(candidates, index)


def scale_jitter_size(
    size: tf.Tensor, target_size: Sequence[int], scale_range: Sequence[float], u: tf.Tensor
) -> tf.Tensor:
    """torchvision's ``ScaleJitter`` size for the uniform draw ``u`` in ``[0, 1)``: int32 ``(h, w)``.

    ``scale = lo + u (hi - lo)``, ``r = min(target_h / h, target_w / w) * scale``, new side
    ``floor(side * r)``, in torchvision's arithmetic (the ratio in float64, then float32) so the
    sizes are the same to the pixel. At least 1 pixel. ``target_size`` is ``(height, width)``;
    torchvision's ``ScaleJitter`` reads its ``target_size`` as ``(width, height)`` (the same for
    the square 1024 recipe).
    """
    lo, hi = (float(v) for v in scale_range)
    sides = tf.cast(size, tf.float64)
    base = tf.cast(tf.reduce_min(tf.constant([float(t) for t in target_size], tf.float64) / sides), tf.float32)
    scale = tf.constant(lo, tf.float32) + tf.cast(u, tf.float32) * tf.constant(hi - lo, tf.float32)
    new = tf.floor(tf.cast(size, tf.float32) * (base * scale))
    return tf.maximum(tf.cast(new, tf.int32), 1)


def crop_offsets(size: tf.Tensor, crop_size: Sequence[int], u: tf.Tensor) -> tf.Tensor:
    """Top-left corner ``(top, left)`` int32 of torchvision's ``FixedSizeCrop`` for the draw ``u``.

    One draw for both axes (torchvision's and detectron2's rule): ``floor(max(side - crop, 0) * u)``
    in float32.
    """
    excess = tf.maximum(tf.cast(size, tf.int32) - tf.constant(list(crop_size), tf.int32), 0)
    return tf.cast(tf.floor(tf.cast(excess, tf.float32) * tf.cast(u, tf.float32)), tf.int32)


def pad_with_fill(image: tf.Tensor, size: Sequence[int], fill: Sequence[float]) -> tf.Tensor:
    """Pad an ``[h, w, 3]`` float32 image at the bottom/right to ``size`` with the colour ``fill``."""
    shape = tf.shape(image)
    paddings = [[0, size[0] - shape[0]], [0, size[1] - shape[1]], [0, 0]]
    inside = tf.pad(tf.ones_like(image[..., :1], tf.bool), paddings)
    return tf.where(inside, tf.pad(image, paddings), tf.constant(list(fill), tf.float32))


# --------------------------------------------------------------------------- masks
def _window_weights(lo: tf.Tensor, hi: tf.Tensor, n: int) -> tf.Tensor:
    """``[k, n, n]`` float32: row ``i`` averages old cells over new cell ``i`` of the window
    ``[lo, hi]`` (``[k]`` float64, in old-cell units): overlap lengths, normalised."""
    edges = lo[:, None] + (hi - lo)[:, None] * (tf.range(n + 1, dtype=tf.float64) / n)  # [k, n + 1]
    cells = tf.range(n, dtype=tf.float64)
    overlap = tf.maximum(
        tf.minimum(edges[:, 1:, None], cells + 1.0) - tf.maximum(edges[:, :-1, None], cells), 0.0
    )
    return tf.cast(tf.math.divide_no_nan(overlap, tf.reduce_sum(overlap, -1, keepdims=True)), tf.float32)


def resample_coverage_window(masks: tf.Tensor, windows: tf.Tensor) -> tf.Tensor:
    """Re-sample the window ``(u0, v0, u1, v1)`` (``[k, 4]`` float64, in cells: column, row) of
    ``[k, N, N]`` uint8 coverage masks back to ``N x N`` cells, area-weighted: ``uint8 [k, N, N]``.

    Each new cell is the mean of the old cells under it, weighted by overlap, each old cell taken
    as evenly covered.
    """
    n = masks.shape[-1]
    u0, v0, u1, v1 = tf.unstack(windows, axis=-1)
    rows, cols = _window_weights(v0, v1, n), _window_weights(u0, u1, n)
    values = tf.matmul(tf.matmul(rows, tf.cast(masks, tf.float32)), cols, transpose_b=True)
    return tf.cast(tf.round(tf.clip_by_value(values, 0.0, 255.0)), tf.uint8)


def crop_coverage_masks(masks: tf.Tensor, boxes: tf.Tensor, clipped: tf.Tensor) -> tf.Tensor:
    """Coverage masks of ``[n, 4]`` ``boxes`` re-sampled to their ``clipped`` boxes (the same
    boxes clipped to a crop, with positive width and height): ``uint8 [n, N, N]``.

    Only masks whose box the crop cuts are re-sampled (the others are returned bit for bit).
    """
    n = masks.shape[-1]
    cut = tf.reduce_any(tf.not_equal(boxes, clipped), axis=-1)
    index = tf.where(cut)[:, 0]
    old = tf.cast(tf.gather(boxes, index), tf.float64)
    new = tf.cast(tf.gather(clipped, index), tf.float64)
    extent = tf.tile(old[:, 2:] - old[:, :2], [1, 2])  # (w, h, w, h)
    windows = (new - tf.tile(old[:, :2], [1, 2])) / extent * n
    windows = tf.where(tf.gather(boxes, index) == tf.gather(clipped, index),
                       tf.constant([0.0, 0.0, n, n], tf.float64), windows)  # exact on uncut sides
    resampled = resample_coverage_window(tf.gather(masks, index), windows)
    return tf.tensor_scatter_nd_update(masks, index[:, None], resampled)


def crop_instances(
    boxes: tf.Tensor, classes: tf.Tensor, masks: tf.Tensor, top: tf.Tensor, left: tf.Tensor, height: tf.Tensor,
    width: tf.Tensor,
) -> Targets:
    """The instances of a crop ``[top, top + height) x [left, left + width)``: boxes shifted and
    clipped to it, instances without width or height dropped, cut masks re-sampled."""
    offset = tf.cast(tf.stack([left, top, left, top]), boxes.dtype)
    limit = tf.cast(tf.stack([width, height, width, height]), boxes.dtype)
    shifted = boxes - offset
    clipped = tf.minimum(tf.maximum(shifted, 0.0), limit)
    keep = tf.logical_and(clipped[:, 0] < clipped[:, 2], clipped[:, 1] < clipped[:, 3])
    shifted, clipped = tf.boolean_mask(shifted, keep), tf.boolean_mask(clipped, keep)
    masks = crop_coverage_masks(tf.boolean_mask(masks, keep), shifted, clipped)
    return clipped, tf.boolean_mask(classes, keep), masks


def _crop_targets(boxes, classes, masks, shape, top, left, kept) -> Targets:
    """:func:`crop_instances` where the crop ``kept`` cuts the image ``shape``; else unchanged
    (torchvision clips boxes only when it crops)."""
    return tf.cond(
        tf.reduce_any(tf.not_equal(kept, shape)),
        lambda: crop_instances(boxes, classes, masks, top, left, kept[0], kept[1]),
        lambda: (boxes, classes, masks),
    )


def fixed_size_crop(
    image: tf.Tensor, boxes: tf.Tensor, classes: tf.Tensor, masks: tf.Tensor, size: Sequence[int], u: tf.Tensor,
    fill: Sequence[float] = MEAN_FILL,
) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """torchvision's ``FixedSizeCrop(size, fill)`` for the crop draw ``u``: an ``[h, w, 3]`` image
    and its instances to exactly ``size`` ``(height, width)``.

    Where the image is larger it is cropped at :func:`crop_offsets` (instances by
    :func:`crop_instances`); where smaller it is padded at the bottom/right with ``fill``. Boxes
    are clipped only when something is cut (as torchvision). Returns float32 image, boxes,
    classes, masks. (:class:`LargeScaleJitter` does the same, resampling only the crop.)
    """
    shape = tf.shape(image)[:2]
    kept = tf.minimum(shape, tf.constant(list(size), tf.int32))
    top, left = tf.unstack(crop_offsets(shape, size, u))
    image = tf.cast(image[top:top + kept[0], left:left + kept[1]], tf.float32)
    boxes, classes, masks = _crop_targets(boxes, classes, masks, shape, top, left, kept)
    return pad_with_fill(image, size, fill), boxes, classes, masks


# --------------------------------------------------------------------------- augmentations
def _uniform(seed: tf.Tensor, stream: int) -> tf.Tensor:
    """A uniform float32 draw in ``[0, 1)`` from the image's ``seed`` (int64) and a stream number."""
    return tf.random.stateless_uniform([], seed=tf.stack([seed, tf.constant(stream, tf.int64)]))


class Augmentation:
    """A training augmentation: ``augmentation(image, boxes, classes, masks, seed)`` returns the
    float32 image (its valid size is its shape) and its targets.

    Subclasses define :meth:`sample` (the random draws, a dict of scalar tensors, from one int64
    ``seed``) and :meth:`apply` (the transformation for given draws). Tests override ``sample``
    to force draws.
    """

    flip_probability = 0.0

    def sample(self, seed: tf.Tensor) -> Dict[str, tf.Tensor]:
        return {"flip": _uniform(seed, 0) < self.flip_probability}

    def apply(self, image, boxes, classes, masks, draws: Mapping[str, tf.Tensor]):
        # Abstract: every augmentation (Flip, MultiScale, LargeScaleJitter) defines it.
        raise NotImplementedError(f"{type(self).__name__} must define apply()")

    def __call__(self, image, boxes, classes, masks, seed):
        return self.apply(image, boxes, classes, masks, self.sample(seed))

    @staticmethod
    def _maybe_flip(flip, image, boxes, masks):
        return tf.cond(flip, lambda: horizontal_flip(image, boxes, masks), lambda: (image, boxes, masks))


class Flip(Augmentation):
    """Horizontal flip with ``flip_probability``, then the model's resize rule (``min_size=None``
    keeps the size; :func:`keras_maskrcnn.transform.resize_image`)."""

    def __init__(self, min_size: Optional[int] = transform.MIN_SIZE, max_size: Optional[int] = transform.MAX_SIZE,
                 flip_probability: float = 0.5):
        self.min_size, self.max_size, self.flip_probability = min_size, max_size, flip_probability

    def apply(self, image, boxes, classes, masks, draws):
        if self.flip_probability > 0:
            image, boxes, masks = self._maybe_flip(draws["flip"], image, boxes, masks)
        image, scale = transform.resize_image(image, self.min_size, self.max_size)
        return image, transform.boxes_to_resized(boxes, scale), classes, masks


class MultiScale(Augmentation):
    """torchvision's ``RandomShortestSize(min_sizes, max_size)`` then ``RandomHorizontalFlip``."""

    def __init__(self, min_sizes: Sequence[int] = MULTISCALE_MIN_SIZES, max_size: Optional[int] = MULTISCALE_MAX_SIZE,
                 flip_probability: float = 0.5, antialias: bool = True):
        self.min_sizes, self.max_size = tuple(int(m) for m in min_sizes), max_size
        self.flip_probability, self.antialias = flip_probability, antialias

    def sample(self, seed):
        index = tf.random.stateless_uniform(
            [], seed=tf.stack([seed, tf.constant(1, tf.int64)]), maxval=len(self.min_sizes), dtype=tf.int32
        )
        return dict(super().sample(seed), index=index)

    def apply(self, image, boxes, classes, masks, draws):
        size = shortest_size(tf.shape(image)[:2], self.min_sizes, self.max_size, draws["index"])
        image, boxes = resize_with_boxes(image, boxes, size, self.antialias)
        image, boxes, masks = self._maybe_flip(draws["flip"], image, boxes, masks)
        return image, boxes, classes, masks


class LargeScaleJitter(Augmentation):
    """torchvision's ``ScaleJitter(target_size, scale_range)``, ``FixedSizeCrop(target_size, fill)``
    and ``RandomHorizontalFlip``: images come out exactly ``target_size`` ``(height, width)``."""

    def __init__(self, target_size: Union[int, Sequence[int]] = LSJ_SIZE,
                 scale_range: Sequence[float] = LSJ_SCALE_RANGE, fill: Sequence[float] = MEAN_FILL,
                 flip_probability: float = 0.5, antialias: bool = True):
        size = tuple(target_size) if isinstance(target_size, Sequence) else (target_size, target_size)
        self.target_size, self.scale_range = tuple(int(s) for s in size), tuple(float(s) for s in scale_range)
        self.fill, self.flip_probability, self.antialias = tuple(float(f) for f in fill), flip_probability, antialias

    def sample(self, seed):
        return dict(super().sample(seed), scale=_uniform(seed, 1), crop=_uniform(seed, 2))

    def apply(self, image, boxes, classes, masks, draws):
        original = tf.shape(image)[:2]
        resized = scale_jitter_size(original, self.target_size, self.scale_range, draws["scale"])
        kept = tf.minimum(resized, tf.constant(self.target_size, tf.int32))
        top, left = tf.unstack(crop_offsets(resized, self.target_size, draws["crop"]))
        image = resample_window(image, resized, top, left, kept, self.antialias)  # = resample, then crop
        boxes = transform.boxes_to_resized(boxes, tf.cast(resized, tf.float32) / tf.cast(original, tf.float32))
        boxes, classes, masks = _crop_targets(boxes, classes, masks, resized, top, left, kept)
        image = pad_with_fill(image, self.target_size, self.fill)
        image, boxes, masks = self._maybe_flip(draws["flip"], image, boxes, masks)
        return tf.ensure_shape(image, self.target_size + (3,)), boxes, classes, masks


NAMES = ("flip", "multiscale", "lsj", "none")


def get(
    augmentation: Union[str, Augmentation, None],
    min_size: Optional[int] = transform.MIN_SIZE,
    max_size: Optional[int] = transform.MAX_SIZE,
    flip_probability: float = 0.5,
    **options,
) -> Augmentation:
    """An :class:`Augmentation` by name (``"flip"``, ``"multiscale"``, ``"lsj"``, ``"none"``/None)
    or as given. ``min_size``/``max_size`` are the pipeline's resize rule (``"flip"``, ``"none"``;
    ``max_size`` also bounds ``"multiscale"``); ``options`` go to the preset's constructor
    (e.g. ``target_size=512`` for ``"lsj"``, ``min_sizes=(...)`` for ``"multiscale"``)."""
    if isinstance(augmentation, Augmentation):
        if options:
            raise ValueError("augmentation options apply to a preset name, not an Augmentation instance")
        return augmentation
    if augmentation in (None, "none"):
        return Flip(min_size, max_size, flip_probability=0.0, **options)
    if augmentation == "flip":
        return Flip(min_size, max_size, flip_probability=flip_probability, **options)
    if augmentation == "multiscale":
        options.setdefault("max_size", max_size)
        return MultiScale(flip_probability=flip_probability, **options)
    if augmentation == "lsj":
        return LargeScaleJitter(flip_probability=flip_probability, **options)
    raise ValueError(f"unknown augmentation {augmentation!r}; expected one of {NAMES} or an Augmentation")
