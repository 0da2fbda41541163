"""A built-in synthetic instance-segmentation dataset: coloured shapes on textured backgrounds.

Needs no files: images are generated on the fly, deterministically from ``(seed, index)``, so a
held-out set is the same generator with another seed. Classes (contiguous, 1-based, equal to
the COCO category ids written by :meth:`SyntheticShapes.write_coco`)::

    1 ellipse   2 rectangle   3 triangle   4 ring (ellipse with a hole)   5 cross

Each image has a gradient, stripe or blotchy-noise background plus pixel noise, and
``instances_per_image`` shapes of random class, size (``object_size`` pixels across at
256 x 256, scaled with the image's short side), rotation and colour (shaded, noisy). Masks are
exact (pixel ``(i, j)`` belongs to a shape when its centre ``(j + 0.5, i + 0.5)`` does); later
shapes occlude earlier ones, and a shape is not placed when it would leave an earlier one with
a tiny visible area, so every instance stays recognisable and every visible shape pixel is
annotated. Boxes are the extents of the visible masks. Generation is vectorised numpy, a few
milliseconds per 256 x 256 image.

:func:`synthetic_dataset` yields exactly the element structure of
:func:`keras_maskrcnn.data.coco.coco_dataset`; :meth:`SyntheticShapes.write_coco` writes the
same images as a COCO instances JSON (compressed RLE masks) plus PNG folder, so the COCO
pipeline, evaluation and CLI can be exercised on it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils

from keras_maskrcnn.data import categories
from keras_maskrcnn.data.loading import PathLike
from keras_maskrcnn.data.masks import MASK_SIZE, mini_mask
from keras_maskrcnn.data.pipeline import Example, build_dataset

SHAPE_NAMES = ("ellipse", "rectangle", "triangle", "ring", "cross")


@dataclasses.dataclass
class SyntheticImage:
    """One generated image and its instances.

    Attributes:
        image: uint8 ``[H, W, 3]`` RGB.
        label_map: int32 ``[H, W]``; 0 is background, ``k`` is instance ``k - 1``.
        boxes: float32 ``[n, 4]`` ``(x1, y1, x2, y2)``, the extents of the visible masks.
        classes: int32 ``[n]``, 1-based.
    """

    image: np.ndarray
    label_map: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray

    @property
    def masks(self) -> np.ndarray:
        """Full-image visible masks, bool ``[n, H, W]``."""
        ids = np.arange(1, len(self.boxes) + 1, dtype=np.int32)
        return self.label_map[None] == ids[:, None, None]

    def mini_masks(self, mask_size: int = MASK_SIZE) -> np.ndarray:
        """Box-relative coverage masks uint8 ``[n, N, N]`` (:func:`~keras_maskrcnn.data.coco.mini_mask`)
        of the visible masks, computed on each box's window of the label map."""
        out = np.zeros((len(self.boxes), mask_size, mask_size), np.uint8)
        for k, box in enumerate(self.boxes):
            x1, y1, x2, y2 = (int(v) for v in box)  # the masks' extents: whole pixels
            window = self.label_map[y1:y2, x1:x2] == k + 1
            out[k] = mini_mask(window, np.array([0, 0, x2 - x1, y2 - y1], np.float64), mask_size)
        return out


