"""Load PyTorch (torchvision) state dicts into keras_maskrcnn models and layers.

A state dict is a mapping ``name -> array`` (numpy arrays or torch tensors), or a path to a
``.pth`` / ``.pt`` (read with torch, which is imported only then), ``.safetensors`` or ``.npz``
file. Loading is all-or-nothing: every missing key, unexpected key and shape mismatch is
collected and reported in one ``ValueError`` before any variable is written.

* :func:`from_torchvision`: a whole torchvision ``maskrcnn_resnet50_fpn`` or ``maskrcnn_resnet50_fpn_v2``
  (or another ResNet-FPN Mask R-CNN built from their modules; the layout is read off the keys,
  :mod:`keras_maskrcnn.convert_v2`) as a :class:`~keras_maskrcnn.MaskRCNN`, optionally with new
  class-dependent predictors for fine-tuning to another number of classes.
* :func:`convert_checkpoint`: the same, written to a ``.keras`` or ``.weights.h5`` file.
* :func:`load_torchvision_resnet`: an ImageNet ResNet / ResNeXt into a backbone alone.
"""
from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

import keras
import numpy as np

from keras_maskrcnn.layers.backbone import BACKBONES, FrozenBatchNormalization, ResNet
from keras_maskrcnn.state_dicts import canonical_keys, read_state_dict, to_numpy  # noqa: F401  (public here too)

if TYPE_CHECKING:
    from keras_maskrcnn.model import MaskRCNN

logger = logging.getLogger("keras_maskrcnn")
StateDict = Union[Mapping[str, Any], str, "os.PathLike[str]"]

# One target: the Keras variable and how a PyTorch array becomes its value.
Target = tuple[keras.Variable, Callable[[np.ndarray], np.ndarray]]


def identity(array: np.ndarray) -> np.ndarray:
    return array


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch conv weight ``[out, in / groups, kh, kw]`` to Keras ``[kh, kw, in / groups, out]``.

    Grouped convs need nothing more: both frameworks put group ``g``'s output channels at
    ``[g * out / groups, (g + 1) * out / groups)`` and its inputs at the same slice of ``in``.
    """
    return np.transpose(weight, (2, 3, 1, 0))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch ``Linear`` weight ``[out, in]`` to Keras ``Dense`` kernel ``[in, out]``."""
    return np.transpose(weight)


