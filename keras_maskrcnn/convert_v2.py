"""torchvision's state dict names for the FPN and the heads of both of its Mask R-CNN layouts, and
the layout read off a state dict's keys (used by :mod:`keras_maskrcnn.convert`).

torchvision builds ``maskrcnn_resnet50_fpn`` (v1) and ``maskrcnn_resnet50_fpn_v2`` (v2) from the
same modules, so the names follow from the options; ours follow from the Keras model's structure:

========== ======================================================= ===========================================================
part       v1                                                      v2
========== ======================================================= ===========================================================
FPN        ``backbone.fpn.{inner,layer}_blocks.{i}.0`` conv + bias  ``.{i}.0`` conv without bias, ``.{i}.1`` ``BatchNorm2d``
RPN head   ``rpn.head.conv.0.0`` (3x3 conv + bias)                  ``rpn.head.conv.0.0``, ``rpn.head.conv.1.0``
box head   ``TwoMLPHead``: ``roi_heads.box_head.fc6``, ``.fc7``     ``FastRCNNConvFCHead``: ``roi_heads.box_head.{i}.0`` conv,
                                                                   ``.{i}.1`` ``BatchNorm2d`` (``i < 4``), ``.4`` flatten, ``.5`` FC
mask head  ``roi_heads.mask_head.{i}.0`` conv + bias                ``.{i}.0`` conv without bias, ``.{i}.1`` ``BatchNorm2d``
========== ======================================================= ===========================================================

Both flatten the pooled ``C, H, W`` features before the first FC layer (ours: ``H, W, C``; the
kernel's rows are permuted, :func:`~keras_maskrcnn.convert.chw_dense_kernel`). Batch norms map
``weight``, ``bias``, ``running_mean``, ``running_var`` to ``gamma``, ``beta``, ``moving_mean``,
``moving_variance``; ``num_batches_tracked`` carries no weights and is ignored.

**Backbone norm.** v2's ResNet-50 has ordinary ``BatchNorm2d`` (``resnet50()``'s default: the
``norm_layer=nn.BatchNorm2d`` that ``maskrcnn_resnet50_fpn_v2`` passes goes to the FPN), v1's
published one ``FrozenBatchNorm2d``. In eval mode ``BatchNorm2d`` computes exactly
``FrozenBatchNorm2d``'s affine map from the running statistics, which is ``backbone_norm="frozen_bn"``
(:class:`~keras_maskrcnn.layers.norm.FrozenBatchNormalization`, folded into the convolutions): the
converted model's default for both layouts. ``backbone_norm="batch_norm"`` loads the same keys into
trainable batch norms (batch statistics in training, as torchvision's v2 in train mode).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

from keras_maskrcnn.convert import Target, chw_dense_kernel, dense_kernel, identity, layer_targets

if TYPE_CHECKING:
    import keras

    from keras_maskrcnn.model import MaskRCNN

# The settings in which torchvision's two layouts differ, as MaskRCNN arguments.
LAYOUT_KEYS = ("fpn_norm", "rpn_conv_depth", "box_head_convs", "box_head_fcs", "head_norm")
V1_NAME, V2_NAME = "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"


def _conv_norm_targets(path: str, conv: "keras.layers.Layer", norm: Optional["keras.layers.Layer"]) -> dict[str, Target]:
    """torchvision's ``Conv2dNormActivation`` at ``path``: ``.0`` the conv, ``.1`` the norm (if any)."""
    targets = layer_targets(f"{path}.0", conv)
    if norm is not None:
        targets.update(layer_targets(f"{path}.1", norm))
    return targets


def neck_and_head_targets(model: "MaskRCNN") -> dict[str, Target]:
    """Keys of the FPN, the RPN head's 3x3 convs, the box head before its predictor and the mask
    head's convs, for the layout ``model`` is built with (v1, v2 or a mix of their options)."""
    targets: dict[str, Target] = {}
    fpn = model.fpn
    for i, (conv, norm) in enumerate(zip(fpn.lateral_convs, fpn.lateral_norms)):
        targets.update(_conv_norm_targets(f"backbone.fpn.inner_blocks.{i}", conv, norm))
    for i, (conv, norm) in enumerate(zip(fpn.output_convs, fpn.output_norms)):
        targets.update(_conv_norm_targets(f"backbone.fpn.layer_blocks.{i}", conv, norm))
    rpn = model.rpn_head
    for i, conv in enumerate([rpn.conv] + list(rpn.extra_convs)):
        targets.update(layer_targets(f"rpn.head.conv.{i}.0", conv))

    box = model.box_head
    size = model.box_roi_size
    channels = box.conv_channels if box.convs else model.fpn_channels
    if not box.convs and len(box.fcs) == 2:  # TwoMLPHead
        fc_paths = ["roi_heads.box_head.fc6", "roi_heads.box_head.fc7"]
    else:  # FastRCNNConvFCHead: convs, Flatten, then Linear + ReLU pairs
        for i, (conv, norm) in enumerate(zip(box.convs, box.conv_norms)):
            targets.update(_conv_norm_targets(f"roi_heads.box_head.{i}", conv, norm))
        fc_paths = [f"roi_heads.box_head.{len(box.convs) + 1 + 2 * j}" for j in range(len(box.fcs))]
    for j, (path, fc) in enumerate(zip(fc_paths, box.fcs)):
        kernel = chw_dense_kernel(channels, size, size) if j == 0 else dense_kernel
        targets[f"{path}.weight"] = (fc.kernel, kernel)
        targets[f"{path}.bias"] = (fc.bias, identity)

    mask = model.mask_head
    for i, (conv, norm) in enumerate(zip(mask.convs, mask.norms)):
        targets.update(_conv_norm_targets(f"roi_heads.mask_head.{i}", conv, norm))
    return targets


