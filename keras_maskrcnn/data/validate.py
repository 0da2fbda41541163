"""Check a COCO instances dataset before training: :func:`validate_coco` and ``keras-maskrcnn validate``.

Every problem names its severity, the file (the image file it concerns, or the annotation file
for file-wide problems) and the annotation id. **Errors** are what would crash training or
evaluation, or silently train on wrong data; :func:`keras_maskrcnn.train.train` and
``keras-maskrcnn train`` run these checks first and refuse to start while there are any.
**Warnings** are what the pipeline (:mod:`keras_maskrcnn.data.coco`) handles as the COCO tools
(pycocotools, torchvision, detectron2) do, reported so that you can tell it was intended:

=====================================================  ========  ==================================
input                                                  severity  what the pipeline does
=====================================================  ========  ==================================
annotation file missing, malformed JSON, no ``images``  error     refuses to load (names the file)
image file missing, unreadable, corrupt, truncated     error     would fail when the batch is read
decoded size differs from ``height``/``width``         error     would fail (EXIF hint when a 90
                                                                 degree EXIF rotation explains it)
duplicate image id, non-integer image id               error     would mix up or fail on images
``category_id`` missing or not in ``categories``       error     would fail when the image is read
bbox not 4 numbers, or not finite; NaN/inf polygon     error     would fail / train on NaN
RLE malformed, undecodable, or size != image size      error     would fail / misplace the mask
annotation without ``id`` or ``image_id``              error     pycocotools cannot index it
EXIF orientation other than 1                          warning   ignored, as pycocotools/torchvision
zero-area bbox (width or height <= 0)                  warning   annotation left out
bbox or polygon (partly) outside the image             warning   clipped; left out if nothing is left
polygon with < 3 points or an odd coordinate count     warning   that polygon left out
polygon of zero area, empty RLE                        warning   kept, with an empty mask
no segmentation / no usable polygon                    warning   annotation left out
no bbox and no RLE to recover it from                  warning   annotation left out
annotation whose image id is not in ``images``         warning   ignored
duplicate annotation id                                warning   pycocotools keeps one for eval
category without usable annotations                    warning   a class that is never trained
=====================================================  ========  ==================================

Handled silently (nothing to report): greyscale, palette, RGBA and CMYK images (converted to
RGB), 16-bit and float images (rescaled from their own range to 0..255), images without
annotations (background-only examples), non-contiguous category ids (mapped to classes
``1..K`` in sorted order), and ``iscrowd`` annotations (left out of the training targets; COCO
evaluation uses them as ignore regions).

The checks themselves live in :mod:`keras_maskrcnn.data.image_checks` (image files) and
:mod:`keras_maskrcnn.data.annotation_checks` (each annotation's ids, category, box and mask);
:func:`check_dataset` is the check run before training.

>>> problems = validate_coco("train.json", "images/")
>>> for p in problems:
...     print(p)  # "error: images/7.jpg (image 7): cannot decode the image file: ..."
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from keras_maskrcnn.data.annotation_checks import ImageInfo, as_int, check_annotations
from keras_maskrcnn.data.image_checks import check_image_files

# Re-exported: they were defined here.
from keras_maskrcnn.data.annotation_checks import OUTSIDE_TOLERANCE  # noqa: F401,E402
from keras_maskrcnn.data.image_checks import EXIF_ORIENTATION  # noqa: F401,E402

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
SEVERITIES = ("error", "warning")
IMAGE_CHECKS = ("decode", "header", "exists", "none")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem found by :func:`validate_coco`.

    Attributes:
        severity: ``"error"`` (training would fail or learn from wrong data) or ``"warning"``
            (handled as the COCO tools do).
        message: what is wrong, and what the pipeline does about it.
        file: the image file concerned (joined to the image folder), or the annotation file for
            problems of the file as a whole (its JSON, its categories).
        annotation_id: the annotation's ``id`` (``"annotations[i]"`` when it has none); None for
            image and file problems.
        image_id: the image's ``id``, when known.
    """

    severity: str
    message: str
    file: Optional[str] = None
    annotation_id: Optional[Union[int, str]] = None
    image_id: Optional[Union[int, str]] = None

    def __str__(self) -> str:
        ids = []
        if self.image_id is not None:
            ids.append(f"image {self.image_id}")
        if self.annotation_id is not None:
            ids.append(f"annotation {self.annotation_id}")
        where = self.file or "-"
        if ids:
            where += f" ({', '.join(ids)})"
        return f"{self.severity}: {where}: {self.message}"


