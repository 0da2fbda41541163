"""COCO evaluation of Mask R-CNN predictions with the official metric (pycocotools ``COCOeval``).

For both ``iou_type="bbox"`` and ``iou_type="segm"`` the 12 standard COCO numbers are reported,
keyed as follows (AP averaged over IoU 0.50:0.05:0.95 unless stated, AR at 100 detections
per image unless stated):

* ``AP``, ``AP50``, ``AP75``: AP, AP at IoU 0.50, AP at IoU 0.75;
* ``APs``, ``APm``, ``APl``: AP of small (< 32^2 px), medium and large (> 96^2 px) objects;
* ``AR1``, ``AR10``, ``AR100``: AR with at most 1, 10, 100 detections per image;
* ``ARs``, ``ARm``, ``ARl``: AR of small, medium and large objects.

As in pycocotools, a number is ``-1`` where no ground truth falls in its area range, and
``iscrowd`` ground truth acts as an ignore region (detections matched to it count neither way).
Mask AP uses mask areas for the small/medium/large split (the box is left out of the mask
results, as torchvision and detectron2 do).

A :class:`~keras_maskrcnn.MaskRCNN` is evaluated on the data pipeline
(:func:`keras_maskrcnn.data.pipeline.build_dataset` with ``training=False``: the training
reader, resize and padding, and the eval-only ``image_ids`` / ``original_sizes`` keys, no
targets computed) and its own post-processing (:func:`keras_maskrcnn.inference.predict_batch`:
boxes mapped back and masks pasted by :mod:`keras_maskrcnn.transform`): the model gets the same
input tensors as from ``predict_images`` on the same images in the same batches, so the results
are the same, bit for bit. Any other model is an
object with ``predict_images(images, batch_size) -> list[dict]`` returning, per image, numpy
``boxes [n, 4]`` (x1, y1, x2, y2 in original pixels), ``scores [n]``, contiguous 1-based
``classes [n]`` and binary ``masks [n, h, w]`` at the original image size; it gets the images
as :func:`keras_maskrcnn.data.load_image` reads them.

Memory: images are read and predicted ``batch_size`` at a time (plus the pipeline's prefetched
batches) and every mask is encoded to compressed RLE straight away, so full-size masks of the
whole set are never held at once; only the (small) RLE results list grows with the number of
images.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import keras
from keras_maskrcnn import boxes as box_ops
from keras_maskrcnn import inference
from keras_maskrcnn.data import categories
from keras_maskrcnn.data.loading import load_image  # the pipeline's reader: same pixels as in training
from keras_maskrcnn.data.pipeline import build_dataset
from keras_maskrcnn.model import MaskRCNN

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")

PathLike = Union[str, "os.PathLike[str]"]


def _quiet(verbose: bool):
    """Context that swallows pycocotools' prints unless ``verbose``."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def _load_coco(coco_gt: Union[COCO, PathLike], verbose: bool = False) -> COCO:
    if isinstance(coco_gt, COCO):
        return coco_gt
    with _quiet(verbose):
        return COCO(os.fspath(coco_gt))


def predictions_to_coco_results(
    image_id: int, prediction: Mapping[str, Any], class_to_category: Mapping[int, int]
) -> List[Dict[str, Any]]:
    """One image's prediction dict as COCO result entries (box and compressed-RLE mask each).

    Args:
        image_id: COCO image id.
        prediction: ``boxes [n, 4]`` (x1, y1, x2, y2), ``scores [n]``, ``classes [n]``
            (contiguous, 1-based) and binary ``masks [n, h, w]``.
        class_to_category: contiguous class id -> COCO category id
            (:func:`keras_maskrcnn.data.categories.class_to_category`).

    Returns:
        JSON-serialisable dicts with ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``,
        ``score`` and ``segmentation`` (RLE with ``counts`` as ``str``).
    """
    boxes = np.asarray(prediction["boxes"], np.float32).reshape(-1, 4)
    scores = np.asarray(prediction["scores"], np.float32).reshape(-1)
    classes = np.asarray(prediction["classes"]).reshape(-1).astype(np.int64)
    masks = np.asarray(prediction["masks"])
    n = boxes.shape[0]
    if n == 0:
        return []
    if not (scores.shape[0] == classes.shape[0] == n and masks.ndim == 3 and masks.shape[0] == n):
        raise ValueError(
            f"Image {image_id}: inconsistent prediction shapes: boxes {boxes.shape}, "
            f"scores {scores.shape}, classes {classes.shape}, masks {masks.shape}."
        )

    unknown = sorted(set(classes.tolist()) - set(class_to_category))
    if unknown:
        raise ValueError(f"Image {image_id}: predicted classes {unknown} have no COCO category.")

    coco_boxes = np.asarray(box_ops.xyxy_to_coco(boxes)).tolist()
    # pycocotools wants a Fortran-ordered uint8 [h, w, n] array.
    rles = mask_utils.encode(np.asfortranarray(np.transpose(masks != 0, (1, 2, 0)).astype(np.uint8)))
    results = []
    for i in range(n):
        rle = rles[i]
        rle["counts"] = rle["counts"].decode("ascii")
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(class_to_category[int(classes[i])]),
                "bbox": [float(v) for v in coco_boxes[i]],
                "score": float(scores[i]),
                "segmentation": rle,
            }
        )
    return results


