"""Simple copy-paste (Ghiasi et al. 2021, "Simple Copy-Paste is a Strong Data Augmentation Method
for Instance Segmentation"): objects of one training image pasted onto another, in the batch.

As torchvision's detection reference (``SimpleCopyPaste``, ``--use-copypaste``) does it, on a
training batch after the per-image augmentation: image ``b`` receives a random subset of the
objects of image ``b - 1`` (the batch rolled by one), drawn as torchvision draws it (``n`` indices
uniform in ``[0, n)``, duplicates merged: each object with probability ``1 - (1 - 1/n)^n``). The
pasted objects keep their pixel position (images of a batch share the padded frame); what falls
outside the receiving image's valid region is cut off. Every batch image is both a source and a
receiver, so no image is added and an epoch is still one pass over the data.

What changes, for a receiving image:

* **pixels**: blended with the source where the union ``alpha`` of the pasted masks is, its edge
  softened by a 5 x 5 Gaussian of sigma 2 (the paper's blending);
* **its own instances**: their coverage masks lose what the pasted objects cover (each cell
  scaled by ``1 - alpha`` sampled at the cell's centre), their boxes shrink to the visible
  extents (the rows and columns of cells still covered) with the masks re-sampled to the new
  boxes (:func:`keras_maskrcnn.data.augment.crop_coverage_masks`), and instances left with no
  covered cell are dropped;
* **new instances**: the pasted ones (boxes, classes, coverage masks of the source, clipped to the
  receiving image), after its own, within the batch's instance slots (the subset is cut so that
  every pasted object gets a slot: no pasted pixels without an annotation).

Box format and masks as everywhere in :mod:`keras_maskrcnn.data` (``(x1, y1, x2, y2)`` pixels,
box-relative ``uint8`` coverage masks, class 0 for padding slots).

Example::

    dataset = coco_dataset("train.json", "images/", batch_size=8, training=True, copy_paste=True)
"""
from __future__ import annotations

from typing import Dict, Tuple

import tensorflow as tf

from keras_maskrcnn import transform
from keras_maskrcnn.data.augment import crop_coverage_masks

BLUR_SIZE, BLUR_SIGMA = 5, 2.0


def select_objects(counts: tf.Tensor, slots: int, seed: tf.Tensor) -> tf.Tensor:
    """torchvision's random subset of each image's ``counts`` objects: ``[B, slots]`` bool.

    ``n = counts[b]`` indices drawn uniformly in ``[0, n)``, duplicates merged.
    """
    u = tf.random.stateless_uniform([tf.shape(counts)[0], slots], seed=seed)
    n = tf.cast(counts[:, None], tf.float32)
    draws = tf.minimum(tf.cast(tf.floor(u * n), tf.int32), tf.maximum(counts[:, None] - 1, 0))  # [B, slots]
    drawn = tf.sequence_mask(counts, slots)  # draw j exists for j < n
    hits = tf.one_hot(draws, slots, dtype=tf.int32) * tf.cast(drawn, tf.int32)[..., None]  # [B, draw, slot]
    return tf.reduce_sum(hits, axis=1) > 0