class DataValidationError(ValueError):
    """A dataset has errors (``.problems``: the errors, then the warnings, all :class:`Problem`)."""

    def __init__(self, annotation_file: str, problems: Sequence[Problem], limit: int = 50):
        self.annotation_file = annotation_file
        self.problems = list(problems)
        errors = [p for p in self.problems if p.severity == "error"]
        lines = [str(p) for p in errors[:limit]]
        if len(errors) > limit:
            lines.append(f"... and {len(errors) - limit} more")
        super().__init__(
            f"{len(errors)} error(s) in the dataset {annotation_file!r} (run `keras-maskrcnn validate` for the "
            "full report, warnings included):\n  " + "\n  ".join(lines)
        )


def errors_of(problems: Iterable[Problem]) -> List[Problem]:
    """The problems of severity ``"error"``."""
    return [p for p in problems if p.severity == "error"]


class _Reporter:
    def __init__(self):
        self.problems: List[Problem] = []

    def __call__(self, severity, message, file=None, annotation_id=None, image_id=None):
        self.problems.append(Problem(severity, message, file, annotation_id, image_id))


# --------------------------------------------------------------------------------------------
# The parts of the file
# --------------------------------------------------------------------------------------------


def _read_annotation_file(annotation_file: str) -> Union[Dict[str, Any], str]:
    """The parsed COCO file, or the message of the one error that leaves nothing else to check."""
    if not os.path.isfile(annotation_file):
        return "annotation file not found"
    try:
        with open(annotation_file, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"malformed JSON: {e}"
    if not isinstance(data, dict):
        return "the file is not a COCO instances file: its top level is not a JSON object"
    if not isinstance(data.get("images"), list):
        return "the file has no 'images' list"
    for key in ("annotations", "categories"):
        if key in data and not isinstance(data[key], list):
            return f"{key!r} is not a list"
    return data


def _check_categories(categories: List[Any], annotation_file: str, report: _Reporter) -> Dict[int, str]:
    """Report the problems of ``categories``; returns the names of the usable ones by id."""
    category_names: Dict[int, str] = {}
    for i, category in enumerate(categories):
        category_id = as_int(category.get("id")) if isinstance(category, dict) else None
        if category_id is None:
            report("error", f"categories[{i}] has no integer 'id'", annotation_file)
            continue
        if category_id in category_names:
            report("error", f"category id {category_id} appears more than once in 'categories'", annotation_file)
            continue
        category_names[category_id] = str(category.get("name", category_id))
    if not categories:
        report("error", "'categories' is empty: there is nothing to train", annotation_file)
    return category_names


def _check_image_entries(images: List[Any], image_dir: str, annotation_file: str, report: _Reporter) -> ImageInfo:
    """Report the problems of the ``images`` entries (not of their files); returns
    ``{image id: (path, height, width)}`` of the usable ones (sizes None when unusable)."""
    image_info: ImageInfo = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict):
            report("error", f"images[{i}] is not an object", annotation_file)
            continue
        image_id = as_int(image.get("id"))
        file_name = image.get("file_name")
        if image_id is None:
            report("error", f"images[{i}] has no integer 'id' (got {image.get('id')!r})", annotation_file)
            continue
        if not isinstance(file_name, str) or not file_name:
            report("error", f"images[{i}] has no 'file_name'", annotation_file, image_id=image_id)
            continue
        path = os.path.join(image_dir, file_name)
        if image_id in image_info:
            report("error", f"image id {image_id} is used by more than one image", path, image_id=image_id)
            continue
        height, width = image.get("height"), image.get("width")
        if height is None or width is None:
            report(
                "warning",
                "no 'height'/'width': the image size cannot be checked and boxes are not clipped to it",
                path, image_id=image_id,
            )
            height = width = None
        else:
            height, width = as_int(height), as_int(width)
            if height is None or width is None or height <= 0 or width <= 0:
                report("error", f"'height'/'width' must be positive integers, got {image.get('height')!r} x "
                       f"{image.get('width')!r}", path, image_id=image_id)
                height = width = None
        image_info[image_id] = (path, height, width)
    return image_info


