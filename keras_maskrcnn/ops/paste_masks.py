"""Paste box-relative masks into the image, exactly as torchvision's ``paste_masks_in_image``."""
from __future__ import annotations

import tensorflow as tf


def _truncate(x: tf.Tensor) -> tf.Tensor:
    """Round toward zero, as torch's ``.to(int64)`` (``tf.truncatediv`` on floats does not do this
    inside a ``tf.function``)."""
    return tf.where(x < 0, tf.math.ceil(x), tf.math.floor(x))


def _interpolation_matrix(low: tf.Tensor, length: tf.Tensor, mask_size: int, image_size) -> tf.Tensor:
    """``[..., image_size, mask_size]`` weights of bilinear (align_corners=False) resampling.

    Image pixel ``p`` lies at index ``j = p - low`` of the mask resized to ``length`` pixels
    (PyTorch's rule: source ``max((j + 0.5) * mask_size / length - 0.5, 0)``); pixels outside
    ``0 <= j < length`` get no weight. The weights are the tent ``max(1 - |src - i|, 0)``, with
    ``src`` clamped to the last sample (where PyTorch clamps the upper neighbour's index).
    """
    pixels = tf.cast(tf.range(image_size), tf.float32)
    j = pixels - low[..., None]
    scale = tf.cast(mask_size, tf.float32) / length[..., None]
    src = tf.minimum(tf.maximum((j + 0.5) * scale - 0.5, 0.0), mask_size - 1.0)
    inside = tf.cast(tf.logical_and(j >= 0, j < length[..., None]), tf.float32)
    samples = tf.cast(tf.range(mask_size), tf.float32)
    return tf.maximum(1.0 - tf.abs(src[..., None] - samples), 0.0) * inside[..., None]


def paste_masks(masks: tf.Tensor, boxes: tf.Tensor, height, width, padding: int = 1) -> tf.Tensor:
    """Paste ``[..., N, M, M]`` box-relative masks into ``[..., N, height, width]`` images.

    Follows torchvision: the mask is zero-padded by ``padding`` pixels and its box expanded by
    ``(M + 2 * padding) / M`` about its centre, the box truncated to integers, and the mask
    resized bilinearly to ``(x2 - x1 + 1, y2 - y1 + 1)`` pixels placed at ``(x1, y1)``.
    Bilinear resizing is separable, so each mask is pasted as ``R_y @ mask @ R_x^T`` with no
    per-box work outside batched matmuls.

    Args:
        masks: ``[..., N, M, M]`` float mask probabilities (or logits, any values).
        boxes: ``[..., N, 4]`` ``(x1, y1, x2, y2)`` in the target image's pixels.
        height, width: target image size (ints or scalar int tensors).

    Returns:
        ``[..., N, height, width]`` float32 masks, zero outside each expanded box.
    """
    masks = tf.cast(masks, tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    mask_size = masks.shape[-1]
    padded_size = mask_size + 2 * padding
    pad = [[0, 0]] * (len(masks.shape) - 2) + [[padding, padding], [padding, padding]]
    masks = tf.pad(masks, pad)
    scale = padded_size / mask_size
    half_w = (boxes[..., 2] - boxes[..., 0]) * 0.5 * scale
    half_h = (boxes[..., 3] - boxes[..., 1]) * 0.5 * scale
    cx = (boxes[..., 2] + boxes[..., 0]) * 0.5
    cy = (boxes[..., 3] + boxes[..., 1]) * 0.5
    x1, x2 = _truncate(cx - half_w), _truncate(cx + half_w)
    y1, y2 = _truncate(cy - half_h), _truncate(cy + half_h)
    w = tf.maximum(x2 - x1 + 1.0, 1.0)
    h = tf.maximum(y2 - y1 + 1.0, 1.0)
    rows = _interpolation_matrix(y1, h, padded_size, height)  # [..., N, H, P]
    cols = _interpolation_matrix(x1, w, padded_size, width)  # [..., N, W, P]
    return tf.matmul(tf.matmul(rows, masks), cols, transpose_b=True)


def _paste_binary(masks, boxes, height, width, threshold):
    return tf.cast(paste_masks(masks, boxes, height, width) > threshold, tf.uint8)


# XLA fuses the last matmul with the threshold, so the float masks never reach memory.
_paste_binary_xla = tf.function(_paste_binary, jit_compile=True)


def paste_masks_binary(
    masks: tf.Tensor, boxes: tf.Tensor, height, width, threshold: float = 0.5, jit_compile: bool = False
) -> tf.Tensor:
    """``paste_masks(...) > threshold`` as uint8 ``[..., N, height, width]``.

    ``jit_compile=True`` runs it as one XLA computation (about twice as fast on the CPU; compiled
    once per image size).
    """
    fn = _paste_binary_xla if jit_compile else _paste_binary
    return fn(tf.cast(masks, tf.float32), tf.cast(boxes, tf.float32), height, width, tf.constant(threshold, tf.float32))