def conv_transpose_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch ``ConvTranspose2d`` weight ``[in, out, kh, kw]`` to Keras ``Conv2DTranspose``
    kernel ``[kh, kw, out, in]``. Neither framework flips the kernel: both compute
    ``y[s * i + k] += x[i] * w[k]``."""
    return np.transpose(weight, (2, 3, 1, 0))


def chw_dense_kernel(channels: int, height: int, width: int) -> Callable[[np.ndarray], np.ndarray]:
    """``Linear`` weight ``[out, C * H * W]`` on a ``C, H, W``-flattened input (torchvision's
    ``TwoMLPHead``) to a ``Dense`` kernel ``[H * W * C, out]`` on an ``H, W, C``-flattened one."""

    def transform(weight: np.ndarray) -> np.ndarray:
        if weight.ndim != 2 or weight.shape[1] != channels * height * width:
            return np.transpose(weight)  # wrong shape: reported by load_state_dict
        out = weight.shape[0]
        weight = weight.reshape(out, channels, height, width).transpose(2, 3, 1, 0)
        return weight.reshape(height * width * channels, out)

    return transform


def layer_targets(module_path: str, layer: keras.layers.Layer) -> dict[str, Target]:
    """State dict keys of one PyTorch module and the Keras variables they fill.

    Handles ``Conv2D`` (from ``nn.Conv2d``), ``Dense`` (from ``nn.Linear``) and
    :class:`FrozenBatchNormalization` or ``BatchNormalization`` (from ``FrozenBatchNorm2d`` or
    ``BatchNorm2d``).
    """
    if isinstance(layer, (FrozenBatchNormalization, keras.layers.BatchNormalization)):
        return {
            f"{module_path}.weight": (layer.gamma, identity),
            f"{module_path}.bias": (layer.beta, identity),
            f"{module_path}.running_mean": (layer.moving_mean, identity),
            f"{module_path}.running_var": (layer.moving_variance, identity),
        }
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
        kernel = conv_kernel if isinstance(layer, keras.layers.Conv2D) else dense_kernel
        targets = {f"{module_path}.weight": (layer.kernel, kernel)}
        if layer.use_bias:
            targets[f"{module_path}.bias"] = (layer.bias, identity)
        return targets
    raise TypeError(f"No PyTorch mapping for {type(layer).__name__} ({module_path!r}).")


def load_state_dict(
    targets: Mapping[str, Target],
    state_dict: Mapping[str, Any],
    prefix: str = "",
    ignore: Callable[[str], bool] = lambda key: False,
    source_names: Optional[Mapping[str, str]] = None,
) -> None:
    """Copy ``state_dict`` into ``targets`` (keys relative to ``prefix``), strictly.

    Only keys starting with ``prefix`` are considered (the rest belong to other modules); of those,
    keys for which ``ignore`` (given the key without prefix) is true are skipped. Every other key must
    match a target and every target needs a key with the right shape, else nothing is written and
    a ``ValueError`` lists all the problems. ``source_names`` (key -> name in the user's file) is
    used in that message for keys that were renamed before loading.
    """
    source_names = source_names or {}
    arrays = {}
    unexpected = []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if ignore(name):
            continue
        if name in targets:
            arrays[name] = value
        else:
            unexpected.append(source_names.get(key, key))
    missing = [prefix + name for name in targets if name not in arrays]

    values = []
    mismatched = []
    for name, value in arrays.items():
        variable, transform = targets[name]
        source = to_numpy(value)
        converted = transform(source)
        if tuple(converted.shape) != tuple(variable.shape):
            mismatched.append(
                f"{source_names.get(prefix + name, prefix + name)}: shape {tuple(source.shape)} "
                f"(Keras layout {tuple(converted.shape)}), expected Keras shape {tuple(variable.shape)}"
            )
        else:
            values.append((variable, converted))

    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if problems:
        raise ValueError("Cannot load the state dict:\n  " + "\n  ".join(problems))
    for variable, value in values:
        variable.assign(value.astype(variable.dtype))


def _ignore_resnet_key(name: str) -> bool:
    # BN step counters carry no weights; `fc` is the classifier, absent from the backbone.
    return name.endswith("num_batches_tracked") or name.startswith("fc.")


def load_torchvision_resnet(backbone: ResNet, state_dict: StateDict, prefix: str = "") -> None:
    """Copy a torchvision ``ResNet`` / ``ResNeXt`` state dict into a Keras :class:`ResNet`.

    Args:
        backbone: the Keras ``ResNet``, built by this call if needed; its ``depth``, ``groups``
            and ``width_per_group`` must match the source model.
        state_dict: ``name -> array`` (numpy or torch), e.g. ``torchvision.models.resnet50().state_dict()``,
            or a ``.pth`` / ``.safetensors`` / ``.npz`` file (see :func:`read_state_dict`), e.g.
            the ImageNet ``resnet50-0676ba61.pth``.
        prefix: where the ResNet sits in ``state_dict``, e.g. ``"backbone.body."`` for torchvision's
            ``maskrcnn_resnet50_fpn``; keys outside it are left alone.

    ``num_batches_tracked`` and ``fc.*`` keys are ignored. Raises ``ValueError`` listing every
    missing key, unexpected key and shape mismatch, in which case nothing is loaded.

    Example:

    ```python
    maskrcnn = torchvision.models.detection.maskrcnn_resnet50_fpn(weights="DEFAULT")
    backbone = ResNet(depth=50)
    load_torchvision_resnet(backbone, maskrcnn.state_dict(), prefix="backbone.body.")
    ```
    """
    state_dict = read_state_dict(state_dict)
    if not backbone.built:
        backbone.build((None, None, None, 3))
    load_state_dict(_resnet_targets(backbone), state_dict, prefix=prefix, ignore=_ignore_resnet_key)


def _resnet_targets(backbone: ResNet, prefix: str = "") -> dict[str, Target]:
    targets = {}
    for module_path, layer in backbone.named_layers().items():
        targets.update(layer_targets(prefix + module_path, layer))
    return targets


# ------------------------------------------------------------------------------ Mask R-CNN
# Class-dependent layers, re-initialised when fine-tuning to other classes.
PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
_CLS_SCORE = "roi_heads.box_predictor.cls_score.weight"


def _conv_transpose_targets(module_path: str, layer: keras.layers.Conv2DTranspose) -> dict[str, Target]:
    targets = {f"{module_path}.weight": (layer.kernel, conv_transpose_kernel)}
    if layer.use_bias:
        targets[f"{module_path}.bias"] = (layer.bias, identity)
    return targets


def maskrcnn_targets(model: "MaskRCNN") -> dict[str, Target]:
    """Current torchvision state dict keys of ``model``'s layout (``maskrcnn_resnet50_fpn``,
    ``maskrcnn_resnet50_fpn_v2`` or a mix of their options) and the variables they fill."""
    from keras_maskrcnn.convert_v2 import neck_and_head_targets

    if not isinstance(model.backbone, ResNet):
        raise TypeError(f"torchvision weights need a named ResNet backbone, not {type(model.backbone).__name__}.")
    if not model.built:
        model.build()
    targets = _resnet_targets(model.backbone, prefix="backbone.body.")
    targets.update(neck_and_head_targets(model))  # FPN, RPN and RoI head convs, FC layers, norms
    targets.update(layer_targets("rpn.head.cls_logits", model.rpn_head.cls_logits))
    targets.update(layer_targets("rpn.head.bbox_pred", model.rpn_head.bbox_pred))
    box, mask = model.box_head, model.mask_head
    targets.update(layer_targets("roi_heads.box_predictor.cls_score", box.cls_score))
    targets.update(layer_targets("roi_heads.box_predictor.bbox_pred", box.bbox_pred))
    targets.update(_conv_transpose_targets("roi_heads.mask_predictor.conv5_mask", mask.upsample))
    targets.update(layer_targets("roi_heads.mask_predictor.mask_fcn_logits", mask.logits))
    return targets


def _predictor_layers(model: "MaskRCNN") -> list:
    return [model.box_head.cls_score, model.box_head.bbox_pred, model.mask_head.logits]


def reset_predictors(model: "MaskRCNN") -> None:
    """Re-initialise the class-dependent layers (box ``cls_score``, ``bbox_pred``, ``mask_fcn_logits``)."""
    for layer in _predictor_layers(model):
        layer.kernel.assign(layer.kernel_initializer(layer.kernel.shape, dtype=layer.kernel.dtype))
        if layer.use_bias:
            layer.bias.assign(layer.bias_initializer(layer.bias.shape, dtype=layer.bias.dtype))


def load_torchvision_maskrcnn(model: "MaskRCNN", state_dict: StateDict, reset_heads: bool = False) -> None:
    """Copy a torchvision Mask R-CNN state dict (current or legacy key names) into ``model``.

    ``num_batches_tracked`` keys are ignored. With ``reset_heads`` the class-dependent predictors
    are not loaded (their shapes may differ) but re-initialised. Raises ``ValueError`` listing every
    missing key, unexpected key and shape mismatch, in which case nothing is loaded.
    """
    state, original = canonical_keys(read_state_dict(state_dict))
    targets = maskrcnn_targets(model)

    def ignore(key: str) -> bool:
        return key.endswith("num_batches_tracked") or (reset_heads and key.startswith(PREDICTOR_PREFIXES))

    if reset_heads:
        targets = {k: v for k, v in targets.items() if not k.startswith(PREDICTOR_PREFIXES)}
    load_state_dict(targets, state, ignore=ignore, source_names=original)
    if reset_heads:
        reset_predictors(model)


def _shape(value: Any) -> tuple:
    return tuple(int(d) for d in value.shape)


def infer_architecture(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``MaskRCNN`` arguments read off a (canonical-key) torchvision state dict's names and shapes.

    ``backbone`` (from the ResNet's blocks per stage and group width), ``fpn_channels``, and the
    layout (:func:`keras_maskrcnn.convert_v2.infer_layout`; for v2 the entries of
    :func:`~keras_maskrcnn.presets.torchvision_maskrcnn_resnet50_fpn_v2_config`); entries whose keys
    are absent are left out.
    """
    from keras_maskrcnn.convert_v2 import infer_layout

    config: dict[str, Any] = {}
    prefix = "backbone.body."
    blocks = []
    for stage in range(1, 5):
        pattern = re.compile(rf"^{re.escape(prefix)}layer{stage}\.(\d+)\.conv1\.weight$")
        indices = {int(m[1]) for m in map(pattern.match, state_dict) if m}
        blocks.append(max(indices) + 1 if indices else 0)
    if all(blocks):
        from keras_maskrcnn.layers.backbone import BLOCKS_PER_STAGE

        bottleneck = f"{prefix}layer1.0.conv3.weight" in state_dict
        groups = width_per_group = None
        if bottleneck:
            conv2 = _shape(state_dict[f"{prefix}layer1.0.conv2.weight"])
            groups = conv2[0] // conv2[1]
            width_per_group = conv2[0] // groups
        for name, spec in BACKBONES.items():
            depth = spec["depth"]
            if tuple(BLOCKS_PER_STAGE[depth]) != tuple(blocks) or (depth >= 50) != bottleneck:
                continue
            if bottleneck and (spec["groups"], spec["width_per_group"]) != (groups, width_per_group):
                continue
            config["backbone"] = name
            break
        else:
            raise ValueError(
                f"The state dict's ResNet (blocks per stage {tuple(blocks)}, groups {groups}, "
                f"width per group {width_per_group}) is none of {sorted(BACKBONES)}."
            )
    if "backbone.fpn.inner_blocks.0.0.weight" in state_dict:
        config["fpn_channels"] = _shape(state_dict["backbone.fpn.inner_blocks.0.0.weight"])[0]
    config.update(infer_layout(state_dict))
    return config


