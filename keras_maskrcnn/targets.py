"""Training targets: the RPN's anchor labels, the RoI heads' sampled RoIs, and mask targets.

Matching and the balanced sampler are :mod:`keras_maskrcnn.matching`.

Everything is batched with static per-image sample counts (no Python loop over images or boxes).
Ground truth comes padded: ``gt_boxes [B, G, 4]`` (x1, y1, x2, y2) and ``gt_classes [B, G]``
with class 0 in padding rows; ``gt_masks [B, G, N, N]`` are box-relative coverage masks (see
:mod:`keras_maskrcnn.data`).
"""
from __future__ import annotations

from typing import Optional

import tensorflow as tf

from keras_maskrcnn import boxes as box_ops
from keras_maskrcnn.matching import BACKGROUND, IGNORE, BalancedPositiveNegativeSampler, Matcher, balanced_sample, match

__all__ = [
    "BACKGROUND", "IGNORE", "match", "balanced_sample", "rpn_targets", "jitter_boxes", "sample_rois", "mask_targets",
]


def _with_empty_row(t: tf.Tensor) -> tf.Tensor:
    """Append one all-zero (padding) ground-truth row, so gathers work when an image has none."""
    paddings = [[0, 0], [0, 1]] + [[0, 0]] * (len(t.shape) - 2)
    return tf.pad(t, paddings)


def _box_targets(gt_boxes, matched, reference, positive, weights=(1.0, 1.0, 1.0, 1.0)) -> tf.Tensor:
    """Deltas from ``reference [B, N, 4]`` to their matched ground truth; zero where not positive
    (which also keeps background rows, matched to padding, free of NaN)."""
    matched_boxes = tf.gather(gt_boxes, matched, batch_dims=1)
    targets = box_ops.encode_boxes(matched_boxes, reference, weights)
    return tf.where(positive[..., None], targets, 0.0)


def rpn_targets(
    anchors: tf.Tensor,
    gt_boxes: tf.Tensor,
    gt_valid: tf.Tensor,
    fg_iou_threshold: float = 0.7,
    bg_iou_threshold: float = 0.3,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
):
    """Objectness labels and box targets for ``anchors [A, 4]``.

    Returns ``labels [B, A]`` float (1 foreground, 0 background), ``box_targets [B, A, 4]``
    (deltas with weights 1, 1, 1, 1), and ``positive``, ``sampled`` ``[B, A]`` bool masks.
    """
    gt_boxes, gt_valid = _with_empty_row(gt_boxes), _with_empty_row(gt_valid)
    anchors = tf.broadcast_to(anchors[None], [tf.shape(gt_boxes)[0], tf.shape(anchors)[0], 4])
    iou = box_ops.pairwise_iou(anchors, gt_boxes)
    matches = Matcher(fg_iou_threshold, bg_iou_threshold, allow_low_quality_matches=True)(iou, gt_valid)
    sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
    positive, negative = sampler(matches, tf.ones_like(matches, tf.bool))
    box_targets = _box_targets(gt_boxes, tf.maximum(matches, 0), anchors, positive)
    return tf.cast(positive, tf.float32), box_targets, positive, tf.logical_or(positive, negative)


def jitter_boxes(
    boxes: tf.Tensor, copies: int, std: float = 0.1, image_sizes: Optional[tf.Tensor] = None
) -> tf.Tensor:
    """``copies`` random perturbations of each ``[B, G, 4]`` box, ``[B, copies * G, 4]`` (copy
    ``c`` of box ``g`` at ``c * G + g``).

    Each copy moves the box centre by ``N(0, std)`` times the box width (x) and height (y) and
    scales width and height by ``exp(N(0, std))``, independently; with ``std = 0.1`` most copies
    overlap their box with IoU 0.6-0.9. Clipped to ``image_sizes [B, 2]`` (height, width) when
    given. Zero (padding) boxes stay zero-sized.
    """
    boxes = tf.cast(boxes, tf.float32)
    tiled = tf.tile(boxes, [1, copies, 1])
    width, height = tiled[..., 2] - tiled[..., 0], tiled[..., 3] - tiled[..., 1]
    noise = tf.random.normal(tf.shape(tiled), stddev=std)
    cx = tiled[..., 0] + 0.5 * width + noise[..., 0] * width
    cy = tiled[..., 1] + 0.5 * height + noise[..., 1] * height
    half_w = 0.5 * width * tf.exp(noise[..., 2])
    half_h = 0.5 * height * tf.exp(noise[..., 3])
    jittered = tf.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
    return jittered if image_sizes is None else box_ops.clip_boxes(jittered, image_sizes)


