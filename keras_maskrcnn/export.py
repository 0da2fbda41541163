"""Export a :class:`~keras_maskrcnn.MaskRCNN` as a TensorFlow SavedModel for TF Serving.

The exported graph does everything :meth:`MaskRCNN.predict_images` does, so a client sends raw
images and gets detections in the original image's pixels:

* resize by the model's ``min_size`` / ``max_size`` rule (bilinear, half-pixel centres, no
  antialias, new side ``floor(side * scale)``), pad the batch at the bottom and right, normalise;
* run the model (box-relative ``28 x 28`` masks);
* scale the boxes back to each original image and, with ``full_masks=True``, paste and threshold
  the masks at the original size.

Each of these steps is :mod:`keras_maskrcnn.transform`'s, the same functions ``predict_images``,
the data pipeline and the model call, traced into the graph.

Two signatures:

``serving_default``
    input ``images``: uint8 ``[B, H, W, 3]`` RGB (one tensor, so all images of a request share
    ``H, W``; send differently sized images as separate requests or through ``serving_bytes``).
``serving_bytes``
    input ``image_bytes``: string ``[B]``, each an encoded JPEG, PNG, GIF (first frame), BMP or
    any other format ``tf.io.decode_image`` reads (TF 2.21 adds WebP and JPEG XL)
    (REST: ``{"image_bytes": {"b64": "..."}}``). Images of one request may differ in size.
    Bytes that are not an image fail the request with ``InvalidArgumentError`` (so does an
    empty request, in both signatures).

Both return ``boxes [B, N, 4]`` float32 ``(x1, y1, x2, y2)`` in original pixels, ``scores [B, N]``
float32, ``classes [B, N]`` int32 (1-based, 0 in padding rows), ``num_detections [B]`` int32 and
``masks [B, N, 28, 28]`` float32 box-relative mask probabilities (paste them with
:func:`keras_maskrcnn.transform.paste_masks_in_image` or torchvision's ``paste_masks_in_image``);
``N = detections_per_image``, rows past ``num_detections`` are zero. With ``full_masks=True`` at
export time they also return ``full_masks [B, N, H, W]`` uint8 0/1 (probability
``> mask_threshold``) at the original size; for ``serving_bytes`` ``H, W`` are the largest
original height and width in the request and each image's masks are zero outside its own
``[0, h) x [0, w)``. Full masks cost ``B * N * H * W`` bytes of output (plus four times that in
float32 while pasting): about 100 MB per 1000 x 1000 image at ``N = 100``.

The graph uses stock TensorFlow ops only (no custom ops: RoIAlign is built on
``tf.image.crop_and_resize``), so TF Serving, ``saved_model_cli`` and plain
``tf.saved_model.load`` run it without ``keras`` or ``keras_maskrcnn`` installed.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from typing import Dict, Iterator, List, Optional, Union

import tensorflow as tf

from keras_maskrcnn import transform
from keras_maskrcnn.transform import resized_sizes  # noqa: F401  (public here before transform existed)

SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
OUTPUT_NAMES = ("boxes", "scores", "classes", "num_detections", "masks")

# Attributes through which a layer may choose a compiled (custom-op) kernel, and the value that
# selects the stock TensorFlow implementation. No layer has one today: RoIAlign is always
# keras_maskrcnn.ops.roi_align (tf.image.crop_and_resize). If a compiled RoIAlign op (see
# custom_ops/) is ever wired into MultiLevelROIAlign, give the layer one of these switches (or add
# its switch here) so that export traces the stock path; the op check after saving
# (`_check_stock_ops`) fails the export if a non-stock op still reaches the graph.
STOCK_OP_SWITCHES = {"use_custom_op": False, "jit_compile_masks": False}


# --------------------------------------------------------------------------- version folders
def _integer_versions(path: str) -> List[int]:
    if not os.path.isdir(path):
        return []
    names = os.listdir(path)
    return sorted(int(n) for n in names if re.fullmatch(r"\d+", n) and os.path.isdir(os.path.join(path, n)))


def next_version(path: str) -> int:
    """The version a new export into ``path`` gets: one more than the largest integer
    subfolder, or ``1`` if there is none."""
    versions = _integer_versions(path)
    return versions[-1] + 1 if versions else 1


def latest_version_dir(path: str) -> str:
    """``path/<largest integer version>`` (what TF Serving serves), or ``path`` itself if it is
    already a SavedModel folder."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = _integer_versions(path)
    if not versions:
        raise FileNotFoundError(f"no versioned SavedModel (integer subfolder) in {path!r}")
    return os.path.join(path, str(versions[-1]))


