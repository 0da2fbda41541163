"""Checks of the annotations of a COCO dataset, for :func:`keras_maskrcnn.data.validate.validate_coco`.

Each check reports through ``report(severity, message, file=None, annotation_id=None,
image_id=None)`` and says whether the pipeline (:mod:`keras_maskrcnn.data.coco`) keeps what it
checked; the table in :mod:`keras_maskrcnn.data.validate` lists what is an error and what a warning.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Optional, Set, Tuple

import numpy as np

# How far (pixels) a box or polygon may stick out of its image before it is worth a warning:
# COCO-style files routinely round coordinates a little past the border.
OUTSIDE_TOLERANCE = 1.0
Report = Callable[..., None]
ImageInfo = Dict[int, Tuple[str, Optional[int], Optional[int]]]  # image id -> (path, height, width)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def as_int(value: Any) -> Optional[int]:
    """``value`` as an int when it is an integer (or an integral float), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def numbers(values: Any) -> Optional[np.ndarray]:
    """``values`` as a float64 array when it is a flat list of numbers, else None."""
    if not isinstance(values, (list, tuple)):
        return None
    if not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values):
        return None
    return np.asarray(values, np.float64)


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


# --------------------------------------------------------------------------------------------
# Boxes and masks
# --------------------------------------------------------------------------------------------


def check_bbox(bbox: Any, height: Optional[int], width: Optional[int], report: Report) -> bool:
    """Report the bbox's problems; True when the pipeline keeps the annotation's box."""
    values = numbers(bbox)
    if values is None or values.shape != (4,):
        report("error", f"bbox must be [x, y, width, height] (4 numbers), got {bbox!r}")
        return False
    if not np.all(np.isfinite(values)):
        report("error", f"bbox {_fmt(values)} has non-finite values")
        return False
    x, y, w, h = values
    if w <= 0 or h <= 0:
        report("warning", f"bbox {_fmt(values)} has zero area (width or height <= 0): the annotation is left out")
        return False
    if height is None or width is None:
        return True
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        report("warning", f"bbox {_fmt(values)} lies outside the {height} x {width} image: the annotation is left out")
        return False
    t = OUTSIDE_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        report("warning", f"bbox {_fmt(values)} extends outside the {height} x {width} image: it is clipped")
    return True


def _polygon_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def check_polygons(polygons: list, height: Optional[int], width: Optional[int], report: Report) -> bool:
    """Report the polygons' problems; True when at least one usable polygon is left."""
    usable = 0
    for k, polygon in enumerate(polygons):
        values = numbers(polygon)
        if values is None:
            report("error", f"polygon {k} is not a list of numbers")
            continue
        if not np.all(np.isfinite(values)):
            report("error", f"polygon {k} has non-finite coordinates")
            continue
        if len(values) % 2:
            report("warning", f"polygon {k} has an odd number of coordinates ({len(values)}): it is left out")
            continue
        if len(values) < 6:
            report(
                "warning",
                f"polygon {k} has {len(values) // 2} point(s), fewer than 3: it is left out (pycocotools cannot "
                "rasterise it)",
            )
            continue
        usable += 1
        xy = values.reshape(-1, 2)
        if _polygon_area(xy) == 0.0:
            report("warning", f"polygon {k} has zero area: the mask is empty")
            continue
        if height is None or width is None:
            continue
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        if hi[0] <= 0 or hi[1] <= 0 or lo[0] >= width or lo[1] >= height:
            report("warning", f"polygon {k} lies outside the {height} x {width} image: the mask is empty")
        elif lo[0] < -OUTSIDE_TOLERANCE or lo[1] < -OUTSIDE_TOLERANCE or hi[0] > width + OUTSIDE_TOLERANCE \
                or hi[1] > height + OUTSIDE_TOLERANCE:
            report("warning", f"polygon {k} extends outside the {height} x {width} image: it is clipped")
    if not usable:
        report("warning", "no usable polygon (see above): the annotation is left out")
    return usable > 0


def check_rle(rle: dict, height: Optional[int], width: Optional[int], report: Report) -> bool:
    """Report the RLE's problems; True when it decodes."""
    from pycocotools import mask as mask_utils

    size = rle.get("size")
    counts = rle.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(as_int(v) is not None and as_int(v) >= 0 for v in size)):
        report("error", f"RLE 'size' must be [height, width], got {size!r}")
        return False
    h, w = (as_int(v) for v in size)
    if height is not None and width is not None and (h, w) != (height, width):
        report("error", f"RLE size [{h}, {w}] differs from the image's [{height}, {width}]")
        return False
    try:
        if isinstance(counts, list):
            values = numbers(counts)
            if values is None or not np.all(values >= 0) or not np.all(values == np.round(values)):
                report("error", "RLE 'counts' must be a list of non-negative integers or an RLE string")
                return False
            if int(values.sum()) != h * w:
                report("error", f"uncompressed RLE counts add up to {int(values.sum())}, not height x width = {h * w}")
                return False
            compressed = mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
        elif isinstance(counts, (str, bytes)):
            compressed = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            report("error", f"RLE 'counts' must be a list of integers or a string, got {type(counts).__name__}")
            return False
        mask = mask_utils.decode(compressed)
    except Exception as e:  # pycocotools raises assorted errors on corrupt strings
        report("error", f"the RLE cannot be decoded: {e}")
        return False
    if mask.shape[:2] != (h, w):
        report("error", f"the RLE decodes to {mask.shape[0]} x {mask.shape[1]}, not its size {h} x {w}")
        return False
    if not mask.any():
        report("warning", "the RLE mask is empty")
    return True