def sample_rois(
    proposals: tf.Tensor,
    num_proposals: tf.Tensor,
    gt_boxes: tf.Tensor,
    gt_classes: tf.Tensor,
    fg_iou_threshold: float = 0.5,
    bg_iou_threshold: float = 0.5,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    box_coder_weights=(10.0, 10.0, 5.0, 5.0),
    gt_jitter_copies: int = 0,
    gt_jitter_std: float = 0.1,
    image_sizes: Optional[tf.Tensor] = None,
):
    """Sample RoIs for the box and mask heads from proposals plus the ground truth boxes.

    torchvision's rule (``add_gt_proposals``): the candidates are the proposals and the ground
    truth boxes themselves. With ``gt_jitter_copies = k > 0`` they also include ``k`` randomly
    jittered copies of each ground truth box (:func:`jitter_boxes` with ``gt_jitter_std``, clipped
    to ``image_sizes [B, 2]`` when given): early in training, when the proposals hit few objects,
    the heads then see several foreground RoIs per object instead of one (not in torchvision; the
    small from-scratch preset uses it, BENCHMARKS.md).

    Returns a dict, each ``[B, R, ...]`` with ``R = batch_size_per_image``, positives first:
    ``rois`` (x1, y1, x2, y2), ``labels`` int32 (0 background), ``matched_gt`` int32 index into
    ``G``, ``box_targets [B, R, 4]``, ``valid`` bool (False for empty slots when an image has too
    few candidates), ``positive`` bool.
    """
    gt_boxes, gt_classes = _with_empty_row(gt_boxes), _with_empty_row(gt_classes)
    gt_valid = gt_classes > 0
    num_props = tf.shape(proposals)[1]
    candidates = [proposals, gt_boxes]
    valid = [tf.sequence_mask(num_proposals, num_props), gt_valid]
    if gt_jitter_copies:
        candidates.append(jitter_boxes(gt_boxes, gt_jitter_copies, gt_jitter_std, image_sizes))
        valid.append(tf.tile(gt_valid, [1, gt_jitter_copies]))
    candidates, valid = tf.concat(candidates, axis=1), tf.concat(valid, axis=1)
    iou = box_ops.pairwise_iou(candidates, gt_boxes)
    matches = Matcher(fg_iou_threshold, bg_iou_threshold, allow_low_quality_matches=False)(iou, gt_valid)
    positive, negative = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)(matches, valid)
    # Order: sampled positives, sampled negatives, then the rest (marked invalid).
    key = tf.cast(positive, tf.float32) * 2.0 + tf.cast(negative, tf.float32)
    key = key + tf.random.uniform(tf.shape(key), 0.0, 0.5)
    r = tf.minimum(batch_size_per_image, tf.shape(candidates)[1])
    _, order = tf.math.top_k(key, k=r)
    pad = batch_size_per_image - r

    def take(t, fill):
        t = tf.gather(t, order, batch_dims=1)
        paddings = [[0, 0], [0, pad]] + [[0, 0]] * (len(t.shape) - 2)
        return tf.pad(t, paddings, constant_values=fill)

    rois = take(candidates, 0.0)
    is_pos = take(positive, False)
    is_valid = tf.logical_or(is_pos, take(negative, False))
    matched = tf.maximum(take(matches, 0), 0)
    labels = tf.where(is_pos, tf.gather(gt_classes, matched, batch_dims=1), 0)
    box_targets = _box_targets(gt_boxes, matched, rois, is_pos, box_coder_weights)
    return {
        "rois": tf.stop_gradient(rois),
        "labels": labels,
        "matched_gt": matched,
        "box_targets": tf.stop_gradient(box_targets),
        "valid": is_valid,
        "positive": is_pos,
    }


