"""ResNet / ResNeXt backbones that match torchvision's numerically.

The layers mirror ``torchvision.models.resnet`` (``BasicBlock`` for ResNet-18/34; ``Bottleneck``
v1.5, with the stride in the 3x3 conv, for ResNet-50/101/152 and ResNeXt) with
``FrozenBatchNorm2d``, as used by torchvision's detection models, so that torchvision weights load
one to one (see :func:`keras_maskrcnn.convert.load_torchvision_resnet`).

Images are NHWC, already normalised (mean/std); features are returned as ``[C2, C3, C4, C5]``.
"""
from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf
from keras import ops

from keras_maskrcnn.layers.conv import Conv2D
from keras_maskrcnn.layers.norm import NORMS, FrozenBatchNormalization, conv_norm, make_norm

BLOCKS_PER_STAGE = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

# torchvision's widths of layer1 .. layer4 (``planes``; the outputs have ``planes * expansion`` channels).
DEFAULT_STAGE_CHANNELS = (64, 128, 256, 512)

# Names accepted by `build_backbone`, as torchvision's constructor arguments.
BACKBONES = {
    "resnet18": dict(depth=18, groups=1, width_per_group=64),
    "resnet34": dict(depth=34, groups=1, width_per_group=64),
    "resnet50": dict(depth=50, groups=1, width_per_group=64),
    "resnet101": dict(depth=101, groups=1, width_per_group=64),
    "resnext101_32x8d": dict(depth=101, groups=32, width_per_group=8),
}

# torchvision's `trainable_backbone_layers` counts from the top: 3 trains layer2..layer4.
_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")
NUM_FEATURE_MAPS = 4


def _conv(filters: int, kernel_size: int, name: str, strides: int = 1, groups: int = 1, dtype=None):
    return Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=kernel_size // 2,  # PyTorch's symmetric padding (7x7: 3, 3x3: 1, 1x1: 0)
        groups=groups,
        use_bias=False,
        # torchvision's ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu").
        kernel_initializer=keras.initializers.VarianceScaling(
            2.0, mode="fan_out", distribution="untruncated_normal"
        ),
        name=name,
        dtype=dtype,
    )


def _out_size(size, stride: int):
    # Every strided op here (7x7/pad 3, 3x3/pad 1 conv and max pool) gives floor((n - 1) / s) + 1.
    return None if size is None else (size - 1) // stride + 1


class _Block(keras.layers.Layer):
    """Residual block base: ``relu(residual(x) + shortcut(x))``, torchvision's module layout.

    ``module_path`` is the torchvision module path (``"layer1.0"``); sublayer names are that path with
    ``_`` for ``.``, so ``layer1_0_downsample_0`` is torchvision's ``layer1.0.downsample.0``.
    Subclasses set ``expansion`` and ``layer_names`` (their conv/BN attributes, named as in
    torchvision), create those in ``__init__`` and then call :meth:`_init_downsample`, and
    implement ``_build_residual`` and ``_residual`` (which adds the shortcut and applies the
    last ReLU, so both fuse into the last convolution).
    """

    expansion: int
    layer_names: tuple[str, ...]

    def __init__(self, module_path: str, planes: int, strides: int, norm: str = "frozen_bn", **kwargs):
        self.prefix = module_path.replace(".", "_")
        self.norm = norm
        super().__init__(name=self.prefix, **kwargs)
        self.module_path = module_path
        self.out_channels = planes * self.expansion
        self.strides = strides

    def _init_downsample(self, downsample: bool):
        if downsample:
            dtype = self.dtype_policy
            self.downsample_conv = _conv(
                self.out_channels, 1, f"{self.prefix}_downsample_0", strides=self.strides, dtype=dtype
            )
            self.downsample_bn = make_norm(self.norm, f"{self.prefix}_downsample_1", dtype)
        else:
            self.downsample_conv = self.downsample_bn = None

    def named_layers(self) -> dict[str, keras.layers.Layer]:
        """Sublayers with weights, keyed by their torchvision module path."""
        layers = {f"{self.module_path}.{n}": getattr(self, n) for n in self.layer_names}
        if self.downsample_conv is not None:
            layers[f"{self.module_path}.downsample.0"] = self.downsample_conv
            layers[f"{self.module_path}.downsample.1"] = self.downsample_bn
        return layers

    def build(self, input_shape):
        in_channels = input_shape[-1]
        self._build_residual(in_channels)
        if self.downsample_conv is not None:
            self.downsample_conv.build((None, None, None, in_channels))
            self.downsample_bn.build((None, None, None, self.out_channels))

    def call(self, inputs, training=None):
        shortcut = inputs
        if self.downsample_conv is not None:
            shortcut = conv_norm(self.downsample_conv, self.downsample_bn, inputs, training)
        return self._residual(inputs, shortcut, training)

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        return (b, _out_size(h, self.strides), _out_size(w, self.strides), self.out_channels)