# --------------------------------------------------------------------------------------------
# Rendering helpers (all on pixel-centre grids)
# --------------------------------------------------------------------------------------------


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, size=3).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Textured float32 ``[H, W, 3]`` background: gradient, stripes or blotchy noise."""
    ys = (np.arange(height, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(width, dtype=np.float32) + 0.5)[None, :]
    kind = rng.integers(3)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    if kind < 2:
        angle = rng.uniform(0.0, np.pi)
        proj = xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))
        if kind == 0:  # linear gradient across the image
            t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1.0)
        else:  # stripes, from soft to hard
            period = rng.uniform(0.03, 0.15) * min(height, width)
            t = 0.5 + 0.5 * np.sin(proj * np.float32(2.0 * np.pi / period))
            t = np.clip((t - 0.5) * np.float32(rng.uniform(1.0, 6.0)) + 0.5, 0.0, 1.0)
        image = c0 + t[..., None] * (c1 - c0)
    else:  # blotches: a coarse random colour grid, bilinearly upsampled
        grid = np.clip(c0 + rng.normal(0.0, 45.0, size=(rng.integers(3, 10), rng.integers(3, 10), 3)), 0, 255)
        rows = np.tensordot(_interp_matrix(height, grid.shape[0]), grid.astype(np.float32), axes=(1, 0))
        image = np.matmul(_interp_matrix(width, grid.shape[1]), rows)  # [H, W, 3]
    # Grey uniform noise: much cheaper than per-channel Gaussian noise, and as good a texture.
    noise = rng.random(size=(height, width, 1), dtype=np.float32) - np.float32(0.5)
    return image + noise * np.float32(rng.uniform(5.0, 30.0))


def _interp_matrix(size: int, coarse: int) -> np.ndarray:
    """``[size, coarse]`` weights of linear interpolation from ``coarse`` samples to ``size``."""
    positions = (np.arange(size) + 0.5) / size * (coarse - 1)
    low = np.clip(np.floor(positions).astype(np.int64), 0, coarse - 2)
    frac = (positions - low).astype(np.float32)
    matrix = np.zeros((size, coarse), np.float32)
    matrix[np.arange(size), low] = 1.0 - frac
    matrix[np.arange(size), low + 1] = frac
    return matrix


def _shape_mask(
    rng: np.random.Generator, shape_class: int, u: np.ndarray, v: np.ndarray, radius: float
) -> np.ndarray:
    """Bool mask of a shape inside the circle of ``radius`` around the origin of the rotated
    coordinates ``(u, v)`` (pixel centres relative to the shape's centre)."""
    name = SHAPE_NAMES[shape_class - 1]
    if name in ("ellipse", "ring"):
        b = radius * rng.uniform(0.5, 1.0) if name == "ellipse" else radius * rng.uniform(0.75, 1.0)
        r2 = (u / radius) ** 2 + (v / b) ** 2
        if name == "ellipse":
            return r2 <= 1.0
        hole = rng.uniform(0.4, 0.65)
        return (r2 <= 1.0) & (r2 > hole * hole)
    if name == "rectangle":
        ratio = rng.uniform(0.4, 1.0)
        a = radius / np.sqrt(1.0 + ratio * ratio)
        return (np.abs(u) <= a) & (np.abs(v) <= a * ratio)
    if name == "triangle":
        angles = np.arange(3) * (2.0 * np.pi / 3.0) + rng.uniform(-0.3, 0.3, size=3)
        px = radius * rng.uniform(0.8, 1.0, size=3) * np.cos(angles)
        py = radius * rng.uniform(0.8, 1.0, size=3) * np.sin(angles)
        # Counter-clockwise vertices: inside where every edge's cross product is >= 0.
        inside = np.ones(u.shape, bool)
        for k in range(3):
            x0, y0, x1, y1 = px[k], py[k], px[(k + 1) % 3], py[(k + 1) % 3]
            inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
        return inside
    # cross: two perpendicular bars whose corners stay inside the circle
    half = radius * rng.uniform(0.2, 0.3)
    long = np.sqrt(radius * radius - half * half)
    return ((np.abs(u) <= long) & (np.abs(v) <= half)) | ((np.abs(v) <= long) & (np.abs(u) <= half))


class SyntheticShapes:
    """Generator of synthetic instance-segmentation images (see the module docstring).

    Args:
        image_size: ``(height, width)``.
        num_classes: number of shape classes used, 1..5 (classes ``1..num_classes``).
        instances_per_image: inclusive range of shapes attempted per image.
        object_size: inclusive range of shape diameters in pixels at 256 x 256 (scaled with the
            image's short side).
        min_visible_fraction: a shape is not placed if it would leave an earlier one with less
            than this fraction of its area visible (or fewer than ``min_visible_pixels``).
        min_visible_pixels: minimum visible area of every instance.
        seed: image ``index`` is generated from ``np.random.default_rng([seed, index])``.
    """

    def __init__(
        self,
        image_size: Tuple[int, int] = (256, 256),
        num_classes: int = 3,
        instances_per_image: Tuple[int, int] = (1, 8),
        object_size: Tuple[float, float] = (16.0, 120.0),
        min_visible_fraction: float = 0.3,
        min_visible_pixels: int = 20,
        seed: int = 0,
    ):
        if not 1 <= num_classes <= len(SHAPE_NAMES):
            raise ValueError(f"num_classes must be in 1..{len(SHAPE_NAMES)}, got {num_classes}.")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.num_classes = int(num_classes)
        self.instances_per_image = (int(instances_per_image[0]), int(instances_per_image[1]))
        scale = min(self.image_size) / 256.0
        self.object_size = (float(object_size[0]) * scale, float(object_size[1]) * scale)
        self.min_visible_fraction = float(min_visible_fraction)
        self.min_visible_pixels = int(min_visible_pixels)
        self.seed = int(seed)
        category_ids = list(range(1, self.num_classes + 1))
        self.category_to_class = categories.category_to_class(category_ids)
        self.class_to_category = categories.class_to_category(category_ids)
        self.class_names = {k: SHAPE_NAMES[k - 1] for k in category_ids}

    @property
    def coco_categories(self) -> List[Dict[str, Any]]:
        """The ``categories`` list of the COCO file written by :meth:`write_coco`."""
        return [{"id": k, "name": name, "supercategory": "shape"} for k, name in self.class_names.items()]

    def sample(self, index: int) -> SyntheticImage:
        """Generate image ``index`` (deterministic given ``seed`` and ``index``)."""
        rng = np.random.default_rng([self.seed, int(index)])
        height, width = self.image_size
        image = _background(rng, height, width)
        label = np.zeros((height, width), np.int32)
        visible = [0]  # visible pixels per instance id (0 = background, unused)
        needed = [0]  # minimum visible pixels per instance id
        windows: List[Tuple[slice, slice]] = [(slice(0), slice(0))]
        classes: List[int] = []
        target = rng.integers(self.instances_per_image[0], self.instances_per_image[1] + 1)
        for _ in range(4 * target):
            if len(classes) == target:
                break
            shape_class, window, mask = self._random_shape(rng)
            colour, shading = self._shape_colour(rng, image[window], mask.shape)
            area = int(mask.sum())
            if area < self.min_visible_pixels:
                continue
            lost = np.bincount(label[window][mask], minlength=len(visible))
            remaining = np.asarray(visible) - lost
            if np.any(remaining[1:] < np.asarray(needed[1:])):
                continue  # would hide an earlier shape almost completely
            visible = remaining.tolist() + [area]
            needed.append(max(self.min_visible_pixels, self.min_visible_fraction * area))
            windows.append(window)
            classes.append(shape_class)
            label[window][mask] = len(classes)
            image[window][mask] = (colour + shading)[mask]
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
        boxes = np.array([self._extent(label, k, windows[k]) for k in range(1, len(classes) + 1)], np.float32)
        return SyntheticImage(image, label, boxes.reshape(-1, 4), np.asarray(classes, np.int32))

    def _random_shape(self, rng: np.random.Generator) -> Tuple[int, Tuple[slice, slice], np.ndarray]:
        """A random shape: its class, image window ``(rows, cols)`` and bool mask on that window."""
        height, width = self.image_size
        shape_class = int(rng.integers(1, self.num_classes + 1))
        radius = 0.5 * rng.uniform(*self.object_size)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        window = (
            slice(max(int(np.floor(cy - radius)), 0), min(int(np.ceil(cy + radius)), height)),
            slice(max(int(np.floor(cx - radius)), 0), min(int(np.ceil(cx + radius)), width)),
        )
        dy = (np.arange(window[0].start, window[0].stop, dtype=np.float32) + 0.5 - cy)[:, None]
        dx = (np.arange(window[1].start, window[1].stop, dtype=np.float32) + 0.5 - cx)[None, :]
        angle = rng.uniform(0.0, np.pi)
        cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        mask = _shape_mask(rng, shape_class, dx * cos + dy * sin, dy * cos - dx * sin, radius)
        return shape_class, window, mask

    @staticmethod
    def _shape_colour(rng: np.random.Generator, background: np.ndarray, shape: Tuple[int, int]):
        """A colour far from the local background, and a shaded, noisy float32 fill ``[h, w, 3]``."""
        mean = background.reshape(-1, 3).mean(axis=0) if background.size else np.zeros(3, np.float32)
        for _ in range(10):
            colour = _random_colour(rng)
            if np.abs(colour - mean).sum() > 120:
                break
        h, w = shape
        slope_y, slope_x = np.float32(rng.uniform(-25, 25)), np.float32(rng.uniform(-25, 25))
        ramp = (np.linspace(-1.0, 1.0, max(h, 1), dtype=np.float32)[:, None] * slope_y
                + np.linspace(-1.0, 1.0, max(w, 1), dtype=np.float32)[None, :] * slope_x)
        noise = (rng.random(size=(h, w, 1), dtype=np.float32) - np.float32(0.5)) * np.float32(12.0)
        return colour, ramp[..., None] + noise

    @staticmethod
    def _extent(label: np.ndarray, instance: int, window: Tuple[slice, slice]) -> List[float]:
        rows, cols = np.nonzero(label[window] == instance)
        y0, x0 = window[0].start, window[1].start
        return [x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1]

    def example(self, index: int, mask_size: int = MASK_SIZE) -> Example:
        """``(image, boxes, classes, coverage masks, image_id)``; image ids are ``index + 1``."""
        sample = self.sample(index)
        return sample.image, sample.boxes, sample.classes, sample.mini_masks(mask_size), index + 1

    def write_coco(self, directory: PathLike, num_images: int) -> str:
        """Write images ``0 .. num_images - 1`` as a COCO dataset; returns the annotation file.

        Layout: ``directory/instances.json`` and ``directory/images/000001.png`` ...; ``file_name``
        is relative to ``directory`` (pass it as ``image_dir``). Image ``index`` gets id
        ``index + 1``; masks are compressed RLE (exact), ``bbox`` their extent, ``area`` their
        pixel count, category ids equal the class ids.
        """
        directory = os.fspath(directory)
        os.makedirs(os.path.join(directory, "images"), exist_ok=True)
        images, annotations = [], []
        for index in range(num_images):
            sample = self.sample(index)
            image_id = index + 1
            file_name = f"images/{image_id:06d}.png"
            Image.fromarray(sample.image).save(os.path.join(directory, file_name))
            images.append({"id": image_id, "file_name": file_name,
                           "height": self.image_size[0], "width": self.image_size[1]})
            for mask, box, cls in zip(sample.masks, sample.boxes, sample.classes):
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                counts = rle["counts"].decode("ascii")
                segmentation = {"size": [int(v) for v in rle["size"]], "counts": counts}
                x1, y1, x2, y2 = (float(v) for v in box)
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cls),
                    "segmentation": segmentation,
                    "area": float(mask.sum()),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0,
                })
        data = {
            "info": {"description": f"keras_maskrcnn synthetic shapes, seed {self.seed}"},
            "images": images,
            "annotations": annotations,
            "categories": self.coco_categories,
        }
        path = os.path.join(directory, "instances.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
        return path

    def dataset(
        self, num_images: int, batch_size: int, training: bool = True, **kwargs: Any
    ) -> tf.data.Dataset:
        """``tf.data`` pipeline over images ``0 .. num_images - 1``; ``kwargs`` as
        :func:`synthetic_dataset`. The generator is attached as ``.source``."""
        kwargs.setdefault("min_size", None)
        kwargs.setdefault("max_size", None)
        kwargs.setdefault("seed", self.seed)
        mask_size = kwargs.setdefault("mask_size", MASK_SIZE)
        load = functools.partial(self.example, mask_size=mask_size)
        dataset = build_dataset(num_images, load, batch_size=batch_size, training=training, **kwargs)
        dataset.source = self
        return dataset


def synthetic_dataset(
    num_images: int,
    batch_size: int,
    image_size: Tuple[int, int] = (256, 256),
    training: bool = True,
    num_classes: int = 3,
    max_instances: Optional[int] = 100,
    mask_size: int = MASK_SIZE,
    seed: int = 0,
    instances_per_image: Tuple[int, int] = (1, 8),
    min_size: Optional[int] = None,
    max_size: Optional[int] = None,
    size_divisible: int = 32,
    flip_probability: float = 0.5,
    shuffle: Optional[bool] = None,
    repeat: bool = False,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Synthetic shapes as a ``tf.data.Dataset`` with :func:`~keras_maskrcnn.data.coco.coco_dataset`'s
    element structure (``image_ids`` are ``index + 1``, as in :meth:`SyntheticShapes.write_coco`).

    ``min_size=None`` (default) keeps ``image_size``; otherwise images are resized by the COCO
    rule. ``seed`` fixes the images and the shuffling/flips; use another seed for held-out data.
    The other arguments are those of ``coco_dataset``. The :class:`SyntheticShapes` generator
    (with ``class_names`` and the category mapping) is attached as ``.source``.
    """
    generator = SyntheticShapes(image_size, num_classes, instances_per_image=instances_per_image, seed=seed)
    return generator.dataset(
        num_images,
        batch_size,
        training,
        min_size=min_size,
        max_size=max_size,
        size_divisible=size_divisible,
        mask_size=mask_size,
        max_instances=max_instances,
        flip_probability=flip_probability,
        shuffle=shuffle,
        repeat=repeat,
        num_parallel_calls=num_parallel_calls,
        drop_remainder=drop_remainder,
    )
