"""The optional compiled multi-level RoIAlign op (``custom_ops/roi_align``): loading and Python API.

``make -C custom_ops`` builds ``custom_ops/roi_align/_roi_align_ops.so`` with two TensorFlow ops:
``MultiLevelRoiAlign`` (torchvision's ``roi_align`` over all FPN levels in one pass, C++ CPU kernel
and, when TensorFlow has CUDA, a CUDA kernel) and its gradient ``MultiLevelRoiAlignGrad``. Nothing
requires it: without it :class:`keras_maskrcnn.layers.MultiLevelROIAlign` uses the stock-op
implementation (:func:`keras_maskrcnn.ops.roi_align`). The library is looked for, in order, at

* ``$KERAS_MASKRCNN_ROI_ALIGN_OP`` (a path; ``0`` disables the op),
* ``keras_maskrcnn/ops/_roi_align_ops.so`` (a copy next to this module),
* ``custom_ops/roi_align/_roi_align_ops.so`` in the source tree (editable installs).

SavedModels that use the op need the library wherever they are loaded (TF Serving cannot run them),
which is why :func:`keras_maskrcnn.export.export_saved_model` switches layers to stock ops.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import List, Optional, Sequence, Union

import tensorflow as tf

logger = logging.getLogger("keras_maskrcnn")

ENV_VAR = "KERAS_MASKRCNN_ROI_ALIGN_OP"
LIBRARY_NAME = "_roi_align_ops.so"
MAX_LEVELS = 8  # kMaxLevels of the kernels

# The CUDA kernels are verified on an H200 without TensorFlow (custom_ops/gpu_check.sh: equal to the
# CPU kernel and to torchvision's compiled CPU roi_align, bitwise forward; memcheck clean), but the
# TensorFlow GPU kernel that launches them has not run inside TensorFlow on a GPU. Until it has,
# "auto" uses the compiled op only where TensorFlow sees no GPU; implementation="custom_op" uses
# it everywhere.
CUDA_KERNEL_VERIFIED = False

_lock = threading.Lock()
_ops = None  # the loaded op module
_error: Optional[str] = None  # why it is not available (once tried)
_fallback_logged = False


def library_candidates() -> List[str]:
    """Paths tried, in order, by :func:`available`."""
    env = os.environ.get(ENV_VAR, "")
    if env and env != "0":
        return [env]
    here = os.path.dirname(os.path.abspath(__file__))
    source_tree = os.path.join(os.path.dirname(os.path.dirname(here)), "custom_ops", "roi_align", LIBRARY_NAME)
    return [os.path.join(here, LIBRARY_NAME), source_tree]


def _load():
    global _ops, _error
    with _lock:
        if _ops is not None or _error is not None:
            return _ops
        if os.environ.get(ENV_VAR) == "0":
            _error = f"disabled by {ENV_VAR}=0"
            return None
        paths = [p for p in library_candidates() if os.path.isfile(p)]
        if not paths:
            _error = f"{LIBRARY_NAME} not built (run `make -C custom_ops`)"
            return None
        try:
            ops = tf.load_op_library(paths[0])
        except Exception as exc:  # a library built against another TensorFlow, missing symbols, ...
            _error = f"loading {paths[0]} failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
            return None
        _register_gradients()
        _ops = ops
        return _ops


def available() -> bool:
    """Whether the compiled op is loadable (tries once; see :func:`reload`)."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is ``False`` (``None`` when it is ``True``)."""
    return None if available() else _error


def reload() -> bool:
    """Forget a failed load (e.g. after building the library in this process) and try again."""
    global _error
    with _lock:
        if _ops is None:
            _error = None
    return available()


def forget() -> None:
    """Drop the loaded module and any failure, so that the next :func:`available` looks again
    (the library itself stays loaded in the process). Tests that load a library built elsewhere
    use it to hand ``"auto"`` back to the stock path afterwards."""
    global _ops, _error
    with _lock:
        _ops = None
        _error = None


def auto_fallback_reason() -> Optional[str]:
    """Why ``implementation="auto"`` does not use the compiled op here (``None``: it does)."""
    if not available():
        return unavailable_reason()
    if not CUDA_KERNEL_VERIFIED and tf.config.list_physical_devices("GPU"):
        return "a GPU is visible and the op's TensorFlow GPU kernel has not been verified on a GPU yet"
    return None