class _BasicBlock(_Block):
    """torchvision's ``BasicBlock``: 3x3 (stride) -> 3x3, expansion 1, plus a projection shortcut."""

    expansion = 1
    layer_names = ("conv1", "bn1", "conv2", "bn2")

    def __init__(self, module_path: str, planes: int, strides: int, downsample: bool, **kwargs):
        super().__init__(module_path, planes, strides, **kwargs)
        prefix, dtype = self.prefix, self.dtype_policy
        self.conv1 = _conv(planes, 3, f"{prefix}_conv1", strides=strides, dtype=dtype)
        self.bn1 = make_norm(self.norm, f"{prefix}_bn1", dtype)
        self.conv2 = _conv(planes, 3, f"{prefix}_conv2", dtype=dtype)
        self.bn2 = make_norm(self.norm, f"{prefix}_bn2", dtype)
        self._init_downsample(downsample)

    def _build_residual(self, in_channels):
        planes = self.out_channels
        self.conv1.build((None, None, None, in_channels))
        self.conv2.build((None, None, None, planes))
        self.bn1.build((None, None, None, planes))
        self.bn2.build((None, None, None, planes))

    def _residual(self, inputs, shortcut, training):
        x = conv_norm(self.conv1, self.bn1, inputs, training, relu=True)
        return conv_norm(self.conv2, self.bn2, x, training, relu=True, residual=shortcut)