# --------------------------------------------------------------------------- graph pieces
def _require_images(tensor: tf.Tensor, name: str) -> tf.Tensor:
    """``tensor`` after checking (InvalidArgumentError) that its batch is not empty."""
    check = tf.debugging.assert_positive(tf.size(tensor), message=f"{name}: the request holds no image (or an empty one)")
    with tf.control_dependencies([check]):
        return tf.identity(tensor)


def _decode_resize_pad(image_bytes: tf.Tensor, min_size: int, max_size: int):
    """Decode ``[B]`` encoded images, resize each, pad them into one batch.

    Returns ``batch [B, h_max, w_max, 3]`` float32, ``resized [B, 2]`` and ``original [B, 2]``
    int32 sizes (height, width).
    """
    image_bytes = _require_images(image_bytes, "image_bytes")
    n = tf.shape(image_bytes)[0]
    images = tf.TensorArray(tf.float32, size=n, infer_shape=False, element_shape=tf.TensorShape([None, None, 3]))
    original = tf.TensorArray(tf.int32, size=n, element_shape=tf.TensorShape([2]))

    def decode(i, images, original):
        # decode_image raises InvalidArgumentError ("Unknown image file format" / corrupt data)
        # for bytes that are not a complete JPEG, PNG, GIF or BMP: the request fails, the server
        # does not. channels=3 turns grayscale and RGBA into RGB.
        image = tf.io.decode_image(image_bytes[i], channels=3, dtype=tf.uint8, expand_animations=False)
        image.set_shape([None, None, 3])
        size = tf.shape(image)[:2]
        resized = transform.resize_images(image, transform.resized_sizes(size, min_size, max_size))
        return i + 1, images.write(i, resized), original.write(i, size)

    _, images, original = tf.while_loop(lambda i, *_: i < n, decode, (tf.constant(0), images, original))
    original = original.stack()
    resized = transform.resized_sizes(original, min_size, max_size)
    max_hw = tf.reduce_max(resized, axis=0)
    padded = tf.TensorArray(tf.float32, size=n, infer_shape=False, element_shape=tf.TensorShape([None, None, 3]))

    def pad(i, padded):
        return i + 1, padded.write(i, transform.pad_to_size(images.read(i), max_hw))

    _, padded = tf.while_loop(lambda i, *_: i < n, pad, (tf.constant(0), padded))
    batch = padded.stack()
    batch.set_shape([None, None, None, 3])
    return batch, resized, original


def _detect(model, batch, resized, original, full_masks: bool) -> Dict[str, tf.Tensor]:
    """Run ``model`` on a resized, padded ``batch`` and map the results to the original sizes."""
    out = model({"images": batch, "image_sizes": resized}, training=False, mask_output="box")
    boxes = transform.boxes_to_original(out["boxes"], resized, original)
    result = {
        "boxes": tf.identity(boxes),
        "scores": tf.cast(out["scores"], tf.float32),
        "classes": tf.cast(out["classes"], tf.int32),
        "num_detections": tf.cast(out["num_detections"], tf.int32),
        "masks": tf.cast(out["masks"], tf.float32),
    }
    if full_masks:
        height = tf.reduce_max(original[:, 0])
        width = tf.reduce_max(original[:, 1])
        # One canvas for the batch: each image's masks are zero outside its own original size.
        full = transform.paste_masks_in_image(
            result["masks"], boxes, height, width, threshold=model.mask_threshold, image_sizes=original
        )  # [B, N, H, W] uint8
        # Rows past num_detections hold zero masks, which paste as 0 only for a threshold >= 0.
        rows = tf.range(tf.shape(boxes)[1])[None, :] < result["num_detections"][:, None]  # [B, N]
        result["full_masks"] = tf.where(rows[:, :, None, None], full, tf.zeros_like(full))
    return result


@contextlib.contextmanager
def stock_ops_only(model) -> Iterator[None]:
    """Within the block, every layer of ``model`` with a custom-op switch (``STOCK_OP_SWITCHES``)
    uses the stock TensorFlow implementation; the switches are restored afterwards."""
    changed = []
    layers = model._flatten_layers(include_self=True, recursive=True) if hasattr(model, "_flatten_layers") else [model]
    for layer in layers:
        for attribute, stock_value in STOCK_OP_SWITCHES.items():
            if hasattr(layer, attribute) and getattr(layer, attribute) != stock_value:
                changed.append((layer, attribute, getattr(layer, attribute)))
                setattr(layer, attribute, stock_value)
    try:
        yield
    finally:
        for layer, attribute, value in reversed(changed):
            setattr(layer, attribute, value)