def _gaussian_blur(alpha: tf.Tensor) -> tf.Tensor:
    """``[B, H, W]`` float32 blurred by a ``BLUR_SIZE`` Gaussian of ``BLUR_SIGMA`` (reflected edges)."""
    t = tf.range(BLUR_SIZE, dtype=tf.float32) - (BLUR_SIZE - 1) / 2.0
    kernel = tf.exp(-t * t / (2.0 * BLUR_SIGMA * BLUR_SIGMA))
    kernel /= tf.reduce_sum(kernel)
    pad = BLUR_SIZE // 2
    x = tf.pad(alpha[..., None], [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    x = tf.nn.conv2d(x, tf.reshape(kernel, [BLUR_SIZE, 1, 1, 1]), 1, "VALID")
    x = tf.nn.conv2d(x, tf.reshape(kernel, [1, BLUR_SIZE, 1, 1]), 1, "VALID")
    return x[..., 0]


def render_masks(masks: tf.Tensor, boxes: tf.Tensor, height, width) -> tf.Tensor:
    """``[B, H, W]`` bool: each image's coverage mask ``[B, M, M]`` at its box ``[B, 4]`` drawn
    into the frame, a pixel in where the cell under its centre is at least half covered (the
    inverse of the coverage masks' construction: exact where a cell is no larger than a pixel).

    Not :func:`keras_maskrcnn.transform.paste_masks_in_image`: that is torchvision's paste of
    predicted mask probabilities (a one-cell border, bilinear), which on ground-truth coverage
    masks at 0.5 grows each object by about half a pixel all round (measured: 5-26 % more pixels
    for objects of 10-30 px), and a pasted object's annotation must match its pixels."""
    size = masks.shape[-1]

    def cells(lo, hi, n):  # [B, n] cell index under each pixel centre, or -1 outside the box
        centres = tf.cast(tf.range(n), tf.float32)[None] + 0.5
        index = tf.floor((centres - lo[:, None]) / tf.maximum(hi - lo, 1e-6)[:, None] * size)
        inside = tf.logical_and(index >= 0, index < size)
        return tf.where(inside, tf.cast(index, tf.int32), -1)

    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    rows, cols = cells(y1, y2, height), cells(x1, x2, width)
    covered = masks >= 128
    picked = tf.gather(covered, tf.maximum(rows, 0), axis=1, batch_dims=1)  # [B, H, M]
    picked = tf.gather(picked, tf.maximum(cols, 0), axis=2, batch_dims=1)  # [B, H, W]
    return picked & (rows >= 0)[:, :, None] & (cols >= 0)[:, None, :]


def paste_union(masks: tf.Tensor, boxes: tf.Tensor, selected: tf.Tensor, image_sizes: tf.Tensor, height, width):
    """``[B, H, W]`` float32 0/1: the union of the ``selected`` objects' masks drawn into the frame
    (:func:`render_masks`), zero outside each image's ``image_sizes``.

    One object slot at a time up to the largest selected slot (a graph loop), so memory stays at
    one ``[B, H, W]`` map whatever the number of slots.
    """
    last = tf.reduce_max(tf.where(selected, tf.range(tf.shape(selected)[1])[None], -1)) + 1

    def body(k, union):
        drawn = render_masks(masks[:, k], boxes[:, k], height, width) & selected[:, k, None, None]
        return k + 1, tf.logical_or(union, drawn)

    union = tf.zeros(tf.stack([tf.shape(masks)[0], height, width]), tf.bool)
    union = tf.while_loop(lambda k, _: k < last, body, (tf.constant(0), union))[1]
    return tf.cast(tf.logical_and(union, transform.valid_region(image_sizes, height, width)), tf.float32)


def _cover_cells(alpha: tf.Tensor, boxes: tf.Tensor, size: int) -> tf.Tensor:
    """``[B, N, size, size]`` float32: ``alpha`` ``[B, H, W]`` (0/1) at the centre of each of a box's
    ``size x size`` cells (the pixel under it). Sampling 2 x 2 or 4 x 4 points a cell was no closer
    to the full-resolution reference where cells are at most 1.5 pixels (tests/test_copy_paste.py)."""
    batch, slots = tf.shape(boxes)[0], tf.shape(boxes)[1]
    height, width = tf.cast(tf.shape(alpha)[1], tf.float32), tf.cast(tf.shape(alpha)[2], tf.float32)
    x1, y1, x2, y2 = tf.unstack(tf.reshape(boxes, [-1, 4]), axis=-1)
    half_w, half_h = 0.5 * (x2 - x1) / size, 0.5 * (y2 - y1) / size
    # First and last cell centres, in pixel-index coordinates of alpha with its edge pixels
    # repeated once all round (pixel i spans [i - 0.5, i + 0.5) and is index i + 1 there, so
    # points in the outer half of an edge pixel are not taken for outside the image).
    rows = tf.stack([y1 + half_h + 0.5, y2 - half_h + 0.5], -1) / (height + 1.0)
    cols = tf.stack([x1 + half_w + 0.5, x2 - half_w + 0.5], -1) / (width + 1.0)
    crop_boxes = tf.stack([rows[:, 0], cols[:, 0], rows[:, 1], cols[:, 1]], -1)
    index = tf.repeat(tf.range(batch), slots)
    edged = tf.pad(alpha, [[0, 0], [1, 1], [1, 1]], mode="SYMMETRIC")[..., None]
    samples = tf.image.crop_and_resize(edged, crop_boxes, index, [size, size], method="nearest",
                                       extrapolation_value=0.0)
    return tf.reshape(samples, [batch, slots, size, size])


def occlude(boxes: tf.Tensor, classes: tf.Tensor, masks: tf.Tensor, alpha: tf.Tensor):
    """The instances of ``[B, N]`` slots under the pasted ``alpha`` ``[B, H, W]``: coverage masks
    without the covered part, boxes shrunk to what is still visible (masks re-sampled to them),
    fully covered instances emptied (class 0)."""
    size = masks.shape[-1]
    valid = classes > 0
    covered = _cover_cells(alpha, boxes, size)
    left = tf.cast(tf.round(tf.cast(masks, tf.float32) * (1.0 - covered)), tf.uint8)
    visible = left > 0
    rows, cols = tf.reduce_any(visible, -1), tf.reduce_any(visible, -2)  # [B, N, size]
    keep = tf.logical_and(valid, tf.reduce_any(rows, -1))

    def extent(lines):  # first and one-past-last covered cell, as fractions of the box
        index = tf.range(size)[None, None]
        first = tf.reduce_min(tf.where(lines, index, size), -1)
        last = tf.reduce_max(tf.where(lines, index, -1), -1) + 1
        return tf.cast(first, tf.float32) / size, tf.cast(last, tf.float32) / size

    (r0, r1), (c0, c1) = extent(rows), extent(cols)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    w, h = x2 - x1, y2 - y1
    shrunk = tf.stack([x1 + c0 * w, y1 + r0 * h, x1 + c1 * w, y1 + r1 * h], -1)
    shrunk = tf.where(keep[..., None], shrunk, boxes)
    flat = [tf.reshape(t, [-1, 4]) for t in (boxes, shrunk)]
    resampled = crop_coverage_masks(tf.reshape(left, [-1, size, size]), flat[0], flat[1])
    masks = tf.where(keep[..., None, None], tf.reshape(resampled, tf.shape(masks)), tf.zeros_like(masks))
    return (tf.where(keep[..., None], shrunk, tf.zeros_like(boxes)), tf.where(keep, classes, tf.zeros_like(classes)),
            masks)


def clip_to_images(boxes: tf.Tensor, classes: tf.Tensor, masks: tf.Tensor, image_sizes: tf.Tensor):
    """Instances ``[B, N]`` clipped to each image's ``image_sizes`` ``[B, 2]`` ``(h, w)``: cut masks
    re-sampled, instances left without width or height emptied."""
    size = masks.shape[-1]
    limit = tf.cast(tf.tile(image_sizes[:, ::-1], [1, 2]), boxes.dtype)[:, None]  # (w, h, w, h)
    clipped = tf.minimum(tf.maximum(boxes, 0.0), limit)
    keep = tf.logical_and(classes > 0, tf.logical_and(clipped[..., 0] < clipped[..., 2], clipped[..., 1] < clipped[..., 3]))
    safe_old = tf.where(keep[..., None], boxes, tf.constant([0.0, 0.0, 1.0, 1.0]))
    safe_new = tf.where(keep[..., None], clipped, tf.constant([0.0, 0.0, 1.0, 1.0]))
    resampled = crop_coverage_masks(tf.reshape(masks, [-1, size, size]), tf.reshape(safe_old, [-1, 4]),
                                    tf.reshape(safe_new, [-1, 4]))
    masks = tf.where(keep[..., None, None], tf.reshape(resampled, tf.shape(masks)), tf.zeros_like(masks))
    return tf.where(keep[..., None], clipped, tf.zeros_like(boxes)), tf.where(keep, classes, 0), masks


def _pad_slots(tensor: tf.Tensor, count) -> tf.Tensor:
    """``tensor`` ``[B, n, ...]`` with ``count`` zero slots appended."""
    return tf.pad(tensor, [[0, 0], [0, count]] + [[0, 0]] * (tensor.shape.rank - 2))


def _compact(boxes, classes, masks, slots):
    """Valid instances (class > 0) first, in order, cut to ``slots``."""
    order = tf.argsort(tf.cast(classes <= 0, tf.int32), axis=-1, stable=True)[:, :slots]
    return (tf.gather(t, order, batch_dims=1) for t in (boxes, classes, masks))


def copy_paste(inputs: Dict[str, tf.Tensor], targets: Dict[str, tf.Tensor], seed: tf.Tensor
               ) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
    """Simple copy-paste on a training batch (module docstring).

    Args:
        inputs: ``images`` float32 ``[B, H, W, 3]``, ``image_sizes`` int32 ``[B, 2]``.
        targets: ``boxes`` float32 ``[B, N, 4]``, ``classes`` int32 ``[B, N]`` (0: empty slot,
            valid instances first), ``masks`` uint8 ``[B, N, M, M]`` coverage masks.
        seed: int64 ``[2]``, the stateless seed of the draws.

    Returns:
        ``(inputs, targets)`` of the same structure and shapes.
    """
    images, sizes = inputs["images"], inputs["image_sizes"]
    slots = tf.shape(targets["classes"])[1]
    counts = tf.reduce_sum(tf.cast(targets["classes"] > 0, tf.int32), -1)
    # Work on the occupied slots only (valid instances come first): a handful, not the 100 of
    # the usual max_instances.
    used = tf.reduce_max(counts)
    boxes, classes, masks = (targets[k][:, :used] for k in ("boxes", "classes", "masks"))
    src_boxes, src_classes, src_masks = (tf.roll(t, 1, axis=0) for t in (boxes, classes, masks))
    src_images = tf.roll(images, 1, axis=0)

    # Pasted objects inside the receiving image, and only as many as there are free slots.
    src_boxes, src_classes, src_masks = clip_to_images(src_boxes, src_classes, src_masks, sizes)
    src_counts = tf.roll(counts, 1, axis=0)
    selected = tf.logical_and(select_objects(src_counts, used, seed), src_classes > 0)
    rank = tf.cumsum(tf.cast(selected, tf.int32), axis=-1)
    selected = tf.logical_and(selected, rank <= (slots - counts)[:, None])

    height, width = tf.shape(images)[1], tf.shape(images)[2]
    alpha = paste_union(src_masks, src_boxes, selected, sizes, height, width)
    soft = _gaussian_blur(alpha) * tf.cast(transform.valid_region(sizes, height, width), tf.float32)
    images = images * (1.0 - soft[..., None]) + src_images * soft[..., None]

    boxes, classes, masks = occlude(boxes, classes, masks, alpha)
    pasted_classes = tf.where(selected, src_classes, 0)
    free = tf.maximum(slots - 2 * used, 0)  # padding back to the batch's slots
    boxes, classes, masks = _compact(
        _pad_slots(tf.concat([boxes, tf.where(selected[..., None], src_boxes, 0.0)], 1), free),
        _pad_slots(tf.concat([classes, pasted_classes], 1), free),
        _pad_slots(tf.concat([masks, tf.where(selected[..., None, None], src_masks, tf.zeros_like(src_masks))], 1), free),
        slots,
    )
    static = targets["classes"].shape[1]
    if static is not None:
        boxes, classes, masks = (tf.ensure_shape(t, targets[k].shape)
                                 for t, k in ((boxes, "boxes"), (classes, "classes"), (masks, "masks")))
    return dict(inputs, images=images), dict(targets, boxes=boxes, classes=classes, masks=masks)
