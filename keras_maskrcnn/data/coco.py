"""COCO instance-segmentation input pipeline (``tf.data``) with box-relative coverage masks.

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

Coverage masks are computed from the instance's full-resolution pixel mask, as torchvision
trains on: RLE masks (compressed or not) are decoded, polygons rasterised by pycocotools (as
``COCO.annToMask``; only up to the box's bottom-right corner), and the pixels inside the box
averaged over each cell exactly (a summed-area table). Pixels outside the box are dropped:
none for RLE masks and boxes that are the masks' extent, up to half a pixel along the edges for
polygons (pycocotools sets pixels whose centre is inside, which can stick out of the polygon's
box). The masks are averaged at the file's resolution and scale with their box; torchvision
instead resizes its masks with the image by nearest neighbour (each new pixel takes the old
pixel under its top-left corner), which moves their edges by up to a resized pixel. ``iscrowd``
annotations are left out of the targets (COCO evaluation treats them as ignore regions;
torchvision and detectron2 drop them for training), as are annotations whose box, clipped to
the image, has zero area, or that have no segmentation.

Images are read with PIL (:func:`load_image`): greyscale and palette images become RGB, alpha
is dropped, 16-bit/float images are rescaled from their own ``[min, max]`` to ``[0, 255]``.
EXIF orientation is ignored, as by pycocotools and torchvision's ``CocoDetection``: COCO
annotations refer to the stored pixel grid, and a decoded size that differs from the
annotation file's ``height``/``width`` is reported as an error naming the file.

Bad input: :func:`keras_maskrcnn.data.validate.validate_coco` (``keras-maskrcnn validate``) lists
every problem of a dataset up front, with its file and annotation id, and says which of the
cases above (left out, clipped, converted) each one falls under; training runs it first. What
would otherwise give wrong targets (a non-finite box or polygon, an RLE of another size than its
image, an unknown category) raises ``ValueError`` naming the annotation, its image file and the
annotation file.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from keras_maskrcnn.data import categories

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# (image uint8 [H, W, 3], boxes float32 [n, 4] in original pixels, classes int32 [n],
#  coverage masks uint8 [n, N, N], image id) for one dataset index.
Example = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def load_image(path: PathLike) -> np.ndarray:
    """Read an image file as RGB ``uint8 [H, W, 3]``.

    Greyscale/palette/CMYK images are converted to RGB and alpha is dropped. 16-bit integer and
    float images (e.g. microscopy TIFFs) are rescaled linearly from their own ``[min, max]`` to
    ``[0, 255]``. EXIF orientation is ignored (as by pycocotools and torchvision), so pixels
    line up with COCO annotations made on the stored pixel grid.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: the file cannot be decoded (the message names it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path!r}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                return _gray_to_rgb(_rescale_to_uint8(np.asarray(image)))
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for bad files.
        raise ValueError(f"Cannot decode image file {path!r}: {e}") from e


def _rescale_to_uint8(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, np.uint8)
    return np.round((array - low) * (255.0 / (high - low))).astype(np.uint8)


def _gray_to_rgb(array: np.ndarray) -> np.ndarray:
    return np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array[..., :3]


def resized_size(
    height: Union[int, tf.Tensor], width: Union[int, tf.Tensor], min_size: int, max_size: Optional[int]
) -> Tuple[tf.Tensor, tf.Tensor]:
    """Size after torchvision's resize rule, as int32 scalars ``(new_height, new_width)``.

    ``scale = min(min_size / short_side, max_size / long_side)`` and ``new = floor(side * scale)``,
    both in float64 as torchvision computes them (Python floats).
    """
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    scale = tf.constant(float(min_size), tf.float64) / tf.minimum(h, w)
    if max_size is not None:
        scale = tf.minimum(scale, tf.constant(float(max_size), tf.float64) / tf.maximum(h, w))
    return tf.cast(tf.floor(h * scale), tf.int32), tf.cast(tf.floor(w * scale), tf.int32)