class _Bottleneck(_Block):
    """torchvision's ``Bottleneck``: 1x1 -> 3x3 (stride, groups) -> 1x1, expansion 4, plus a projection shortcut."""

    expansion = 4
    layer_names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")

    def __init__(
        self, module_path: str, planes: int, width: int, strides: int, groups: int, downsample: bool, **kwargs
    ):
        super().__init__(module_path, planes, strides, **kwargs)
        prefix, dtype = self.prefix, self.dtype_policy
        self.conv1 = _conv(width, 1, f"{prefix}_conv1", dtype=dtype)
        self.bn1 = make_norm(self.norm, f"{prefix}_bn1", dtype)
        self.conv2 = _conv(width, 3, f"{prefix}_conv2", strides=strides, groups=groups, dtype=dtype)
        self.bn2 = make_norm(self.norm, f"{prefix}_bn2", dtype)
        self.conv3 = _conv(self.out_channels, 1, f"{prefix}_conv3", dtype=dtype)
        self.bn3 = make_norm(self.norm, f"{prefix}_bn3", dtype)
        self._init_downsample(downsample)

    def _build_residual(self, in_channels):
        width = self.conv1.filters
        self.conv1.build((None, None, None, in_channels))
        for bn, channels in ((self.bn1, width), (self.bn2, width), (self.bn3, self.out_channels)):
            bn.build((None, None, None, channels))
        self.conv2.build((None, None, None, width))
        self.conv3.build((None, None, None, width))

    def _residual(self, inputs, shortcut, training):
        x = conv_norm(self.conv1, self.bn1, inputs, training, relu=True)
        x = conv_norm(self.conv2, self.bn2, x, training, relu=True)
        return conv_norm(self.conv3, self.bn3, x, training, relu=True, residual=shortcut)


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class ResNet(keras.layers.Layer):
    """ResNet / ResNeXt feature extractor, layer for layer torchvision's ``resnet*`` / ``resnext*``.

    ``conv1`` (7x7, stride 2) -> ``bn1`` -> ReLU -> 3x3 max pool (stride 2) -> ``layer1`` ..
    ``layer4`` of residual blocks (``BasicBlock`` for depth 18/34, ``Bottleneck`` for 50/101/152), with ``FrozenBatchNormalization`` everywhere, no conv biases
    and PyTorch's symmetric padding (:class:`~keras_maskrcnn.layers.conv.Conv2D`: Keras ``"same"``
    pads only bottom/right when the stride is 2, which shifts every feature map by a pixel).
    Frozen batch norms are folded into their convolutions (see :func:`conv_norm`).
    Each strided op maps a side ``n`` to ``ceil(n / 2)``, as in torchvision.

    Sublayer names follow torchvision's module paths with ``_`` for ``.`` (``conv1``, ``bn1``,
    ``layer1_0_conv1``, ``layer1_0_downsample_0``, ...); :meth:`named_layers` gives the mapping.

    Args:
        depth: 18, 34, 50, 101 or 152; sets the block type (18/34: ``BasicBlock``, two 3x3 convs,
            expansion 1; 50 and up: ``Bottleneck``, expansion 4) and the number of blocks per stage.
        groups: groups of the bottleneck 3x3 convs (32 for ResNeXt-101 32x8d); must be 1 for
            depth 18/34, as in torchvision.
        width_per_group: 64 for ResNet, 8 for ResNeXt-101 32x8d. Bottleneck width is
            ``planes * width_per_group / 64 * groups``; must be 64 for depth 18/34.
        trainable_layers: torchvision's ``trainable_backbone_layers``, 0 to 5: how many of
            ``layer4, layer3, layer2, layer1, conv1`` train (3 = ``layer2`` .. ``layer4``).
            The others get ``trainable=False``; note that setting ``trainable = True`` on this layer
            afterwards unfreezes them (Keras propagates ``trainable`` to sublayers).
        norm: ``"frozen_bn"`` (default; fixed statistics, for pretrained weights) or
            ``"batch_norm"`` (trainable ``BatchNormalization``, for training from scratch).
        blocks_per_stage: overrides the four block counts that ``depth`` implies (small test models);
            the block type still follows ``depth``.
        stage_channels: the ``planes`` of ``layer1`` .. ``layer4`` (timm's ``channels``); default
            ``(64, 128, 256, 512)``, torchvision's. Narrower late stages make a cheaper CPU model
            (``presets.demo_config``); the outputs have ``planes * expansion`` channels.
        **kwargs: standard layer arguments (``name``, ``dtype``, ``trainable``).

    Call arguments:
        images: ``[B, H, W, 3]`` float images, already normalised; ``B``, ``H``, ``W`` may be unknown.

    Returns:
        ``[C2, C3, C4, C5]``: ``[B, ceil(H / s), ceil(W / s), c]`` for strides ``s`` = 4, 8, 16, 32
        (see ``feature_strides``) and channels ``c`` (``out_channels``) = 256, 512, 1024, 2048
        for depth 50 and up, 64, 128, 256, 512 for depth 18/34 (``stage_channels`` times the
        expansion), in the compute dtype.

    Example:

    ```python
    backbone = ResNet(depth=50)
    c2, c3, c4, c5 = backbone(np.zeros((1, 65, 97, 3), "float32"))
    # c2: [1, 17, 25, 256], c3: [1, 9, 13, 512], c4: [1, 5, 7, 1024], c5: [1, 3, 4, 2048]
    ```
    """

    feature_strides = (4, 8, 16, 32)

    def __init__(
        self,
        depth: int = 50,
        groups: int = 1,
        width_per_group: int = 64,
        trainable_layers: int = 3,
        blocks_per_stage: Sequence[int] | None = None,
        norm: str = "frozen_bn",
        stage_channels: Sequence[int] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if norm not in NORMS:
            raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"`depth` must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth}.")
        block_type = _BasicBlock if depth < 50 else _Bottleneck
        if block_type is _BasicBlock and (groups != 1 or width_per_group != 64):
            raise ValueError(
                f"ResNet-{depth} (BasicBlock) supports only groups=1 and width_per_group=64, "
                f"got groups={groups}, width_per_group={width_per_group}."
            )
        if blocks_per_stage is None:
            blocks_per_stage = BLOCKS_PER_STAGE[depth]
        blocks_per_stage = tuple(int(n) for n in blocks_per_stage)
        if len(blocks_per_stage) != 4 or min(blocks_per_stage) < 1:
            raise ValueError(f"`blocks_per_stage` must be four positive counts, got {blocks_per_stage}.")
        stage_channels = tuple(int(c) for c in (DEFAULT_STAGE_CHANNELS if stage_channels is None else stage_channels))
        if len(stage_channels) != 4 or min(stage_channels) < 1:
            raise ValueError(f"`stage_channels` must be four positive widths, got {stage_channels}.")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"`trainable_layers` must be in [0, 5], got {trainable_layers}.")
        self.depth = depth
        self.groups = groups
        self.width_per_group = width_per_group
        self.trainable_layers = trainable_layers
        self.blocks_per_stage = blocks_per_stage
        self.stage_channels = stage_channels
        self.norm = norm

        dtype = self.dtype_policy
        self.conv1 = _conv(64, 7, "conv1", strides=2, dtype=dtype)
        self.bn1 = make_norm(norm, "bn1", dtype)
        # PyTorch pads max pooling with -inf; its input is post-ReLU (>= 0) and every 3x3 window
        # holds at least one real pixel, so zero padding gives the same maximum.
        self.maxpool = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool", dtype=dtype)

        self.blocks = []
        self._stage_ends = []  # index of the last block of each stage, whose output is C2..C5
        in_channels = 64
        expansion = block_type.expansion
        for stage, (planes, num_blocks) in enumerate(zip(stage_channels, blocks_per_stage)):
            extra = {}
            if block_type is _Bottleneck:
                extra = dict(width=int(planes * (width_per_group / 64.0)) * groups, groups=groups)
            for i in range(num_blocks):
                strides = 2 if stage > 0 and i == 0 else 1
                block = block_type(
                    f"layer{stage + 1}.{i}",
                    planes=planes,
                    strides=strides,
                    downsample=i == 0 and (strides != 1 or in_channels != planes * expansion),
                    norm=norm,
                    dtype=dtype,
                    **extra,
                )
                self.blocks.append(block)
                in_channels = planes * expansion
            self._stage_ends.append(len(self.blocks) - 1)
        self.out_channels = tuple(planes * expansion for planes in stage_channels)

        trainable = set(_TRAINABLE_ORDER[:trainable_layers])
        if "conv1" not in trainable:
            self.conv1.trainable = False
            self.bn1.trainable = False
        for block in self.blocks:
            if block.module_path.split(".")[0] not in trainable:
                block.trainable = False

    def named_layers(self) -> dict[str, keras.layers.Layer]:
        """Every sublayer with weights, keyed by its torchvision module path (``"layer1.0.conv1"``)."""
        layers = {"conv1": self.conv1, "bn1": self.bn1}
        for block in self.blocks:
            layers.update(block.named_layers())
        return layers

    def build(self, input_shape=(None, None, None, 3)):
        self.conv1.build((None, None, None, input_shape[-1]))
        self.bn1.build((None, None, None, 64))
        in_channels = 64
        for block in self.blocks:
            block.build((None, None, None, in_channels))
            in_channels = block.out_channels

    def call(self, images, training=None):
        x = conv_norm(self.conv1, self.bn1, images, training, relu=True)
        x = self.maxpool(ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]))
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x, training=training)
            if i in self._stage_ends:
                features.append(x)
        return features

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        return [
            (b, _out_size(h, stride), _out_size(w, stride), channels)
            for stride, channels in zip(self.feature_strides, self.out_channels)
        ]

    def get_config(self):
        return {
            **super().get_config(),
            "depth": self.depth,
            "groups": self.groups,
            "width_per_group": self.width_per_group,
            "trainable_layers": self.trainable_layers,
            "blocks_per_stage": list(self.blocks_per_stage),
            "norm": self.norm,
            "stage_channels": list(self.stage_channels),
        }


