"""Label maps: which COCO category (id and name) each of the model's contiguous classes stands for.

Training writes one (``classes.json``, :func:`save_label_map`); ``keras-maskrcnn predict`` and
the examples read it back (:func:`load_label_map`) to name and number the detections.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from keras_maskrcnn.data.coco import read_json_file

PathLike = Union[str, "os.PathLike[str]"]


def save_label_map(
    path: PathLike, class_to_category: Mapping[int, int], class_names: Optional[Mapping[int, str]] = None
) -> str:
    """Write the label map as JSON: ``{"classes": [{"class": 1, "id": <category id>, "name": ...}, ...]}``.

    ``class`` is the model's contiguous class id, ``id`` the COCO category id it stands for.
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    class_names = class_names or {}
    entries = [
        {"class": int(cls), "id": int(cat), "name": str(class_names.get(cls, cat))}
        for cls, cat in sorted(class_to_category.items())
    ]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"classes": entries}, f, indent=1)
    return path


def load_label_map(path: PathLike) -> Tuple[Dict[int, int], Dict[int, str]]:
    """Read a label map written by :func:`save_label_map`, or the ``categories`` of a COCO
    annotation file (classes numbered by sorted category id, as in training).

    Returns:
        ``(class_to_category, class_names)``, both keyed by the contiguous class id.
    """
    path = os.fspath(path)
    data = read_json_file(path, "label map file")
    if isinstance(data, dict) and isinstance(data.get("classes"), list):
        entries = data["classes"]
        try:
            class_to_category = {int(e["class"]): int(e["id"]) for e in entries}
            class_names = {int(e["class"]): str(e.get("name", e["id"])) for e in entries}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Label map {path!r}: every class needs 'class' and 'id' ({e}).") from e
        return class_to_category, class_names
    if isinstance(data, dict) and isinstance(data.get("categories"), list):
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        class_to_category = {i + 1: cat for i, cat in enumerate(sorted(names))}
        return class_to_category, {cls: names[cat] for cls, cat in class_to_category.items()}
    raise ValueError(f"{path!r} is neither a label map ('classes') nor a COCO file ('categories').")


def dataset_label_map(dataset: Any, num_classes: int) -> Tuple[Dict[int, int], Dict[int, str]]:
    """The label map of a pipeline from :mod:`keras_maskrcnn.data` (its ``coco_source`` or
    ``source``); the identity ``1..num_classes`` when it has none."""
    source = getattr(dataset, "coco_source", None) or getattr(dataset, "source", None)
    if source is not None and hasattr(source, "class_to_category"):
        return dict(source.class_to_category), dict(getattr(source, "class_names", {}) or {})
    return {k: k for k in range(1, num_classes + 1)}, {k: str(k) for k in range(1, num_classes + 1)}


def training_label_map(
    dataset: Any,
    num_classes: int,
    class_to_category: Optional[Mapping[int, int]] = None,
    class_names: Optional[Mapping[int, str]] = None,
) -> Tuple[Mapping[int, int], Optional[Mapping[int, str]]]:
    """The label map given, else the dataset's (:func:`dataset_label_map`); ``ValueError`` unless
    it has ``num_classes`` classes."""
    if class_to_category is None:
        class_to_category, default_names = dataset_label_map(dataset, num_classes)
        class_names = class_names or default_names
    if len(class_to_category) != num_classes:
        raise ValueError(
            f"The label map has {len(class_to_category)} classes but the model has num_classes={num_classes}."
        )
    return class_to_category, class_names


__all__ = ["dataset_label_map", "load_label_map", "save_label_map", "training_label_map"]