def saved_model_op_types(export_dir: str) -> List[str]:
    """Sorted op types used by a SavedModel's graphs and functions (function calls excluded)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    functions = set()
    for meta_graph in proto.meta_graphs:
        library = meta_graph.graph_def.library
        functions.update(function.signature.name for function in library.function)
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in library.function:
            ops.update(node.op for node in function.node_def)
    return sorted(ops - functions)


def _check_stock_ops(export_dir: str) -> None:
    # Ops from tf.load_op_library get no tf.raw_ops entry; every stock op has one.
    foreign = [op for op in saved_model_op_types(export_dir) if not hasattr(tf.raw_ops, op)]
    if foreign:
        raise RuntimeError(
            f"The exported graph uses non-stock TensorFlow ops {foreign}; TF Serving cannot run it. "
            "Switch the layers that use them to their stock implementation (see "
            "keras_maskrcnn.export.STOCK_OP_SWITCHES)."
        )


# --------------------------------------------------------------------------- export
def export_saved_model(
    model,
    path: Union[str, os.PathLike],
    version: Optional[int] = None,
    full_masks: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
) -> str:
    """Write ``model`` as a TF Serving SavedModel to ``path/<version>/``.

    Args:
        model: a :class:`~keras_maskrcnn.MaskRCNN` (built if it is not yet).
        path: the model's base folder (TF Serving's ``--model_base_path``); created if needed.
        version: integer version subfolder. Default: one more than the largest existing integer
            subfolder of ``path``, or ``1``.
        full_masks: also return ``full_masks [B, N, H, W]`` uint8 masks pasted at the original
            image size (large; see the module documentation).
        overwrite: replace ``path/<version>`` if it exists (otherwise that is an error).
            The SavedModel is written to a temporary folder in ``path`` and renamed into place,
            so a TF Serving instance watching ``path`` never sees a half-written version.
        verbose: print the endpoints Keras' ``ExportArchive`` writes.

    Returns:
        the SavedModel folder ``path/<version>``. Its signatures ``serving_default`` (input
        ``images`` uint8 ``[B, H, W, 3]``) and ``serving_bytes`` (input ``image_bytes`` string
        ``[B]``) are described in :mod:`keras_maskrcnn.export`.
    """
    import keras

    path = os.fspath(path)
    if version is None:
        version = next_version(path)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative int, got {version!r}")
    export_dir = os.path.join(path, str(version))
    if os.path.exists(export_dir) and not overwrite:
        raise FileExistsError(f"{export_dir!r} exists; pass overwrite=True or another version")
    for name in ("min_size", "max_size", "mask_threshold"):
        if not hasattr(model, name):
            raise TypeError(f"export_saved_model expects a keras_maskrcnn MaskRCNN, got {type(model).__name__}")
    if not model.built:
        model.build()
    min_size, max_size = int(model.min_size), int(model.max_size)

    def serve_images(images):
        images = _require_images(images, "images")
        shape = tf.shape(images)
        original = tf.tile(shape[None, 1:3], [shape[0], 1])
        resized = transform.resized_sizes(original, min_size, max_size)
        # One size for the whole batch: one batched resize (per pixel the same as per image).
        batch = transform.resize_images(images, transform.resized_sizes(shape[1:3], min_size, max_size))
        return _detect(model, batch, resized, original, full_masks)

    def serve_bytes(image_bytes):
        batch, resized, original = _decode_resize_pad(image_bytes, min_size, max_size)
        return _detect(model, batch, resized, original, full_masks)

    archive = keras.export.ExportArchive()
    with stock_ops_only(model):
        endpoints = [
            archive.add_endpoint(
                SERVING_DEFAULT,
                serve_images,
                input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
            ),
            archive.add_endpoint(
                SERVING_BYTES, serve_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")]
            ),
        ]
        # Trace now, while the switches hold (write_out would otherwise trace after the block).
        for endpoint in endpoints:
            endpoint.get_concrete_function()
        os.makedirs(path, exist_ok=True)
        # Not an integer name: TF Serving and next_version ignore it until the rename.
        staging = tempfile.mkdtemp(prefix=f".export-{version}-", dir=path)
        try:
            os.chmod(staging, 0o755)  # mkdtemp's 0o700 would hide it from a server running as another user
            archive.write_out(staging, verbose=verbose)
            _check_stock_ops(staging)
            if os.path.exists(export_dir):
                shutil.rmtree(export_dir)
            os.rename(staging, export_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return export_dir
