"""Checks of the image files of a COCO dataset, for :func:`keras_maskrcnn.data.validate.validate_coco`.

Each check returns ``(severity, message)`` pairs; :mod:`keras_maskrcnn.data.validate` turns them
into :class:`~keras_maskrcnn.data.validate.Problem` entries naming the file and image id.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Iterator, List, Optional, Sequence, Tuple

EXIF_ORIENTATION = 0x0112
Size = Tuple[Optional[int], Optional[int]]  # (height, width) declared in the annotation file


def _tail(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        length = f.tell()
        f.seek(max(length - size, 0))
        return f.read()


def _looks_truncated(path: str, image_format: Optional[str]) -> bool:
    """Cheap end-of-file test for JPEG (EOI marker) and PNG (IEND chunk) files."""
    if image_format == "JPEG":
        return b"\xff\xd9" not in _tail(path, 1024)
    if image_format == "PNG":
        return b"IEND" not in _tail(path, 64)
    return False


def _size_problems(size: Tuple[int, int], declared: Size, orientation: int) -> List[Tuple[str, str]]:
    """The file's ``(height, width)`` against the declared one, and its EXIF orientation."""
    height, width = size
    want_h, want_w = declared
    if want_h is not None and want_w is not None and (height, width) != (want_h, want_w):
        message = (
            f"the image is {height} x {width} (height x width) but the annotation file says {want_h} x {want_w}"
        )
        if orientation in (5, 6, 7, 8) and (width, height) == (want_h, want_w):
            message += (
                f"; its EXIF orientation {orientation} rotates it by 90 degrees, which would match: the "
                "annotations were made on the rotated image. EXIF orientation is ignored (as by pycocotools "
                "and torchvision), so rotate the pixels (PIL.ImageOps.exif_transpose) and save the file "
                "without the orientation tag"
            )
        return [("error", message)]
    if orientation != 1:
        return [(
            "warning",
            f"EXIF orientation {orientation} is ignored (as by pycocotools and torchvision): the annotations must "
            "refer to the stored pixels, not to the image as a viewer shows it rotated",
        )]
    return []


def check_image_file(path: str, declared: Size, mode: str) -> List[Tuple[str, str]]:
    """``(severity, message)`` problems of one image file; ``declared`` is ``(height, width)``;
    ``mode`` one of ``"decode"``, ``"header"``, ``"exists"`` (see ``validate_coco``)."""
    from PIL import Image

    from keras_maskrcnn.data.coco import load_image

    if not os.path.isfile(path):
        return [("error", "image file not found")]
    if mode == "exists":
        return []
    try:
        with Image.open(path) as image:
            width, height = image.size
            image_format = image.format
            try:
                orientation = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
            except Exception:  # a broken EXIF block is not our concern: it is ignored anyway
                orientation = 1
    except Exception as e:  # PIL raises many kinds for unreadable files
        return [("error", f"cannot read the image file: {e}")]
    if mode == "decode" or _looks_truncated(path, image_format):
        try:
            array = load_image(path)  # exactly what training does
        except (ValueError, FileNotFoundError) as e:
            message = str(e)
            if "truncated" in message.lower():
                return [("error", f"the image file is truncated: {message}")]
            return [("error", f"cannot decode the image file: {message}")]
        height, width = array.shape[:2]
    return _size_problems((height, width), declared, orientation)


def check_image_files(
    images: Sequence[Tuple[int, str, Size]], mode: str, max_workers: Optional[int] = None
) -> Iterator[Tuple[int, str, List[Tuple[str, str]]]]:
    """:func:`check_image_file` of every ``(image_id, path, declared size)`` in threads (default:
    up to 8); yields ``(image_id, path, problems)`` in the order given."""
    workers = max_workers or min(8, (os.cpu_count() or 1) + 2)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda item: check_image_file(item[1], item[2], mode), images)
        for (image_id, path, _), found in zip(images, results):
            yield image_id, path, found