def resize_image(
    image: Union[np.ndarray, tf.Tensor], min_size: Optional[int] = 800, max_size: Optional[int] = 1333
) -> Tuple[tf.Tensor, tf.Tensor]:
    """Resize an ``[H, W, C]`` image so its short side is ``min_size`` (long side ``<= max_size``).

    Bilinear, half-pixel centres, no antialiasing (``tf.image.resize``), as torchvision's
    ``GeneralizedRCNNTransform``; size from :func:`resized_size`. ``min_size=None`` keeps the
    size. Works eagerly and in a graph.

    Returns:
        ``(resized, scale)``: float32 ``[h, w, C]`` (values in the input's range) and float32
        ``[2]`` ``(h / H, w / W)``, the factors that map original pixel coordinates (y, x) to
        resized ones.
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    if min_size is None:
        return tf.cast(image, tf.float32), tf.ones([2], tf.float32)
    new_h, new_w = resized_size(shape[0], shape[1], min_size, max_size)
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]), method="bilinear")
    scale = tf.cast(tf.stack([new_h, new_w]), tf.float32) / tf.cast(shape[:2], tf.float32)
    return resized, scale


# --------------------------------------------------------------------------------------------
# Box-relative coverage masks ("mini masks")
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# COCO annotation file
# --------------------------------------------------------------------------------------------


def read_json_file(path: PathLike, what: str) -> Any:
    """Parse a JSON file; a missing file or malformed JSON raises an error naming ``what`` and the path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what[0].upper() + what[1:]} not found: {path!r}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"Malformed JSON in {what} {path!r}: {e}") from e


