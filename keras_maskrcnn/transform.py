"""Image geometry, defined once: the counterpart of torchvision's ``GeneralizedRCNNTransform``.

Every module that resizes, normalises or pads an image, or maps detections back to the original
image, calls this module; none has its own copy of a rule. The path of one image:

1. original ``H x W`` --:func:`resized_sizes` (the ``min_size`` / ``max_size`` rule)--> ``h x w``;
   :func:`resize_images` resamples it (ground-truth boxes follow with :func:`boxes_to_resized`);
2. the resized images of a batch are zero-padded at the bottom/right to a common size
   (:func:`pad_to_size`), normalised, zeroed outside each image's ``h x w`` and padded to a
   multiple of ``size_divisible`` (:func:`normalize_and_pad`);
3. the model detects in resized pixels; :func:`boxes_to_original` maps boxes to ``H x W`` pixels
   and :func:`paste_masks_in_image` pastes (and thresholds) the box-relative masks there.

Callers: the data pipeline (:mod:`keras_maskrcnn.data.pipeline`: steps 1 and the
``size_divisible`` padding of 2), the model (``MaskRCNN._normalize_and_pad``,
``MaskRCNN._format_masks``), :func:`keras_maskrcnn.inference.predict_images` (all three steps,
eagerly), evaluation (through the data pipeline and ``predict_images``' post-processing) and
:mod:`keras_maskrcnn.export` (all three steps inside the SavedModel graph). Everything here is
stock TensorFlow ops, usable eagerly (numpy in, tensors out) and inside a graph.

Conventions of :mod:`keras_maskrcnn.boxes`: sizes are ``(height, width)`` int, boxes
``(x1, y1, x2, y2)`` float32 pixels of the image they refer to, images ``[..., H, W, 3]`` RGB in
``[0, 255]``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from keras_maskrcnn.ops import paste_masks as paste_ops

# torchvision's defaults (maskrcnn_resnet50_fpn, GeneralizedRCNNTransform): the one place they live.
MIN_SIZE = 800
MAX_SIZE = 1333
SIZE_DIVISIBLE = 32
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

ArrayLike = Union[tf.Tensor, np.ndarray]
SizeLike = Union[tf.Tensor, np.ndarray, Sequence[int]]


# --------------------------------------------------------------------------- resize
def resized_sizes(sizes: SizeLike, min_size: int, max_size: Optional[int] = None) -> tf.Tensor:
    """The resize rule: ``[..., 2]`` int ``(height, width)`` to the resized ``[..., 2]`` int32.

    torchvision's: ``scale = min(min_size / short_side, max_size / long_side)`` (no ``max_size``
    bound when it is None) and ``new_side = floor(side * scale)``. Computed in float64, as
    torchvision computes it in Python floats, so the result is bit-identical to Python's
    arithmetic (a float32 scale would move some sides by one pixel). Numpy or Python input is
    run eagerly; tensors inside a graph stay in the graph.
    """
    sizes = tf.cast(sizes, tf.float64)
    scale = tf.constant(float(min_size), tf.float64) / tf.reduce_min(sizes, axis=-1)
    if max_size is not None:
        scale = tf.minimum(scale, tf.constant(float(max_size), tf.float64) / tf.reduce_max(sizes, axis=-1))
    return tf.cast(tf.floor(sizes * scale[..., None]), tf.int32)


def resized_size(
    height: Union[int, tf.Tensor], width: Union[int, tf.Tensor], min_size: int, max_size: Optional[int]
) -> Tuple[tf.Tensor, tf.Tensor]:
    """:func:`resized_sizes` of one image, as int32 scalars ``(new_height, new_width)``."""
    size = resized_sizes(tf.stack([tf.cast(height, tf.float64), tf.cast(width, tf.float64)]), min_size, max_size)
    return size[0], size[1]


def resized_shape(height: int, width: int, min_size: int, max_size: Optional[int]) -> Tuple[int, int]:
    """:func:`resized_sizes` of one image as Python ints ``(new_height, new_width)`` (eager only)."""
    new_height, new_width = (int(v) for v in resized_sizes([height, width], min_size, max_size).numpy())
    return new_height, new_width


def resize_images(images: ArrayLike, size: SizeLike, antialias: bool = False) -> tf.Tensor:
    """Resample ``[H, W, C]`` or ``[B, H, W, C]`` images to ``size`` ``(h, w)``: float32 output.

    Bilinear with half-pixel centres. ``antialias=False`` (the model's resampling): what
    torchvision's ``GeneralizedRCNNTransform`` does (``interpolate(mode="bilinear",
    align_corners=False)``). ``antialias=True`` (the augmentations'): ``torchvision.transforms.v2.Resize``'s
    default, a triangle filter widened by the downscale factor (plain bilinear when enlarging).
    Values stay in the input's range.
    """
    return tf.image.resize(tf.cast(images, tf.float32), size, method="bilinear", antialias=antialias)


def resize_window(
    image: tf.Tensor, size: tf.Tensor, top: tf.Tensor, left: tf.Tensor, window: tf.Tensor, antialias: bool = True
) -> tf.Tensor:
    """The window ``[top, top + window_h) x [left, left + window_w)`` of ``image`` resized to
    ``size``, computing only that window: float32 ``[window_h, window_w, C]``.

    ``resize_images(image, size, antialias)[top:..., left:...]`` (the same kernel, scale and
    sample positions: ``tf.image.resize``'s ``ScaleAndTranslate`` with the crop as translation;
    values agree to float rounding, measured under 0.001 of 255), about 7x faster when large-scale
    jitter doubles an image and keeps a quarter of it.
    """
    if not antialias:
        return resize_images(image, size)[top:top + window[0], left:left + window[1]]
    scale = tf.cast(size, tf.float32) / tf.cast(tf.shape(image)[:2], tf.float32)  # as tf.image.resize
    return tf.raw_ops.ScaleAndTranslate(
        images=tf.cast(image, tf.float32)[None], size=window, scale=scale,
        translation=-tf.cast(tf.stack([top, left]), tf.float32), kernel_type="triangle", antialias=True,
    )[0]


def resize_image(
    image: ArrayLike, min_size: Optional[int] = MIN_SIZE, max_size: Optional[int] = MAX_SIZE
) -> Tuple[tf.Tensor, tf.Tensor]:
    """Resize an ``[H, W, C]`` image by the rule of :func:`resized_sizes`.

    ``min_size=None`` keeps the size. Works eagerly and in a graph.

    Returns:
        ``(resized, scale)``: float32 ``[h, w, C]`` (values in the input's range) and float32
        ``[2]`` ``(h / H, w / W)``, the factors that map original pixel coordinates (y, x) to
        resized ones (see :func:`boxes_to_resized`).
    """
    image = tf.convert_to_tensor(image)
    if min_size is None:
        return tf.cast(image, tf.float32), tf.ones([2], tf.float32)
    original = tf.shape(image)[:2]
    size = resized_sizes(original, min_size, max_size)
    scale = tf.cast(size, tf.float32) / tf.cast(original, tf.float32)
    return resize_images(image, size), scale


# --------------------------------------------------------------------------- boxes
def boxes_to_resized(boxes: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """Map ``[n, 4]`` boxes of an original image into its resized image.

    ``boxes``: float32 ``(x1, y1, x2, y2)`` in original pixels; ``scale``: :func:`resize_image`'s
    float32 ``(h / H, w / W)``. Returns float32 ``[n, 4]`` in resized pixels.

    Why not the float64 ratio of :func:`boxes_to_original`: training targets have always been
    scaled by these float32 factors, and each direction is kept bit for bit as it was.
    """
    return boxes * tf.tile(tf.reverse(scale, [0]), [2])  # (sx, sy, sx, sy)


def boxes_to_original(boxes: tf.Tensor, image_sizes: SizeLike, original_sizes: SizeLike) -> tf.Tensor:
    """Map ``[B, N, 4]`` boxes from resized-image pixels to original-image pixels.

    ``image_sizes`` (resized), ``original_sizes``: ``[B, 2]`` int ``(height, width)``. Each coordinate is
    multiplied by ``float32(original / resized)``, the ratio taken in float64. Returns float32
    ``[B, N, 4]``; boxes are not clipped (they already lie inside the resized image).
    """
    ratio = tf.cast(tf.cast(original_sizes, tf.float64) / tf.cast(image_sizes, tf.float64), tf.float32)
    ratio = tf.stack([ratio[:, 1], ratio[:, 0], ratio[:, 1], ratio[:, 0]], axis=-1)[:, None, :]  # (x, y, x, y)
    return tf.cast(boxes, tf.float32) * ratio


# --------------------------------------------------------------------------- normalise and pad
def normalize(images: tf.Tensor, mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD) -> tf.Tensor:
    """``(x / 255 - mean) / std`` per channel of ``[..., 3]`` images in ``[0, 255]``: float32."""
    x = tf.cast(images, tf.float32) / 255.0
    return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def valid_region(image_sizes: tf.Tensor, height, width) -> tf.Tensor:
    """``[B, height, width]`` bool: True inside each image's ``[0, h) x [0, w)``.

    ``image_sizes``: ``[B, 2]`` int32 ``(h, w)`` of each image's valid region in a padded
    ``height x width`` batch.
    """
    rows = tf.range(height)[None, :] < image_sizes[:, 0:1]
    cols = tf.range(width)[None, :] < image_sizes[:, 1:2]
    return tf.logical_and(rows[:, :, None], cols[:, None, :])


def pad_to_size(images: tf.Tensor, size: SizeLike) -> tf.Tensor:
    """Zero-pad ``[..., H, W, C]`` images at the bottom and right to ``size`` ``(height, width)``.

    Padding at the bottom/right only keeps pixel coordinates (and so boxes) unchanged.
    """
    shape = tf.shape(images)
    paddings = [[0, 0]] * (images.shape.rank - 3) + [[0, size[0] - shape[-3]], [0, size[1] - shape[-2]], [0, 0]]
    return tf.pad(images, paddings)


def pad_to_multiple(images: tf.Tensor, divisor: int) -> tf.Tensor:
    """:func:`pad_to_size` to the next multiple of ``divisor`` in height and width.

    The backbone halves the map five times; sides divisible by 32 keep every level aligned
    with the image (torchvision's ``size_divisible``). In the data pipeline it also keeps the
    number of distinct batch shapes, and so of ``tf.function`` traces, small.
    """
    size = tf.shape(images)[-3:-1]
    return pad_to_size(images, (size + divisor - 1) // divisor * divisor)


def normalize_and_pad(
    images: tf.Tensor,
    image_sizes: tf.Tensor,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
    size_divisible: int = SIZE_DIVISIBLE,
) -> tf.Tensor:
    """The model's input: ``[B, H, W, 3]`` images in ``[0, 255]`` normalised, zeroed outside each
    image's ``image_sizes [B, 2]`` region and zero-padded to a multiple of ``size_divisible``.

    As torchvision, padding is 0 *after* normalisation, so an image's features do not depend on
    the size of the others in its batch. Returns float32 ``[B, H', W', 3]``.
    """
    x = normalize(images, mean, std)
    shape = tf.shape(x)
    x = tf.where(valid_region(image_sizes, shape[1], shape[2])[..., None], x, 0.0)
    return pad_to_multiple(x, size_divisible)


# --------------------------------------------------------------------------- masks
def paste_masks_in_image(
    masks: tf.Tensor,
    boxes: tf.Tensor,
    height,
    width,
    threshold: Optional[float] = None,
    jit_compile: bool = False,
    image_sizes: Optional[tf.Tensor] = None,
) -> tf.Tensor:
    """Paste box-relative masks into images, as torchvision's ``paste_masks_in_image``.

    Args:
        masks: ``[..., N, M, M]`` float box-relative mask probabilities.
        boxes: ``[..., N, 4]`` ``(x1, y1, x2, y2)`` in the target image's pixels.
        height, width: size of the target image (ints or scalar int tensors).
        threshold: None for float32 probabilities; otherwise uint8 masks, 1 where the
            probability is ``> threshold`` (compared in float32).
        jit_compile: with a threshold, paste with XLA (the float masks never reach memory; about
            twice as fast on the CPU, but compiled once per shape: for the model's fixed-size
            batches, not for many differently sized images; never in an exported graph).
        image_sizes: ``[B, 2]`` int32 ``(h, w)`` for ``[B, N, M, M]`` masks pasted into a padded
            ``height x width`` canvas: pixels outside each image's ``[0, h) x [0, w)`` are set
            to 0. None: the whole canvas is the image.

    Returns:
        ``[..., N, height, width]``: float32 probabilities, or uint8 0/1 with a ``threshold``.
    """
    if threshold is None:
        pasted = paste_ops.paste_masks(masks, boxes, height, width)
    else:
        pasted = paste_ops.paste_masks_binary(masks, boxes, height, width, threshold, jit_compile=jit_compile)
    if image_sizes is not None:
        inside = valid_region(image_sizes, height, width)[:, None]  # [B, 1, H, W]
        pasted = tf.where(inside, pasted, tf.zeros_like(pasted))
    return pasted