def write_coco_results(results: Sequence[Mapping[str, Any]], path: PathLike) -> None:
    """Write COCO results entries as JSON (loadable by ``COCO.loadRes``)."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(list(results), f)


def _results_for(results: Sequence[Mapping[str, Any]], iou_type: str) -> List[Dict[str, Any]]:
    """Copies holding only the fields ``iou_type`` uses (``loadRes`` mutates its input).

    Mask results drop ``bbox`` so that pycocotools derives the area (small/medium/large split)
    from the mask rather than the box.
    """
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    return [{k: v for k, v in r.items() if k != drop} for r in results]


def coco_metrics(
    coco_gt: Union[COCO, PathLike],
    results: Union[Sequence[Mapping[str, Any]], PathLike],
    iou_type: str,
    image_ids: Optional[Sequence[int]] = None,
    verbose: bool = False,
) -> Dict[str, float]:
    """Run ``COCOeval`` and return its 12 summary numbers (see the module docstring).

    Args:
        coco_gt: ground truth, a ``COCO`` object or an annotation file path.
        results: COCO results entries, or a path to a results JSON file.
        iou_type: ``"bbox"`` or ``"segm"``.
        image_ids: images to evaluate over (``params.imgIds``); default: all images of ``coco_gt``.
        verbose: let pycocotools print its progress and summary table.

    With no results at all the evaluation still runs (against an empty detection set), giving
    0 wherever there is ground truth and pycocotools' ``-1`` where there is none.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}.")
    coco_gt = _load_coco(coco_gt, verbose)
    if not isinstance(results, (list, tuple)):
        with open(os.fspath(results)) as f:
            results = json.load(f)

    with _quiet(verbose):
        if results:
            coco_dt = coco_gt.loadRes(_results_for(results, iou_type))
        else:
            # loadRes fails on an empty list: build an empty detection set by hand.
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset.get("images", [])),
                "categories": list(coco_gt.dataset.get("categories", [])),
                "annotations": [],
            }
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = [int(i) for i in image_ids]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats)}


# (image id, original (height, width), prediction dict) of one evaluated image.
ImagePrediction = Tuple[int, Tuple[int, int], Mapping[str, Any]]


def _image_paths(coco_gt: COCO, image_dir: PathLike, ids: Sequence[int]) -> List[str]:
    return [os.path.join(image_dir, coco_gt.imgs[i]["file_name"]) for i in ids]


def _pipeline_predictions(
    model: MaskRCNN, coco_gt: COCO, image_dir: PathLike, ids: Sequence[int], batch_size: int
) -> Iterator[ImagePrediction]:
    """A MaskRCNN's predictions, batch by batch of the evaluation data pipeline."""
    paths = _image_paths(coco_gt, image_dir, ids)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:  # checked here: inside tf.data the error would lose its type
        raise FileNotFoundError(f"{len(missing)} image file(s) not found, e.g. {missing[:5]}")
    # Evaluation needs no targets: the loader gives none, so no coverage masks are computed.
    no_targets = (np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), np.zeros((0, 1, 1), np.uint8))
    dataset = build_dataset(
        len(ids),
        lambda index: (load_image(paths[index]), *no_targets, ids[index]),
        batch_size=batch_size,
        training=False,
        min_size=model.min_size,
        max_size=model.max_size,
        size_divisible=model.size_divisible,
        mask_size=1,
        max_instances=None,
        shuffle=False,
    )
    for inputs, _ in dataset:
        predictions = inference.predict_batch(model, inputs)
        sizes = inputs["original_sizes"].numpy()
        for image_id, size, prediction in zip(inputs["image_ids"].numpy(), sizes, predictions):
            yield int(image_id), (int(size[0]), int(size[1])), prediction


def _predict_images_predictions(
    model: Any, coco_gt: COCO, image_dir: PathLike, ids: Sequence[int], batch_size: int
) -> Iterator[ImagePrediction]:
    """Predictions of any object with ``predict_images``, on images read ``batch_size`` at a time."""
    paths = _image_paths(coco_gt, image_dir, ids)
    for start in range(0, len(ids), batch_size):
        images = [load_image(path) for path in paths[start : start + batch_size]]
        predictions = model.predict_images(images, batch_size=batch_size)
        if len(predictions) != len(images):
            raise ValueError(f"predict_images returned {len(predictions)} results for {len(images)} images.")
        for image_id, image, prediction in zip(ids[start : start + batch_size], images, predictions):
            yield image_id, image.shape[:2], prediction