def from_torchvision(
    state_dict: StateDict,
    num_classes: Optional[int] = None,
    reset_heads: Optional[bool] = None,
    verbose: bool = True,
    **model_kwargs: Any,
) -> "MaskRCNN":
    """A :class:`~keras_maskrcnn.MaskRCNN` holding torchvision Mask R-CNN weights.

    Args:
        state_dict: torchvision ``maskrcnn_resnet50_fpn`` or ``maskrcnn_resnet50_fpn_v2`` weights: a
            mapping ``name -> array`` (numpy or torch; e.g. ``model.state_dict()``) or a ``.pth`` /
            ``.safetensors`` / ``.npz`` file such as the published ``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth``
            or ``maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth``. Both the published files' key names
            and current torchvision's are accepted. The layout (v1 or v2) is read off the keys and
            logged (``keras_maskrcnn`` logger, INFO; printed too with ``verbose``).
        num_classes: object classes, background excluded (torchvision's ``num_classes - 1``:
            90 for COCO, whose class ids are then torchvision's labels, i.e. COCO category ids).
            Default: read from ``roi_heads.box_predictor.cls_score.weight``.
        reset_heads: re-initialise the class-dependent layers (box ``cls_score`` and ``bbox_pred``,
            ``mask_fcn_logits``) instead of loading them, keeping the backbone, FPN, RPN and the
            shared box and mask head layers: fine-tuning to new classes. Default: only when
            ``num_classes`` differs from the checkpoint's.
        verbose: print the layout found.
        **model_kwargs: further ``MaskRCNN`` arguments (``min_size``, ``box_score_threshold``,
            ``mask_output``...). Defaults: :func:`~keras_maskrcnn.presets.torchvision_maskrcnn_resnet50_fpn_config`
            (v1) or ``..._v2_config`` (v2), with :func:`infer_architecture`'s entries read off the weights.

    Raises:
        ValueError: listing all missing keys, unexpected keys and shape mismatches at once.

    Example:

    ```python
    model = from_torchvision("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")  # COCO, 90 classes
    results = model.predict_images([image])  # preprocessed exactly as torchvision does
    finetune = from_torchvision("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", num_classes=3)
    v2 = from_torchvision("maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth")  # v2's layout, read off the keys
    ```
    """
    from keras_maskrcnn.convert_v2 import describe_layout, layout_preset
    from keras_maskrcnn.model import MaskRCNN

    raw = read_state_dict(state_dict)
    state, _ = canonical_keys(raw)
    checkpoint_classes = _shape(state[_CLS_SCORE])[0] - 1 if _CLS_SCORE in state else None
    if num_classes is None:
        if checkpoint_classes is None:
            raise ValueError(f"The state dict has no {_CLS_SCORE!r}: pass num_classes.")
        num_classes = checkpoint_classes
    if reset_heads is None:
        reset_heads = checkpoint_classes is not None and num_classes != checkpoint_classes
    inferred = infer_architecture(state)
    config = {**layout_preset(inferred), **inferred}
    message = f"from_torchvision: found {describe_layout(config)}."
    logger.info(message)
    if verbose:
        print(message)
    config.update(model_kwargs)
    model = MaskRCNN(num_classes=num_classes, **config)
    model.build()
    load_torchvision_maskrcnn(model, raw, reset_heads=reset_heads)
    return model


_OUTPUT_SUFFIXES = (".keras", ".weights.h5")


def convert_checkpoint(
    source_path: Union[str, "os.PathLike[str]"],
    output_path: Union[str, "os.PathLike[str]"],
    num_classes: Optional[int] = None,
    reset_heads: Optional[bool] = None,
    **model_kwargs: Any,
) -> "MaskRCNN":
    """Convert a torchvision Mask R-CNN checkpoint to a Keras file; returns the model.

    ``output_path`` ending in ``.keras`` gets the whole model (``keras.models.load_model`` restores
    it, configuration included); ``.weights.h5`` gets the weights only (load them into a
    ``MaskRCNN(**from_torchvision's configuration)`` with ``load_weights``). The other arguments
    are :func:`from_torchvision`'s.
    """
    output = os.fspath(output_path)
    if not output.endswith(_OUTPUT_SUFFIXES):
        raise ValueError(f"output_path must end in .keras or .weights.h5, got {output!r}.")
    model = from_torchvision(source_path, num_classes=num_classes, reset_heads=reset_heads, **model_kwargs)
    parent = os.path.dirname(output)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if output.endswith(".keras"):
        model.save(output)
    else:
        model.save_weights(output)
    return model
