"""Box-relative coverage masks ("mini masks") of COCO segmentations.

A coverage mask cuts an instance's box into an ``N x N`` grid (``N = mask_size``, default
:data:`MASK_SIZE`) and holds, per cell, the fraction of its area the instance's pixels cover,
times 255 (uint8). They are computed from the instance's full-resolution pixel mask, as
torchvision trains on: RLE masks (compressed or not) are decoded, polygons rasterised by
pycocotools (as ``COCO.annToMask``; only up to the box's bottom-right corner), and the pixels
inside the box averaged over each cell exactly (a summed-area table). Pixels outside the box are
dropped: none for RLE masks and boxes that are the masks' extent, up to half a pixel along the
edges for polygons (pycocotools sets pixels whose centre is inside, which can stick out of the
polygon's box). The masks are averaged at the file's resolution and scale with their box;
torchvision instead resizes its masks with the image by nearest neighbour (each new pixel takes
the old pixel under its top-left corner), which moves their edges by up to a resized pixel.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

MASK_SIZE = 128
"""Default side ``N`` of the box-relative coverage masks (see the module docstring)."""


def _prefix_sums(values: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Sums of ``values`` over ``[0, p)`` along ``axis`` for each ``p`` of ``positions`` (ints in ``[0, n]``)."""
    sums = np.cumsum(values, axis=axis, dtype=np.int32)
    sums = np.concatenate([np.zeros_like(np.take(sums, [0], axis=axis)), sums], axis=axis)
    return np.take(sums, positions, axis=axis)


def mini_mask(full_mask: np.ndarray, box: np.ndarray, mask_size: int = MASK_SIZE) -> np.ndarray:
    """Box-relative coverage mask of a full-resolution ``[H, W]`` mask: ``uint8 [N, N]``.

    Cell ``(i, j)`` covers ``[x1 + j w / N, x1 + (j + 1) w / N] x [y1 + i h / N, y1 + (i + 1) h / N]``
    of ``box`` (pixel ``(r, c)`` spans ``[c, c + 1] x [r, r + 1]``); its value is the fraction of
    that area inside the mask's nonzero pixels, times 255, rounded. Exact: the mask area
    above-left of a point is bilinear between pixel corners, so cells take it from the summed-area
    table at the corners around their edges. ``O(box area + N^2)``; pixels outside the box and
    the image are not represented.
    """
    height, width = full_mask.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    r0, r1 = min(max(math.floor(y1), 0), height), min(max(math.ceil(y2), 0), height)
    c0, c1 = min(max(math.floor(x1), 0), width), min(max(math.ceil(x2), 0), width)
    if r1 <= r0 or c1 <= c0 or x2 <= x1 or y2 <= y1:
        return np.zeros((mask_size, mask_size), np.uint8)
    fractions = np.arange(mask_size + 1, dtype=np.float64) / mask_size

    def taps(lo, hi, origin, size):  # summed-area table corners below each cell edge, weights
        edges = np.clip(lo + (hi - lo) * fractions - origin, 0.0, size)
        low = np.minimum(np.floor(edges).astype(np.int64), size - 1)
        return low, edges - low

    rows, fy = taps(y1, y2, r0, r1 - r0)
    cols, fx = taps(x1, x2, c0, c1 - c0)
    inside = np.asarray(full_mask[r0:r1, c0:c1]) != 0
    table = _prefix_sums(inside, np.concatenate([rows, rows + 1]), axis=0)  # [2 (N + 1), w]
    table = _prefix_sums(table, np.concatenate([cols, cols + 1]), axis=1).astype(np.float64)
    n = mask_size + 1
    top = table[:n, :n] * (1 - fx) + table[:n, n:] * fx
    bottom = table[n:, :n] * (1 - fx) + table[n:, n:] * fx
    corner = top * (1 - fy[:, None]) + bottom * fy[:, None]  # mask area above-left of each edge point
    area = corner[1:, 1:] - corner[:-1, 1:] - corner[1:, :-1] + corner[:-1, :-1]
    cell = (x2 - x1) * (y2 - y1) / (mask_size * mask_size)
    return np.round(np.clip(area / cell, 0.0, 1.0) * 255.0).astype(np.uint8)


def polygons_to_mini_mask(
    polygons: Sequence[Sequence[float]], box: np.ndarray, mask_size: int, height: float, width: float
) -> np.ndarray:
    """Coverage mask (:func:`mini_mask`) of COCO polygons in an image of ``height x width``.

    The polygons are rasterised by pycocotools at full resolution, as ``COCO.annToMask`` (and
    torchvision) does, but only up to the box's bottom-right corner (pycocotools' rasteriser
    gives the same pixels on a canvas cut there). ``height``/``width`` may be ``inf`` (unknown).
    """
    canvas_h = int(min(height, math.ceil(float(box[3]))))
    canvas_w = int(min(width, math.ceil(float(box[2]))))
    if canvas_h <= 0 or canvas_w <= 0:
        return np.zeros((mask_size, mask_size), np.uint8)
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], canvas_h, canvas_w)
    return mini_mask(mask_utils.decode(mask_utils.merge(rles)), box, mask_size)


def _valid_polygons(segmentation: Any) -> List[List[float]]:
    # pycocotools cannot rasterise polygons of fewer than 3 points (detectron2 drops them too).
    return [list(p) for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]


def _compressed_rle(segmentation: Mapping[str, Any]) -> Dict[str, Any]:
    """A COCO RLE (compressed, or uncompressed with a ``counts`` list) as a compressed RLE."""
    if isinstance(segmentation["counts"], list):
        h, w = segmentation["size"]
        return mask_utils.frPyObjects(dict(segmentation), h, w)
    return dict(segmentation)


def _decode_rle(segmentation: Mapping[str, Any]) -> np.ndarray:
    """Decode a compressed or uncompressed COCO RLE to ``uint8 [h, w]``."""
    return mask_utils.decode(_compressed_rle(segmentation))


def _check_segmentation_values(segmentation: Any, height: float, width: float) -> None:
    """Raise ``ValueError`` for segmentations that would give a wrong mask rather than none:
    non-finite polygon coordinates, or an RLE whose size is not the image's."""
    if isinstance(segmentation, dict):
        size = [int(v) for v in segmentation["size"]]
        if np.isfinite(height) and np.isfinite(width) and size != [int(height), int(width)]:
            raise ValueError(f"RLE size {size} differs from the image's [{int(height)}, {int(width)}]")
    elif isinstance(segmentation, list):
        for polygon in segmentation:
            if not np.all(np.isfinite(np.asarray(polygon, np.float64))):
                raise ValueError("a polygon has non-finite coordinates")


def annotation_mini_mask(
    segmentation: Any, box: np.ndarray, mask_size: int, height: float = np.inf, width: float = np.inf
) -> Optional[np.ndarray]:
    """Coverage mask ``uint8 [N, N]`` (:func:`mini_mask`) of a COCO ``segmentation`` for ``box``
    in an image of ``height x width``; None if it has none."""
    if isinstance(segmentation, dict):
        return mini_mask(_decode_rle(segmentation), box, mask_size)
    polygons = _valid_polygons(segmentation or [])
    if not polygons:
        return None
    return polygons_to_mini_mask(polygons, box, mask_size, height, width)
