"""Box format, coordinate conventions and box arithmetic, stated once for the whole package.

Conventions (every module follows these):

* A box is ``(x1, y1, x2, y2)`` in **pixels of the image the tensor refers to**, float32,
  in continuous coordinates: pixel ``(row i, column j)`` covers ``[j, j + 1) x [i, i + 1)``, so
  a box covering the whole ``H x W`` image is ``(0, 0, W, H)``. Width is ``x2 - x1`` (no ``+ 1``),
  as in torchvision and COCO (a COCO ``bbox`` ``[x, y, w, h]`` is ``(x, y, x + w, y + h)``).
* Images are ``[B, H, W, 3]`` RGB (channels last), values in ``[0, 255]``.
* Class ids inside the model are contiguous and 1-based; ``0`` is background (and padding).
* Padded rows of box tensors are all zeros and come with a validity mask or a count.
* Box regression deltas are ``(dx, dy, dw, dh)`` as in Faster R-CNN, scaled by per-coordinate
  weights ``(wx, wy, ww, wh)``: ``(1, 1, 1, 1)`` for the RPN and ``(10, 10, 5, 5)`` for the RoI head.
"""
from __future__ import annotations

import math
from typing import Sequence

import keras
import tensorflow as tf

# torchvision's bound on exp(dw), exp(dh) when decoding: boxes at most 1000/16 times the anchor.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes: tf.Tensor) -> tf.Tensor:
    """Area of ``[..., 4]`` boxes, ``[...]``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes1: tf.Tensor, boxes2: tf.Tensor) -> tf.Tensor:
    """IoU of every box in ``boxes1 [..., N, 4]`` with every box in ``boxes2 [..., M, 4]``.

    Returns ``[..., N, M]``; pairs whose union is empty get IoU 0.
    """
    area1 = box_area(boxes1)[..., :, None]
    area2 = box_area(boxes2)[..., None, :]
    lt = tf.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = tf.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = tf.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    return tf.math.divide_no_nan(inter, union)


def clip_boxes(boxes: tf.Tensor, image_size: tf.Tensor) -> tf.Tensor:
    """Clip ``[B, N, 4]`` boxes to images of size ``image_size [B, 2]`` (height, width)."""
    image_size = tf.cast(image_size, boxes.dtype)
    h = image_size[:, None, 0]
    w = image_size[:, None, 1]
    x1 = tf.clip_by_value(boxes[..., 0], 0.0, w)
    y1 = tf.clip_by_value(boxes[..., 1], 0.0, h)
    x2 = tf.clip_by_value(boxes[..., 2], 0.0, w)
    y2 = tf.clip_by_value(boxes[..., 3], 0.0, h)
    return tf.stack([x1, y1, x2, y2], axis=-1)


def small_box_mask(boxes: tf.Tensor, min_size: float) -> tf.Tensor:
    """``True`` where both sides of a ``[..., 4]`` box are at least ``min_size``."""
    return tf.logical_and(boxes[..., 2] - boxes[..., 0] >= min_size, boxes[..., 3] - boxes[..., 1] >= min_size)


def encode_boxes(
    boxes: tf.Tensor, reference: tf.Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> tf.Tensor:
    """Regression targets ``(dx, dy, dw, dh)`` that turn ``reference`` boxes into ``boxes``.

    Both ``[..., 4]`` in the same pixel frame; returns ``[..., 4]``. Exact inverse of
    :func:`decode_boxes` (while the decode clip is inactive).
    """
    wx, wy, ww, wh = weights
    ref_w = reference[..., 2] - reference[..., 0]
    ref_h = reference[..., 3] - reference[..., 1]
    ref_cx = reference[..., 0] + 0.5 * ref_w
    ref_cy = reference[..., 1] + 0.5 * ref_h
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    cx = boxes[..., 0] + 0.5 * w
    cy = boxes[..., 1] + 0.5 * h
    dx = wx * (cx - ref_cx) / ref_w
    dy = wy * (cy - ref_cy) / ref_h
    dw = ww * tf.math.log(w / ref_w)
    dh = wh * tf.math.log(h / ref_h)
    return tf.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(
    deltas: tf.Tensor,
    reference: tf.Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = BBOX_XFORM_CLIP,
) -> tf.Tensor:
    """Apply ``deltas [..., 4]`` to ``reference [..., 4]`` boxes (torchvision's ``BoxCoder.decode``).

    ``dw`` and ``dh`` are clipped at ``clip`` before ``exp``. Computed in float32.
    """
    deltas = tf.cast(deltas, tf.float32)
    reference = tf.cast(reference, tf.float32)
    wx, wy, ww, wh = weights
    ref_w = reference[..., 2] - reference[..., 0]
    ref_h = reference[..., 3] - reference[..., 1]
    ref_cx = reference[..., 0] + 0.5 * ref_w
    ref_cy = reference[..., 1] + 0.5 * ref_h
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = tf.minimum(deltas[..., 2] / ww, clip)
    dh = tf.minimum(deltas[..., 3] / wh, clip)
    cx = dx * ref_w + ref_cx
    cy = dy * ref_h + ref_cy
    half_w = 0.5 * tf.exp(dw) * ref_w
    half_h = 0.5 * tf.exp(dh) * ref_h
    return tf.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


def coco_to_xyxy(bbox: tf.Tensor) -> tf.Tensor:
    """COCO ``[x, y, w, h]`` to ``(x1, y1, x2, y2)``."""
    return tf.concat([bbox[..., :2], bbox[..., :2] + bbox[..., 2:]], axis=-1)


def xyxy_to_coco(boxes: tf.Tensor) -> tf.Tensor:
    """``(x1, y1, x2, y2)`` to COCO ``[x, y, w, h]``."""
    return tf.concat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class BoxCoder:
    """Encodes boxes as ``(dx, dy, dw, dh)`` deltas from reference boxes and decodes them back
    (torchvision's ``BoxCoder``), with its per-coordinate ``weights`` and the ``clip`` on ``dw``, ``dh``.

    The RPN uses weights ``(1, 1, 1, 1)``, the RoI heads ``(10, 10, 5, 5)``. Serialisable with
    ``keras.saving.serialize_keras_object``.

    Example:
        >>> coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        >>> deltas = coder.encode(boxes, proposals)  # both [..., 4] (x1, y1, x2, y2)
        >>> coder.decode(deltas, proposals)  # == boxes
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), clip: float = BBOX_XFORM_CLIP):
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights must be four numbers (wx, wy, ww, wh), got {weights!r}.")
        self.weights = tuple(float(w) for w in weights)
        self.clip = float(clip)

    def encode(self, boxes: tf.Tensor, reference: tf.Tensor) -> tf.Tensor:
        """Deltas ``[..., 4]`` that turn ``reference`` into ``boxes`` (:func:`encode_boxes`)."""
        return encode_boxes(boxes, reference, self.weights)

    def decode(self, deltas: tf.Tensor, reference: tf.Tensor) -> tf.Tensor:
        """Boxes ``[..., 4]`` float32 from ``deltas`` applied to ``reference`` (:func:`decode_boxes`)."""
        return decode_boxes(deltas, reference, self.weights, self.clip)

    def get_config(self) -> dict:
        return {"weights": list(self.weights), "clip": self.clip}

    @classmethod
    def from_config(cls, config: dict) -> "BoxCoder":
        return cls(**config)

    def __eq__(self, other) -> bool:
        return isinstance(other, BoxCoder) and (self.weights, self.clip) == (other.weights, other.clip)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, clip={self.clip:.4f})"