def log_fallback_once(reason: str) -> None:
    """Log, once per process, that the stock-op RoIAlign is used instead of the compiled op."""
    global _fallback_logged
    if _fallback_logged:
        return
    _fallback_logged = True
    logger.info(
        "MultiLevelROIAlign(implementation='auto') uses the crop_and_resize implementation: "
        "compiled RoIAlign op not used (%s).",
        reason,
    )


def _register_gradients() -> None:
    def op_attrs(op):
        return dict(
            pooled_height=op.get_attr("pooled_height"),
            pooled_width=op.get_attr("pooled_width"),
            spatial_scales=op.get_attr("spatial_scales"),
            sampling_ratio=op.get_attr("sampling_ratio"),
            aligned=op.get_attr("aligned"),
        )

    def forward_grad(op, grad):
        n = op.get_attr("N")
        features = list(op.inputs[:n])
        boxes, box_indices, levels = op.inputs[n : n + 3]
        d_features = _ops.multi_level_roi_align_grad(grad, boxes, box_indices, levels, features, **op_attrs(op))
        return list(d_features) + [None, None, None]

    def backward_grad(op, *grads):
        # MultiLevelRoiAlignGrad is linear in `grad` (its adjoint is the forward op) and does not
        # depend on the feature values (only their shapes).
        n = op.get_attr("N")
        _, boxes, box_indices, levels = op.inputs[:4]
        grads = [tf.zeros_like(f) if g is None else g for g, f in zip(grads, op.inputs[4:])]
        d_grad = _ops.multi_level_roi_align(grads, boxes, box_indices, levels, **op_attrs(op))
        return [d_grad, None, None, None] + [None] * n

    for name, fn in (("MultiLevelRoiAlign", forward_grad), ("MultiLevelRoiAlignGrad", backward_grad)):
        try:
            tf.RegisterGradient(name)(fn)
        except KeyError:  # already registered (module reloaded)
            pass


def multilevel_roi_align(
    features: Sequence[tf.Tensor],
    boxes: tf.Tensor,
    box_indices: tf.Tensor,
    levels: tf.Tensor,
    output_size: Union[int, Sequence[int]],
    spatial_scales: Sequence[float],
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> tf.Tensor:
    """torchvision's ``roi_align`` over several feature maps in one op (compiled; see module doc).

    Args:
        features: list of NHWC maps ``[B, H_l, W_l, C]`` (same ``B``, ``C`` and dtype: float32,
            float16 or bfloat16; accumulated in float32).
        boxes: ``[K, 4]`` ``(x1, y1, x2, y2)`` in input pixels (float32; no gradient).
        box_indices: ``[K]`` int32, the image of each box.
        levels: ``[K]`` int32, the index in ``features`` of the map each box is pooled from.
        output_size: ``int`` or ``(out_h, out_w)``.
        spatial_scales: per map, feature pixels per input pixel (``1 / stride``).
        sampling_ratio: samples per bin and axis; ``<= 0`` is torchvision's adaptive
            ``ceil(roi_size / output_size)`` per box.
        aligned: torchvision's ``aligned`` (half-pixel shift).

    Returns:
        ``[K, out_h, out_w, C]`` in the features' dtype. Out-of-range ``box_indices`` / ``levels``
        are errors on the CPU; the CUDA kernel pools zeros for them.

    Raises:
        RuntimeError: the compiled op is not available.
    """
    ops = _load()
    if ops is None:
        raise RuntimeError(f"The compiled RoIAlign op is not available: {_error}.")
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    out_h, out_w = (int(s) for s in output_size)
    features = [tf.convert_to_tensor(f) for f in features]
    if not 1 <= len(features) <= MAX_LEVELS:
        raise ValueError(f"Expected 1..{MAX_LEVELS} feature maps, got {len(features)}")
    if len(spatial_scales) != len(features):
        raise ValueError(f"{len(spatial_scales)} spatial_scales for {len(features)} feature maps")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise ValueError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    return ops.multi_level_roi_align(
        features,
        tf.cast(boxes, tf.float32),
        tf.cast(box_indices, tf.int32),
        tf.cast(levels, tf.int32),
        pooled_height=out_h,
        pooled_width=out_w,
        spatial_scales=[float(s) for s in spatial_scales],
        sampling_ratio=sampling_ratio,
        aligned=bool(aligned),
    )