def evaluate_coco(
    model: Any,
    annotation_file: Union[COCO, PathLike],
    image_dir: PathLike,
    batch_size: int = 2,
    image_ids: Optional[Sequence[int]] = None,
    max_images: Optional[int] = None,
    results_file: Optional[PathLike] = None,
    verbose: bool = False,
) -> Dict[str, Dict[str, float]]:
    """Predict on the images of a COCO annotation file and compute box and mask COCO metrics.

    Args:
        model: a :class:`~keras_maskrcnn.MaskRCNN` (run on the data pipeline), or anything with
            ``predict_images(images, batch_size=...) -> list[dict]`` (see the module docstring).
        annotation_file: COCO annotation JSON path (or a loaded ``COCO`` object).
        image_dir: directory that the images' ``file_name`` entries are relative to.
        batch_size: images per model call (and per ``predict_images`` call).
        image_ids: images to evaluate, in this order; default: all, sorted by id.
        max_images: evaluate only the first ``max_images`` of those.
        results_file: where to write the results JSON, if given.
        verbose: print pycocotools' summary tables.

    Returns:
        ``{"bbox": {...}, "segm": {...}}``, each with the 12 numbers of :func:`coco_metrics`,
        computed over exactly the evaluated image ids.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    coco_gt = _load_coco(annotation_file, verbose)
    class_to_category = categories.class_to_category(coco_gt.getCatIds())
    ids = [int(i) for i in image_ids] if image_ids is not None else sorted(coco_gt.getImgIds())
    missing = [i for i in ids if i not in coco_gt.imgs]
    if missing:
        raise ValueError(f"Image ids {missing[:10]} are not in the annotation file.")
    if max_images is not None:
        ids = ids[:max_images]

    predict = _pipeline_predictions if isinstance(model, MaskRCNN) else _predict_images_predictions
    results: List[Dict[str, Any]] = []
    for image_id, size, prediction in predict(model, coco_gt, image_dir, ids, batch_size):
        masks = np.asarray(prediction["masks"])
        if masks.ndim == 3 and masks.shape[0] and masks.shape[1:] != tuple(size):
            raise ValueError(f"Image {image_id}: masks are {masks.shape[1:]} but the image is {tuple(size)}.")
        # Masks are RLE from here on: full-size masks never outlive their batch.
        results.extend(predictions_to_coco_results(image_id, prediction, class_to_category))

    if results_file is not None:
        write_coco_results(results, results_file)
    return {
        iou_type: coco_metrics(coco_gt, results, iou_type, image_ids=ids, verbose=verbose)
        for iou_type in IOU_TYPES
    }


def _write_scalar(tag: str, value: float, step: int) -> None:
    """``tf.summary.scalar`` without needing the ``tensorboard`` package installed.

    Writes the same record TensorBoard's scalar summary writes (a float32 tensor tagged for the
    ``scalars`` plugin) to the default summary writer.
    """
    metadata = tf.compat.v1.SummaryMetadata(
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars")
    )
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=metadata)


class CocoEvaluationCallback(keras.callbacks.Callback):
    """Runs :func:`evaluate_coco` on ``self.model`` at the end of every ``every_n_epochs`` epochs.

    The numbers are written into the epoch ``logs`` as ``f"{prefix}{iou_type}_{name}"``
    (``val_bbox_AP``, ``val_segm_AP50``, ...), and, if ``log_dir`` is given, as TensorBoard
    scalars ``{iou_type}/{name}`` under ``log_dir/coco_eval``. The last epoch is always evaluated
    when the number of epochs is known. On epochs it skips, the keys are absent from ``logs``, so
    their ``History`` lists are shorter than the number of epochs.

    Order matters: Keras hands one ``logs`` dict to the callbacks in list order, so place this
    callback *before* any ``TensorBoard``, ``ModelCheckpoint``, ``EarlyStopping`` or ``CSVLogger``
    that should see these keys. ``History`` is appended last by Keras when not given explicitly.

    The model is a :class:`~keras_maskrcnn.MaskRCNN` or provides ``predict_images`` (see
    :func:`evaluate_coco`).
    """

    def __init__(
        self,
        annotation_file: PathLike,
        image_dir: PathLike,
        every_n_epochs: int = 1,
        batch_size: int = 2,
        max_images: Optional[int] = None,
        log_dir: Optional[PathLike] = None,
        prefix: str = "val_",
    ):
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        self.annotation_file = annotation_file
        self.image_dir = image_dir
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.max_images = max_images
        self.log_dir = log_dir
        self.prefix = prefix
        self._coco_gt: Optional[COCO] = None
        self._writer = None

    def _should_evaluate(self, epoch: int) -> bool:
        epochs = (self.params or {}).get("epochs")
        return (epoch + 1) % self.every_n_epochs == 0 or (epochs is not None and epoch + 1 == epochs)

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if not self._should_evaluate(epoch):
            return
        if self._coco_gt is None:  # parse the annotation file once
            self._coco_gt = _load_coco(self.annotation_file)
        metrics = evaluate_coco(
            self.model, self._coco_gt, self.image_dir, batch_size=self.batch_size, max_images=self.max_images
        )
        if logs is not None:
            for iou_type, numbers in metrics.items():
                for name, value in numbers.items():
                    logs[f"{self.prefix}{iou_type}_{name}"] = value
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(os.path.join(os.fspath(self.log_dir), "coco_eval"))
            with self._writer.as_default():
                for iou_type, numbers in metrics.items():
                    for name, value in numbers.items():
                        _write_scalar(f"{iou_type}/{name}", value, step=epoch)
            self._writer.flush()

    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