def _samples_at_most(x: tf.Tensor, start: tf.Tensor, step: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """How many of the sample points ``start + (k + 0.5) * step``, ``k < count``, are ``<= x``."""
    return tf.clip_by_value(tf.floor((x - start) / step + 0.5), 0.0, count)


def _samples_below(x: tf.Tensor, start: tf.Tensor, step: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """How many of the sample points ``start + (k + 0.5) * step``, ``k < count``, are ``< x``."""
    return tf.clip_by_value(tf.math.ceil((x - start) / step + 0.5) - 1.0, 0.0, count)


def _pooling_weights(
    roi_lo: tf.Tensor, roi_hi: tf.Tensor, box_lo: tf.Tensor, box_hi: tf.Tensor, extent: tf.Tensor, out: int, cells: int
) -> tf.Tensor:
    """``[K, out, cells]``: along one axis, the weight of each ground-truth cell in each output bin.

    torchvision's ``roi_align(aligned=False, sampling_ratio=-1)`` averages, per bin, ``g =
    ceil(L / out)`` bilinear samples at ``s_k = lo + p * L / out + (k + 0.5) * L / (out * g)``
    (``L = max(hi - lo, 1)``). Bilinear interpolation of a pixel mask at ``s`` (pixel centres at
    integers) is the mask's area over the unit interval ``[s, s + 1]`` in pixel-edge coordinates
    (pixel ``i`` spans ``[i, i + 1]``, as the box); samples in ``[-1, 0)`` are clamped to 0 and read
    ``[0, 1]``, samples in ``(E - 1, E]`` read ``[E - 1, E]`` (``E`` = ``extent``, the image size),
    samples beyond ``-1`` / ``E`` count 0. With the mask uniform within each cell, the weight of
    cell ``[u, v]`` is ``sum_k |[s_k, s_k + 1] & [u, v]| / g``, summed in closed form:
    ``T(x) = sum_k clip(x - s_k, 0, 1)`` over the regular samples is a count of the samples at
    least 1 below ``x`` plus an arithmetic series over the (at most two) samples within 1 below.
    """
    length = tf.maximum(roi_hi - roi_lo, 1.0)
    bin_size = length / float(out)
    grid = tf.math.ceil(length / float(out))
    step = (bin_size / grid)[:, None, None]
    start = (roi_lo[:, None] + tf.range(out, dtype=tf.float32)[None, :] * bin_size[:, None])[:, :, None]
    grid = grid[:, None, None]
    extent = extent[:, None, None]
    fractions = tf.range(cells + 1, dtype=tf.float32) / float(cells)
    edges = (box_lo[:, None] + (box_hi - box_lo)[:, None] * fractions[None, :])[:, None, :]  # [K, 1, cells + 1]
    invalid_low = _samples_below(-1.0, start, step, grid)
    first = _samples_below(0.0, start, step, grid)  # samples [first, last) are not clamped
    last = _samples_at_most(extent - 1.0, start, step, grid)
    valid_high = _samples_at_most(extent, start, step, grid)
    units = (edges - start) / step  # edge positions in sample steps from the bin start
    ahead = tf.clip_by_value(tf.floor(units + 0.5), first, last)  # samples <= edge
    behind = tf.clip_by_value(tf.floor(units - 1.0 / step + 0.5), first, last)  # samples <= edge - 1
    cumulative = (behind - first) + (ahead - behind) * step * (units - 0.5 * (ahead + behind))
    weights = cumulative[..., 1:] - cumulative[..., :-1]

    def overlap(lo, hi):  # [K, 1, cells] length of each cell inside [lo, hi]
        return tf.maximum(tf.minimum(edges[..., 1:], hi) - tf.maximum(edges[..., :-1], lo), 0.0)

    weights += (first - invalid_low) * overlap(0.0, 1.0) + (valid_high - last) * overlap(extent - 1.0, extent)
    return weights / grid


def mask_targets(
    rois: tf.Tensor,
    matched_gt: tf.Tensor,
    gt_boxes: tf.Tensor,
    gt_masks: tf.Tensor,
    output_size: int = 28,
    image_sizes: Optional[tf.Tensor] = None,
) -> tf.Tensor:
    """Each RoI's mask target, ``[B, R, S, S]`` float32 in [0, 1]: torchvision's
    ``project_masks_on_boxes`` (``roi_align(masks, rois, S, 1.0)`` with ``aligned=False`` and the
    adaptive ``ceil(roi_size / S)`` samples per bin) of its matched ground-truth mask.

    Args:
        rois: ``[B, R, 4]`` (x1, y1, x2, y2) in image pixels.
        matched_gt: ``[B, R]`` int index into ``G`` (any value for RoIs without a mask target).
        gt_boxes: ``[B, G, 4]``; padding rows zero.
        gt_masks: ``[B, G, N, N]`` box-relative coverage (:mod:`keras_maskrcnn.data`): cell
            ``(i, j)`` is the fraction of the box's ``N x N`` grid cell ``(i, j)`` the instance
            covers, uint8 ``0..255`` (255 = covered) or float in ``[0, 1]``.
        output_size: ``S``.
        image_sizes: ``[B, 2]`` (height, width) of each image's valid region, the extent of
            torchvision's full-image masks, for its rule that samples within one pixel past the
            bottom/right edge read the last row/column. None: no such clamp (exact when RoIs stay
            1 pixel inside, or the mask does not touch those edges). The top/left edge is at 0.

    The ground-truth mask is taken as uniform within each cell: this, not the pooling, is the only
    approximation. Each bin is a separable weighting of cells (:func:`_pooling_weights`), so the
    targets are two batched matmuls ``Wy @ mask @ Wx^T``; exact when cells are pixels. Cells cut
    by a bin's (or, for bins under a pixel, a sample's) edge spread their content evenly, off by
    up to about ``cell / (4 * bin)`` there (``cell = box / N``): at most 0.06 on the cases of
    tests/test_targets.py with ``N = 128``. Memory: each RoI's mask gathered as float32, ``B * R
    * N^2 * 4`` bytes (67 MB for 8 images with 128 positive RoIs each at ``N = 128``).
    """
    gt_boxes, gt_masks = _with_empty_row(gt_boxes), _with_empty_row(gt_masks)
    rois = tf.cast(rois, tf.float32)
    shape = tf.shape(rois)
    batch, num_rois = shape[0], shape[1]
    cells = gt_masks.shape[-1]
    gt = tf.gather(tf.cast(gt_boxes, tf.float32), matched_gt, batch_dims=1)  # [B, R, 4]
    if image_sizes is None:
        extent_y = extent_x = tf.fill([batch, num_rois], 1e9)
    else:
        sizes = tf.cast(image_sizes, tf.float32)
        extent_y = tf.broadcast_to(sizes[:, 0:1], [batch, num_rois])
        extent_x = tf.broadcast_to(sizes[:, 1:2], [batch, num_rois])

    def flat(t):
        return tf.reshape(t, [-1])

    weights_y = _pooling_weights(
        flat(rois[..., 1]), flat(rois[..., 3]), flat(gt[..., 1]), flat(gt[..., 3]), flat(extent_y), output_size, cells
    )
    weights_x = _pooling_weights(
        flat(rois[..., 0]), flat(rois[..., 2]), flat(gt[..., 0]), flat(gt[..., 2]), flat(extent_x), output_size, cells
    )
    masks = tf.gather(gt_masks, matched_gt, batch_dims=1)  # [B, R, N, N]
    scale = 1.0 / 255.0 if masks.dtype == tf.uint8 else 1.0
    masks = tf.reshape(tf.cast(masks, tf.float32), [-1, cells, cells]) * scale
    targets = tf.matmul(tf.matmul(weights_y, masks), weights_x, transpose_b=True)
    targets = tf.clip_by_value(targets, 0.0, 1.0)
    return tf.stop_gradient(tf.reshape(targets, [batch, num_rois, output_size, output_size]))
