"""Reading a COCO dataset from disk: image files (:func:`load_image`) and the instances file
(:class:`CocoSource`: per-image images and coverage-mask targets, the category mapping).

Images are read with PIL (:func:`load_image`): greyscale and palette images become RGB, alpha
is dropped, 16-bit/float images are rescaled from their own ``[min, max]`` to ``[0, 255]``.
EXIF orientation is ignored, as by pycocotools and torchvision's ``CocoDetection``: COCO
annotations refer to the stored pixel grid, and a decoded size that differs from the
annotation file's ``height``/``width`` is reported as an error naming the file.

``iscrowd`` annotations are left out of the targets (COCO evaluation treats them as ignore
regions; torchvision and detectron2 drop them for training), as are annotations whose box,
clipped to the image, has zero area, or that have no segmentation.

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
import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from keras_maskrcnn.data import categories
from keras_maskrcnn.data.masks import MASK_SIZE, _check_segmentation_values, _compressed_rle, annotation_mini_mask

from keras_maskrcnn.data.pipeline import Example

PathLike = Union[str, "os.PathLike[str]"]


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