def _count(state: Mapping[str, Any], pattern: str) -> int:
    """How many of ``pattern.format(0)``, ``pattern.format(1)``, ... are keys, in a row from 0."""
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def infer_layout(state: Mapping[str, Any]) -> dict[str, Any]:
    """``MaskRCNN`` layout arguments read off a (canonical-key) state dict's names and shapes.

    ``fpn_norm`` (a ``.1`` batch norm after ``inner_blocks.0.0``), ``rpn_conv_depth`` (how many
    ``rpn.head.conv.{i}.0``), ``box_head_convs``, ``box_head_fcs`` and ``representation_size``
    (``fc6`` / ``fc7`` or ``FastRCNNConvFCHead``'s numbered blocks), ``head_norm`` (batch norms in
    the box or mask head), ``mask_head_convs``, and ``backbone_norm="frozen_bn"`` (torchvision's
    eval-mode behaviour for both layouts; see the module docstring). Absent parts are left out.
    """
    config: dict[str, Any] = {"backbone_norm": "frozen_bn"}
    if "backbone.fpn.inner_blocks.0.0.weight" in state:
        config["fpn_norm"] = "batch_norm" if "backbone.fpn.inner_blocks.0.1.weight" in state else None
    depth = _count(state, "rpn.head.conv.{}.0.weight")
    if depth:
        config["rpn_conv_depth"] = depth
    if "roi_heads.box_head.fc6.weight" in state:
        fc_keys = ["roi_heads.box_head.fc6.weight"]
        config.update(box_head_convs=0, box_head_fcs=2)
    else:
        convs = _count(state, "roi_heads.box_head.{}.0.weight")
        fc_keys = []
        while f"roi_heads.box_head.{convs + 1 + 2 * len(fc_keys)}.weight" in state:
            fc_keys.append(f"roi_heads.box_head.{convs + 1 + 2 * len(fc_keys)}.weight")
        if fc_keys:
            config.update(box_head_convs=convs, box_head_fcs=len(fc_keys))
    if fc_keys:
        config["representation_size"] = int(state[fc_keys[0]].shape[0])
    box_norm = "roi_heads.box_head.0.1.weight" in state
    mask_convs = _count(state, "roi_heads.mask_head.{}.0.weight")
    if mask_convs:
        config["mask_head_convs"] = mask_convs
    if fc_keys or mask_convs:
        config["head_norm"] = "batch_norm" if box_norm or "roi_heads.mask_head.0.1.weight" in state else None
    return config


def layout_name(config: Mapping[str, Any]) -> str:
    """``"maskrcnn_resnet50_fpn"`` (v1), ``"maskrcnn_resnet50_fpn_v2"`` or ``"custom"``, from the
    layout arguments in ``config`` (:data:`LAYOUT_KEYS`, as the presets state them)."""
    from keras_maskrcnn.presets import (
        torchvision_maskrcnn_resnet50_fpn_config,
        torchvision_maskrcnn_resnet50_fpn_v2_config,
    )

    presets = (V1_NAME, torchvision_maskrcnn_resnet50_fpn_config()), (V2_NAME, torchvision_maskrcnn_resnet50_fpn_v2_config())
    for name, preset in presets:
        if all(config.get(key, preset[key]) == preset[key] for key in LAYOUT_KEYS):
            return name
    return "custom"


def layout_preset(config: Mapping[str, Any]) -> dict[str, Any]:
    """The preset of :func:`layout_name`'s layout: torchvision's v2 settings for v2, else v1's."""
    from keras_maskrcnn import presets

    if layout_name(config) == V2_NAME:
        return presets.torchvision_maskrcnn_resnet50_fpn_v2_config()
    return presets.torchvision_maskrcnn_resnet50_fpn_config()


def describe_layout(config: Mapping[str, Any]) -> str:
    """One line naming the layout and its settings, e.g. for ``from_torchvision``'s log."""
    settings = ", ".join(f"{key}={config.get(key)!r}" for key in LAYOUT_KEYS)
    name = layout_name(config)
    label = {V1_NAME: "v1", V2_NAME: "v2"}.get(name)
    found = f"the {label} layout (torchvision's {name})" if label else "a custom layout of torchvision's modules"
    return f"{found}: backbone={config.get('backbone')!r}, {settings}"