def check_backbone_outputs(outputs, argument: str = "backbone") -> None:
    """Raise a ``ValueError`` unless ``outputs`` are four NHWC feature maps ``[C2, C3, C4, C5]``."""
    if not isinstance(outputs, (list, tuple)) or len(outputs) != NUM_FEATURE_MAPS:
        got = f"{len(outputs)} outputs" if isinstance(outputs, (list, tuple)) else "a single output"
        raise ValueError(
            f"`{argument}` must return {NUM_FEATURE_MAPS} feature maps [C2, C3, C4, C5] "
            f"(strides 4, 8, 16, 32), but it returns {got}."
        )
    for i, feature in enumerate(outputs):
        shape = tuple(feature.shape)
        if len(shape) != 4 or shape[-1] is None:
            raise ValueError(
                f"`{argument}` output {i} must be [B, H, W, C] with a known C, got shape {shape}."
            )


def backbone_channels(backbone: keras.layers.Layer) -> tuple[int, ...]:
    """Channel counts of ``backbone``'s four feature maps, e.g. ``(256, 512, 1024, 2048)``.

    A user model is validated with :func:`check_backbone_outputs`; a subclassed one is called once
    on a symbolic ``[None, None, None, 3]`` input for this (which also builds it).
    """
    if isinstance(backbone, ResNet):
        return backbone.out_channels
    outputs = getattr(backbone, "outputs", None)  # set for functional models
    if outputs is None:
        try:
            outputs = backbone(keras.KerasTensor((None, None, None, 3)))
        except Exception as e:  # surface the contract, not an internal trace error
            raise ValueError(
                "`backbone` must accept a symbolic [None, None, None, 3] image batch "
                f"(any batch size and image size); calling it failed with: {e}"
            ) from e
    check_backbone_outputs(outputs)
    return tuple(int(o.shape[-1]) for o in outputs)