def _read_annotation_json(annotation_file: str) -> Dict[str, Any]:
    data = read_json_file(annotation_file, "COCO annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"COCO annotation file {annotation_file!r} has no 'images' list.")
    for key in ("annotations", "categories"):
        if not isinstance(data.setdefault(key, []), list):
            raise ValueError(f"COCO annotation file {annotation_file!r}: {key!r} is not a list.")
    return data


class CocoSource:
    """A COCO instances file and its image folder: per-image images and coverage-mask targets.

    Keeps the category mapping used for training so evaluation can write category ids back:
    ``category_to_class`` (COCO category id -> contiguous 1-based class), ``class_to_category``
    and ``class_names`` (class id -> category name).

    Args:
        annotation_file: COCO instances JSON.
        image_dir: folder the images' ``file_name`` is relative to.
        image_ids: images to use, in this order; default all, sorted by id.
        check_files: check that every image file exists now (errors name the missing files).
    """

    def __init__(
        self,
        annotation_file: PathLike,
        image_dir: PathLike,
        image_ids: Optional[Sequence[int]] = None,
        check_files: bool = True,
    ):
        self.annotation_file = os.fspath(annotation_file)
        self.image_dir = os.fspath(image_dir)
        data = _read_annotation_json(self.annotation_file)
        self.coco = COCO()
        self.coco.dataset = data
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress.
                self.coco.createIndex()
            category_ids = [c["id"] for c in data["categories"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"Malformed COCO annotation file {self.annotation_file!r}: missing {e}") from e
        self.category_to_class = categories.category_to_class(category_ids)
        self.class_to_category = categories.class_to_category(category_ids)
        names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        self.class_names = {cls: names[cat] for cls, cat in self.class_to_category.items()}
        if image_ids is None:
            self.image_ids = sorted(self.coco.imgs)
        else:
            self.image_ids = [int(i) for i in image_ids]
            unknown = [i for i in self.image_ids if i not in self.coco.imgs]
            if unknown:
                raise ValueError(f"Image ids {unknown[:10]} are not in {self.annotation_file!r}.")
        if check_files:
            self._check_files()

    @property
    def num_classes(self) -> int:
        """Number of object classes (background excluded)."""
        return len(self.category_to_class)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: int) -> str:
        return os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"])

    def _check_files(self) -> None:
        missing = [p for p in map(self.image_path, self.image_ids) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image file(s) listed in {self.annotation_file!r} not found, "
                f"e.g. {missing[:5]}"
            )

    def load_image(self, image_id: int) -> np.ndarray:
        """The image as ``uint8 [H, W, 3]``, checked against the annotation file's size."""
        path = self.image_path(image_id)
        image = load_image(path)
        info = self.coco.imgs[image_id]
        expected = (info.get("height"), info.get("width"))
        if None not in expected and tuple(image.shape[:2]) != tuple(expected):
            raise ValueError(
                f"Image file {path!r} decodes to height x width {image.shape[0]} x {image.shape[1]} "
                f"but {self.annotation_file!r} says {expected[0]} x {expected[1]}."
            )
        return image

    def targets(self, image_id: int, mask_size: int = MASK_SIZE) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training targets of one image at its original size.

        Returns:
            ``boxes`` float32 ``[n, 4]`` (x1, y1, x2, y2), clipped to the image; ``classes`` int32
            ``[n]`` (contiguous, 1-based); ``masks`` uint8 ``[n, N, N]`` coverage masks. Crowd
            annotations, zero-area boxes and annotations without segmentation are left out.
        """
        info = self.coco.imgs[image_id]
        # Without a recorded size boxes cannot be clipped (COCO files always record it).
        height, width = info.get("height", np.inf), info.get("width", np.inf)
        boxes, classes, masks = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            try:
                box = self._annotation_box(ann, height, width)
                if box is None:
                    continue
                segmentation = ann.get("segmentation")
                _check_segmentation_values(segmentation, height, width)
                mask = annotation_mini_mask(segmentation, box, mask_size, height, width)
                if mask is None:
                    continue
                if ann.get("category_id") not in self.category_to_class:
                    raise ValueError(f"category_id {ann.get('category_id')!r} is not in 'categories'")
            except (ValueError, TypeError, KeyError, IndexError) as e:
                # Broken annotations are reported before training by keras_maskrcnn.data.validate;
                # should one get here, name it.
                raise ValueError(
                    f"Annotation {ann.get('id')} of image {image_id} ({self.image_path(image_id)!r}) in "
                    f"{self.annotation_file!r}: {e} (run `keras-maskrcnn validate` for all problems)"
                ) from e
            boxes.append(box)
            classes.append(self.category_to_class[ann["category_id"]])
            masks.append(mask)
        return (
            np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(classes, np.int32).reshape(-1),
            np.asarray(masks, np.uint8).reshape(-1, mask_size, mask_size),
        )

    @staticmethod
    def _annotation_box(ann: Mapping[str, Any], height: float, width: float) -> Optional[np.ndarray]:
        bbox = ann.get("bbox")
        if bbox is None:  # always present in COCO, but easy to recover from an RLE
            if not isinstance(ann.get("segmentation"), dict):
                return None
            bbox = mask_utils.toBbox(_compressed_rle(ann["segmentation"]))
        if not isinstance(bbox, (list, tuple, np.ndarray)) or len(bbox) != 4:
            raise ValueError(f"bbox must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise ValueError(f"bbox {list(bbox)} has non-finite values")
        box = np.array([x, y, x + w, y + h], np.float64)
        box[0::2] = np.clip(box[0::2], 0.0, width)
        box[1::2] = np.clip(box[1::2], 0.0, height)
        if box[2] <= box[0] or box[3] <= box[1]:
            return None
        return box.astype(np.float32)

    def example(self, index: int, mask_size: int = MASK_SIZE) -> Example:
        """``(image, boxes, classes, masks, image_id)`` of ``self.image_ids[index]``."""
        image_id = self.image_ids[index]
        return (self.load_image(image_id), *self.targets(image_id, mask_size), image_id)


# --------------------------------------------------------------------------------------------
# tf.data pipeline (shared with the synthetic dataset)
# --------------------------------------------------------------------------------------------


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


def _flip(image: tf.Tensor, boxes: tf.Tensor, masks: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Horizontal flip of an ``[H, W, 3]`` image, its ``[n, 4]`` boxes and ``[n, N, N]`` coverage masks."""
    width = tf.cast(tf.shape(image)[1], boxes.dtype)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    boxes = tf.stack([width - x2, y1, width - x1, y2], axis=-1)
    return tf.reverse(image, [1]), boxes, tf.reverse(masks, [2])


def _pad_to_multiple(image: tf.Tensor, divisor: int) -> tf.Tensor:
    size = tf.shape(image)[:2]
    padded = (size + divisor - 1) // divisor * divisor
    return tf.pad(image, [[0, padded[0] - size[0]], [0, padded[1] - size[1]], [0, 0]])


def _pad_instances(tensor: tf.Tensor, count: int) -> tf.Tensor:
    """Zero-pad the leading (instance) axis of ``tensor`` to exactly ``count`` rows."""
    rank = tensor.shape.rank
    paddings = [[0, count - tf.shape(tensor)[0]]] + [[0, 0]] * (rank - 1)
    padded = tf.pad(tensor, paddings)
    return tf.ensure_shape(padded, [count] + tensor.shape[1:].as_list())


def build_dataset(
    num_examples: int,
    load_example: Callable[[int], Example],
    batch_size: int,
    training: bool,
    min_size: Optional[int] = 800,
    max_size: Optional[int] = 1333,
    size_divisible: int = 32,
    mask_size: int = MASK_SIZE,
    max_instances: Optional[int] = 100,
    flip_probability: float = 0.5,
    shuffle: Optional[bool] = None,
    repeat: bool = False,
    seed: Optional[int] = None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """The ``tf.data`` pipeline behind :func:`coco_dataset` for any per-index example loader.

    ``load_example(index)`` returns :data:`Example` ``(image uint8 [H, W, 3], boxes float32
    [n, 4] original pixels, classes int32 [n], masks uint8 [n, N, N], image_id)``; it runs in
    ``tf.numpy_function`` inside a parallel ``map``. Flips are decided by stateless random ops
    seeded from ``Dataset.random(seed)``, so the output is reproducible given ``seed``.
    """
    if shuffle is None:
        shuffle = training
    load = _truncating(load_example, max_instances)

    def load_numpy(index):
        image, boxes, classes, masks, image_id = load(int(index))
        return (
            np.asarray(image, np.uint8),
            np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(classes, np.int32).reshape(-1),
            np.asarray(masks, np.uint8).reshape(-1, mask_size, mask_size),
            np.int64(image_id),
        )

    def prepare(index, random_seed):
        image, boxes, classes, masks, image_id = tf.numpy_function(
            load_numpy, [index], [tf.uint8, tf.float32, tf.int32, tf.uint8, tf.int64], stateful=False
        )
        image = tf.ensure_shape(image, [None, None, 3])
        boxes = tf.ensure_shape(boxes, [None, 4])
        classes = tf.ensure_shape(classes, [None])
        masks = tf.ensure_shape(masks, [None, mask_size, mask_size])
        image_id = tf.ensure_shape(image_id, [])
        original_size = tf.shape(image)[:2]
        if training and flip_probability > 0:
            seed_pair = tf.stack([random_seed, tf.constant(0, tf.int64)])
            flip = tf.random.stateless_uniform([], seed=seed_pair) < flip_probability
            image, boxes, masks = tf.cond(
                flip, lambda: _flip(image, boxes, masks), lambda: (image, boxes, masks)
            )
        image, scale = resize_image(image, min_size, max_size)
        boxes = boxes * tf.tile(tf.reverse(scale, [0]), [2])  # (sx, sy, sx, sy)
        inputs = {"images": _pad_to_multiple(image, size_divisible), "image_sizes": tf.shape(image)[:2]}
        if not training:
            inputs.update(image_ids=image_id, original_sizes=original_size, scales=scale)
        if max_instances is not None:
            boxes, classes, masks = (_pad_instances(t, max_instances) for t in (boxes, classes, masks))
        return inputs, {"boxes": boxes, "classes": classes, "masks": masks}

    dataset = tf.data.Dataset.range(num_examples)
    if shuffle:
        dataset = dataset.shuffle(max(num_examples, 1), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    dataset = tf.data.Dataset.zip((dataset, randoms))
    dataset = dataset.map(prepare, num_parallel_calls=num_parallel_calls)
    dataset = dataset.padded_batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)


def coco_dataset(
    annotation_file: Union[PathLike, CocoSource],
    image_dir: Optional[PathLike],
    batch_size: int,
    training: bool,
    min_size: Optional[int] = 800,
    max_size: Optional[int] = 1333,
    size_divisible: int = 32,
    mask_size: int = MASK_SIZE,
    max_instances: Optional[int] = 100,
    flip_probability: float = 0.5,
    shuffle: Optional[bool] = None,
    repeat: bool = False,
    image_ids: Optional[Sequence[int]] = None,
    seed: Optional[int] = None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    drop_remainder: bool = False,
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
        min_size, max_size: resize rule (torchvision): short side ``min_size`` unless the long
            side would exceed ``max_size``. ``min_size=None`` keeps the original size.
        size_divisible: batch images are zero-padded to a multiple of this.
        mask_size: side ``N`` of the coverage masks (the mask targets' error shrinks about as
            ``1 / N``, see :func:`keras_maskrcnn.targets.mask_targets`; memory grows as ``N^2``).
        max_instances: fixed instance axis ``G`` (extra instances dropped, warned once), or None
            for per-batch padding.
        flip_probability: horizontal flip probability (training only).
        shuffle: shuffle images every epoch; default ``training``.
        repeat: repeat indefinitely.
        image_ids: images to use, in this order; default all, sorted by id.
        seed: seed for shuffling and flips (reproducible output when set).
        num_parallel_calls: parallelism of the loading ``map``.
        drop_remainder: drop a last partial batch (static batch dimension).

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
    )
    dataset.coco_source = dataset.source = source
    return dataset
