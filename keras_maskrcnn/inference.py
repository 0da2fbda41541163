"""Inference on images of any sizes: resize, batch, run, map the results back to each image.

The geometry (resize rule, resampling, padding, mapping boxes back, pasting masks) is
:mod:`keras_maskrcnn.transform`'s; this module only batches and runs the model.
:func:`predict_images` takes a list of arrays. :func:`predict_batch` takes a batch of the
evaluation data pipeline (:func:`keras_maskrcnn.data.coco_dataset` with ``training=False``:
already resized and padded, with ``original_sizes``) and gives the same results for the same
images in the same batches; evaluation uses it.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import tensorflow as tf

from keras_maskrcnn import transform
from keras_maskrcnn.transform import resized_shape  # noqa: F401  (public here before transform existed)

Prediction = Dict[str, np.ndarray]


def _as_rgb_array(image, index: int) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"images[{index}] must be an RGB array [h, w, 3], got shape {array.shape}.")
    return array


def _detect_fn(model):
    """The model's forward pass with box-relative masks, traced once per model (cached on it)."""
    fn = getattr(model, "_predict_images_fn", None)
    if fn is None:

        @tf.function(reduce_retracing=True)
        def fn(images, image_sizes):
            return model({"images": images, "image_sizes": image_sizes}, training=False, mask_output="box")

        model._predict_images_fn = fn
    return fn


@tf.function(reduce_retracing=True)
def _paste(masks, boxes, height, width, threshold):
    # Not XLA (the model's jit_compile_masks): images of many sizes would each compile anew.
    return transform.paste_masks_in_image(masks, boxes, height, width, threshold=threshold)


def _resize_and_pad(model, arrays: Sequence[np.ndarray]) -> Tuple[tf.Tensor, tf.Tensor, np.ndarray]:
    """One batch: ``[B, h_max, w_max, 3]`` float32 resized images padded at the bottom/right,
    their resized sizes ``[B, 2]`` int32 and original sizes ``[B, 2]`` int32 (height, width)."""
    originals = np.array([array.shape[:2] for array in arrays], np.int32)
    sizes = transform.resized_sizes(originals, model.min_size, model.max_size)
    common = tf.reduce_max(sizes, axis=0)
    batch = [transform.pad_to_size(transform.resize_images(a, size), common) for a, size in zip(arrays, sizes)]
    return tf.stack(batch), sizes, originals


def _to_original(model, out: Mapping[str, tf.Tensor], image_sizes, original_sizes) -> List[Prediction]:
    """Per-image results of one batch of ``model`` outputs (``mask_output="box"``), mapped from
    resized pixels (``image_sizes [B, 2]``) to original ones (``original_sizes [B, 2]``): boxes
    scaled and masks pasted at each original size (uint8 0/1, or float32 probabilities when the
    model's ``mask_output`` is ``"probability"``)."""
    boxes = transform.boxes_to_original(out["boxes"], image_sizes, original_sizes).numpy()
    out = {k: v.numpy() for k, v in out.items()}
    threshold = None if model.mask_output == "probability" else model.mask_threshold
    results = []
    for i, (height, width) in enumerate(np.asarray(original_sizes)):
        n = int(out["num_detections"][i])
        masks = _paste(out["masks"][i, :n], boxes[i, :n], int(height), int(width), threshold)
        results.append(
            {"boxes": boxes[i, :n], "scores": out["scores"][i, :n], "classes": out["classes"][i, :n], "masks": masks.numpy()}
        )
    return results


def predict_images(model, images: Sequence[np.ndarray], batch_size: int = 2) -> List[Prediction]:
    """See :meth:`keras_maskrcnn.MaskRCNN.predict_images`."""
    arrays = [_as_rgb_array(image, i) for i, image in enumerate(images)]
    detect = _detect_fn(model)
    results: List[Prediction] = []
    for start in range(0, len(arrays), batch_size):
        batch, sizes, originals = _resize_and_pad(model, arrays[start : start + batch_size])
        results.extend(_to_original(model, detect(batch, sizes), sizes, originals))
    return results


def predict_batch(model, inputs: Mapping[str, tf.Tensor]) -> List[Prediction]:
    """:func:`predict_images`' results for one evaluation batch of the data pipeline.

    ``inputs``: ``images [B, H, W, 3]`` float32 (resized by the model's ``min_size`` /
    ``max_size``, zero-padded), ``image_sizes [B, 2]`` and ``original_sizes [B, 2]`` int32, as
    :func:`keras_maskrcnn.data.coco_dataset` emits them with ``training=False``.
    """
    # predict_images hands the model its batch at the largest resized size (the model pads to
    # size_divisible itself); the pipeline has padded further. Cropping back gives the model the
    # same input shape and so the same traced graph: static shapes steer graph optimisations and
    # with them the last bits of the scores (measured: 2e-7 apart otherwise).
    common = tf.reduce_max(inputs["image_sizes"], axis=0)
    images = inputs["images"][:, : common[0], : common[1]]
    out = _detect_fn(model)(images, inputs["image_sizes"])
    return _to_original(model, out, inputs["image_sizes"], inputs["original_sizes"])