def check_segmentation(segmentation: Any, height, width, report: Report) -> bool:
    """Report the segmentation's problems; True when the pipeline gets a mask from it."""
    if isinstance(segmentation, dict):
        return check_rle(segmentation, height, width, report)
    if segmentation is None or (isinstance(segmentation, list) and not segmentation):
        report("warning", "no segmentation: the annotation is left out of training")
        return False
    if isinstance(segmentation, list):
        return check_polygons(segmentation, height, width, report)
    report("error", f"segmentation must be a list of polygons or an RLE object, got {type(segmentation).__name__}")
    return False


# --------------------------------------------------------------------------------------------
# Whole annotations
# --------------------------------------------------------------------------------------------


def _check_annotation_box(bbox: Any, segmentation: Any, crowd: bool, height, width, report: Report) -> bool:
    """Report the annotation's box problems; True when the pipeline has a box for it."""
    if bbox is None:
        box_ok = isinstance(segmentation, dict)  # the pipeline recovers it from an RLE
        if not box_ok and not crowd:
            report("warning", "no 'bbox' (and no RLE to recover it from): the annotation is left out")
        return box_ok
    if crowd:
        values = numbers(bbox)
        box_ok = values is not None and values.shape == (4,) and bool(np.all(np.isfinite(values)))
        if not box_ok:
            report("error", f"bbox must be 4 finite numbers [x, y, width, height], got {bbox!r}")
        return box_ok
    return check_bbox(bbox, height, width, report)


def _check_annotation(
    index: int, ann: Any, seen_ids: Set[Any], image_info: ImageInfo, category_names: Dict[int, str],
    annotation_file: str, report: Report,
) -> Optional[int]:
    """Report the problems of ``annotations[index]``; its category id when training learns from it."""
    if not isinstance(ann, dict):
        label = f"annotations[{index}]"
        report("error", f"{label} is not an object", annotation_file, annotation_id=label)
        return None
    ann_id = ann.get("id")
    label = ann_id if ann_id is not None else f"annotations[{index}]"
    image_id = as_int(ann.get("image_id"))
    path, height, width = image_info.get(image_id, (annotation_file, None, None))

    def here(severity, message):
        report(severity, message, path, annotation_id=label, image_id=ann.get("image_id"))

    if ann_id is None:
        here("error", "the annotation has no 'id' (pycocotools cannot index it)")
    elif ann_id in seen_ids:
        here("warning", "duplicate annotation id: pycocotools' index keeps only one of them, so COCO "
             "evaluation would not see the others")
    else:
        seen_ids.add(ann_id)
    if "image_id" not in ann:
        here("error", "the annotation has no 'image_id'")
        return None
    if image_id not in image_info:
        here("warning", f"image id {ann.get('image_id')!r} is not in 'images': the annotation is ignored")
        return None
    category_id = as_int(ann.get("category_id"))
    if category_id is None:
        here("error", f"'category_id' must be an integer, got {ann.get('category_id')!r}")
    elif category_id not in category_names:
        here("error", f"category_id {category_id} is not in 'categories'")
    crowd = bool(ann.get("iscrowd", 0))
    segmentation = ann.get("segmentation")
    box_ok = _check_annotation_box(ann.get("bbox"), segmentation, crowd, height, width, here)
    if crowd:
        # Left out of training; COCO evaluation uses the region, so it must still be readable.
        if segmentation is not None and segmentation != []:
            check_segmentation(segmentation, height, width, here)
        return None
    mask_ok = check_segmentation(segmentation, height, width, here)
    return category_id if box_ok and mask_ok and category_id in category_names else None


def check_annotations(
    annotations: Iterable[Any], image_info: ImageInfo, category_names: Dict[int, str], annotation_file: str,
    report: Report,
) -> Set[int]:
    """Report the problems of every annotation; returns the categories training learns from."""
    seen_ids: Set[Any] = set()
    trained_categories: Set[int] = set()
    for index, ann in enumerate(annotations):
        category_id = _check_annotation(index, ann, seen_ids, image_info, category_names, annotation_file, report)
        if category_id is not None:
            trained_categories.add(category_id)
    return trained_categories