def _check_image_files(image_info: ImageInfo, mode: str, max_workers: Optional[int], report: _Reporter) -> None:
    to_read = [(image_id, path, (height, width)) for image_id, (path, height, width) in image_info.items()]
    for image_id, path, found in check_image_files(to_read, mode, max_workers):
        for severity, message in found:
            report(severity, message, path, image_id=image_id)


def _report_unused_categories(
    category_names: Dict[int, str], trained_categories: Iterable[int], annotation_file: str, report: _Reporter
) -> None:
    trained = set(trained_categories)
    for category_id, name in sorted(category_names.items()):
        if category_id not in trained:
            report(
                "warning",
                f"category {category_id} ({name!r}) has no usable annotation: the model gets a class it never "
                "sees in training",
                annotation_file,
            )


# --------------------------------------------------------------------------------------------
# The whole file
# --------------------------------------------------------------------------------------------


def validate_coco(
    annotation_file: PathLike,
    image_dir: PathLike,
    check_images: str = "decode",
    max_workers: Optional[int] = None,
) -> List[Problem]:
    """Check a COCO instances file and its images; returns the problems, errors first.

    Args:
        annotation_file: COCO instances JSON.
        image_dir: the folder the images' ``file_name`` is relative to.
        check_images: ``"decode"`` (read every image as training does: catches corrupt and
            truncated files), ``"header"`` (open each file and read its header and EXIF, and
            fully decode only JPEG/PNG files that do not end as they should: fast, what
            :func:`~keras_maskrcnn.train.train` uses), ``"exists"`` or ``"none"``.
        max_workers: threads reading images (default: up to 8).

    Returns:
        :class:`Problem` list (empty for a clean dataset); see the module docstring for what is
        an error and what a warning. Never raises for a bad dataset.
    """
    if check_images not in IMAGE_CHECKS:
        raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, got {check_images!r}.")
    annotation_file = os.fspath(annotation_file)
    image_dir = os.fspath(image_dir)
    data = _read_annotation_file(annotation_file)
    if isinstance(data, str):
        return [Problem("error", data, annotation_file)]
    report = _Reporter()
    category_names = _check_categories(data.get("categories", []), annotation_file, report)
    image_info = _check_image_entries(data["images"], image_dir, annotation_file, report)
    if check_images != "none" and image_info:
        _check_image_files(image_info, check_images, max_workers, report)
    trained = check_annotations(data.get("annotations", []), image_info, category_names, annotation_file, report)
    _report_unused_categories(category_names, trained, annotation_file, report)
    problems = report.problems
    return [p for p in problems if p.severity == "error"] + [p for p in problems if p.severity != "error"]


def check_dataset(annotation_file: PathLike, image_dir: PathLike, check_images: str = "header") -> List[Problem]:
    """The check run before training (by :func:`keras_maskrcnn.train.train` and
    ``keras-maskrcnn train``): :func:`validate_coco` with quick image checks; logs a few of the
    warnings and raises :class:`DataValidationError` listing the errors, if any.

    Returns:
        The problems (warnings only) when there is no error.
    """
    annotation_file = os.fspath(annotation_file)
    problems = validate_coco(annotation_file, image_dir, check_images=check_images)
    warnings = [p for p in problems if p.severity != "error"]
    if warnings:
        logger.warning(
            "%d warning(s) for %s (run `keras-maskrcnn validate` to list them all), e.g.:\n  %s",
            len(warnings), annotation_file, "\n  ".join(str(p) for p in warnings[:5]),
        )
    if errors_of(problems):
        raise DataValidationError(annotation_file, problems)
    return problems


def format_report(problems: Sequence[Problem], annotation_file: Optional[str] = None, errors_only: bool = False) -> str:
    """The problems one per line, errors first (only the errors with ``errors_only``), and a
    summary line counting both (what ``keras-maskrcnn validate`` prints)."""
    errors = errors_of(problems)
    lines = [str(p) for p in (errors if errors_only else problems)]
    what = f" in {annotation_file}" if annotation_file else ""
    if not problems:
        lines.append(f"No problems found{what}.")
    else:
        lines.append(f"{len(errors)} error(s), {len(problems) - len(errors)} warning(s){what}.")
    return "\n".join(lines)


__all__ = [
    "DataValidationError",
    "IMAGE_CHECKS",
    "Problem",
    "check_dataset",
    "errors_of",
    "format_report",
    "validate_coco",
]