def build_backbone(
    backbone: str | keras.Model,
    trainable_layers: int = 3,
    norm: str = "frozen_bn",
    stage_channels: Sequence[int] | None = None,
    dtype=None,
) -> keras.layers.Layer | keras.Model:
    """A backbone by name, or a user model checked to produce ``[C2, C3, C4, C5]``.

    Args:
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"``,
            ``"resnext101_32x8d"`` (a :class:`ResNet` named after it) or a ``keras.Model`` mapping ``[B, H, W, 3]`` normalised images to four NHWC
            feature maps at strides 4, 8, 16, 32. A model is returned as is.
        trainable_layers: for named backbones, see :class:`ResNet`. A user model keeps its own
            ``trainable`` settings.
        norm: for named backbones, ``"frozen_bn"`` or ``"batch_norm"`` (see :class:`ResNet`).
        stage_channels: for named backbones, the widths of the four stages (see :class:`ResNet`);
            None: the network's own.
        dtype: dtype policy of a named backbone (default: the global policy).

    Example:

    ```python
    backbone = build_backbone("resnet50", trainable_layers=3)
    backbone_channels(backbone)  # (256, 512, 1024, 2048)
    backbone_channels(build_backbone("resnet18"))  # (64, 128, 256, 512)
    ```
    """
    if isinstance(backbone, str):
        if backbone not in BACKBONES:
            raise ValueError(f"`backbone` must be one of {sorted(BACKBONES)} or a keras.Model, got {backbone!r}.")
        return ResNet(
            **BACKBONES[backbone], trainable_layers=trainable_layers, norm=norm, stage_channels=stage_channels,
            name=backbone, dtype=dtype,
        )
    if stage_channels is not None:
        raise ValueError("`stage_channels` applies to named backbones only; a keras.Model keeps its own widths.")
    if isinstance(backbone, keras.Model):
        backbone_channels(backbone)
        return backbone
    raise ValueError(
        f"`backbone` must be a name in {sorted(BACKBONES)} or a keras.Model, got {type(backbone).__name__}."
    )
