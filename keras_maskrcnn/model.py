"""The Mask R-CNN model (He et al. 2017) as a subclassed ``keras.Model``, composed as torchvision's
``GeneralizedRCNN``: backbone, FPN, the RPN stage (:mod:`keras_maskrcnn.rpn`) and the RoI-heads
stage (:mod:`keras_maskrcnn.roi_heads`); image geometry is :mod:`keras_maskrcnn.transform`, and
training (losses, ``train_step``) :mod:`keras_maskrcnn.model_training`."""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from keras_maskrcnn import precision, transform
from keras_maskrcnn.layers.backbone import backbone_channels, build_backbone
from keras_maskrcnn.layers.fpn import FeaturePyramidNetwork
from keras_maskrcnn.model_settings import (
    STAGE_SETTINGS,
    FlatSettings,
    flat_settings,
    flatten_stage_settings,
    group_stage_settings,
    stage_arguments,
)
from keras_maskrcnn.model_training import LOSS_NAMES, TrainingSteps, checked_loss_weights  # noqa: F401  (LOSS_NAMES: public here too)
from keras_maskrcnn.roi_heads import build_roi_heads
from keras_maskrcnn.rpn import RPN_LEVELS, as_layer, build_rpn

MASK_FORMATS = ("binary", "probability", "box")
# The version of the model's saved layout; files of 0.1.0 (no version) kept the RPN head at the top.
FORMAT_VERSION = 2
_INJECTABLE_HEADS = ("rpn_head", "box_head", "mask_head")


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class MaskRCNN(FlatSettings, TrainingSteps, keras.Model):
    """Mask R-CNN with a ResNet-FPN backbone; defaults are torchvision's ``maskrcnn_resnet50_fpn``.

    The model takes RGB images with values in ``[0, 255]`` (uint8 or float) and normalises them
    itself (``(x / 255 - image_mean) / image_std``), then pads the batch at the bottom and right
    to a multiple of ``size_divisible``. It does not resize: :meth:`predict_images` resizes a
    list of images by the ``min_size`` / ``max_size`` rule, runs them batched, and maps the results
    back to each original image.

    Args:
        num_classes: number of object classes, background excluded; class ids are ``1..num_classes``.
        backbone: ``"resnet50"``, ``"resnet101"``, ``"resnext101_32x8d"``, or a ``keras.Model``
            mapping normalised ``[B, H, W, 3]`` images to four maps ``[C2, C3, C4, C5]``
            (strides 4, 8, 16, 32).
        trainable_backbone_layers: how many ResNet stages train, counted from the top (0..5).
        backbone_norm: ``"frozen_bn"`` (torchvision's choice with pretrained weights) or
            ``"batch_norm"`` (trainable; what torchvision uses when training from scratch, and what
            you want without pretrained weights: a randomly initialised ResNet with frozen
            statistics has no normalisation at all).
        backbone_stage_channels: widths of the named ResNet's four stages (``planes`` of ``layer1``
            .. ``layer4``); None: torchvision's ``(64, 128, 256, 512)``. ``presets.demo_config``
            narrows ``layer4`` to 256 for cheaper CPU steps.
        mask_output: what ``call`` returns as ``masks``: ``"binary"`` (uint8 0/1 pasted into the
            input image, ``[B, N, H, W]``, probability ``> mask_threshold``), ``"probability"``
            (float32, same shape) or ``"box"`` (float32 box-relative ``[B, N, 28, 28]``).
        gt_mask_size: side of the box-relative ground-truth coverage masks the data pipeline
            provides (:mod:`keras_maskrcnn.data`).
        dtype: a Keras dtype policy, or ``"auto"``: the precision this machine runs fastest without
            losing accuracy (:mod:`keras_maskrcnn.precision`). Default: Keras' global policy.
        jit_compile_masks: paste ``"binary"`` masks with XLA (about twice as fast on the CPU: the
            float masks are never written to memory; compiled once per input size). Export to a
            SavedModel never uses it (TF Serving runs XLA only when told to).
        mask_head_convs: 3x3 convolutions of the mask head before its upsampling (torchvision: 4).
        mask_head_channels: their width (default ``fpn_channels``, as torchvision).
        fpn_norm: ``None`` (torchvision's v1) or ``"batch_norm"`` after each FPN convolution (v2).
        rpn_conv_depth: 3x3 convolutions of the RPN head (v1: 1, v2: 2).
        box_head_convs: 3x3 convolutions of the box head before its FC layers (v1: 0, v2: 4),
            ``fpn_channels`` wide.
        box_head_fcs: FC layers of the box head (v1: 2, v2: 1).
        head_norm: ``None`` (v1) or ``"batch_norm"`` after each convolution of the box and mask
            heads (v2; it also makes training from scratch converge much faster).
        box_gt_jitter_copies, box_gt_jitter_std: in training, add this many randomly jittered
            copies of each ground truth box to the RoI candidates (centre shift and log-scale noise
            of ``box_gt_jitter_std`` box sizes; :func:`keras_maskrcnn.targets.jitter_boxes`). 0
            (torchvision's rule) adds none; ``presets.from_scratch_config`` uses 4, which gives
            the heads several foreground RoIs per object while the proposals are still poor.
        loss_weights: factors of the five losses in the total that training minimises, by name
            (``rpn_objectness_loss``, ``rpn_box_loss``, ``class_loss``, ``box_loss``,
            ``mask_loss``; missing ones 1.0, torchvision's equal weighting), as Keras'
            ``compile(loss_weights=...)`` and detectron2's per-loss weights. The logged losses
            stay unweighted; ``loss`` is the weighted total.
        rpn_head, box_head, mask_head: optional layers that replace the default heads (a new head
            architecture; the stages' call contracts: :class:`~keras_maskrcnn.layers.rpn.RPNHead`,
            :class:`~keras_maskrcnn.layers.box_head.BoxHead`, :class:`~keras_maskrcnn.layers.mask_head.MaskHead`).
            They are serialised with ``keras.layers.serialize`` in the model's config, so a model
            with custom heads saves and loads as ``.keras`` when the heads are registered
            serialisable classes.
        backbone_config, fpn_config, rpn_config, roi_heads_config, transform_config: the same
            settings grouped by the part that owns them, under that part's own names
            (:data:`keras_maskrcnn.model_settings.STAGE_SETTINGS`), e.g.
            ``rpn_config={"nms_threshold": 0.6}`` for ``rpn_nms_threshold=0.6``;
            :meth:`stage_config` gives a model's settings in this form.
        The remaining arguments are torchvision's hyperparameters of the same names; the model
        hands them to its stages, :attr:`rpn` (:class:`~keras_maskrcnn.rpn.RegionProposalNetwork`)
        and :attr:`roi_heads` (:class:`~keras_maskrcnn.roi_heads.RoIHeads`), which own them.

    Inputs:
        ``images [B, H, W, 3]`` or a dict ``{"images": ..., "image_sizes": [B, 2] int}`` where
        ``image_sizes`` gives each image's valid (unpadded) height and width.

    Outputs (dict):
        ``boxes [B, N, 4]`` float32 ``(x1, y1, x2, y2)`` in input pixels, ``scores [B, N]``
        float32, ``classes [B, N]`` int32 (1-based; 0 in padding rows), ``masks`` as set by
        ``mask_output``, ``num_detections [B]`` int32; ``N = detections_per_image``, rows sorted by
        decreasing score and zero past ``num_detections``.

    Example:
        >>> model = MaskRCNN(num_classes=3)
        >>> out = model(np.zeros([1, 512, 512, 3], np.uint8))
        >>> out["boxes"].shape, out["masks"].shape
        (TensorShape([1, 100, 4]), TensorShape([1, 100, 512, 512]))
    """

    def __init__(
        self,
        num_classes: int,
        backbone: Union[str, keras.Model] = "resnet50",
        trainable_backbone_layers: int = 3,
        backbone_norm: str = "frozen_bn",
        backbone_stage_channels: Optional[Sequence[int]] = None,
        fpn_channels: int = 256,
        anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_threshold: float = 0.7,
        rpn_min_size: float = 1e-3,
        rpn_fg_iou_threshold: float = 0.7,
        rpn_bg_iou_threshold: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        box_roi_size: int = 7,
        mask_roi_size: int = 14,
        sampling_ratio: int = 2,
        aligned: bool = False,
        representation_size: int = 1024,
        box_score_threshold: float = 0.05,
        box_nms_threshold: float = 0.5,
        detections_per_image: int = 100,
        box_fg_iou_threshold: float = 0.5,
        box_bg_iou_threshold: float = 0.5,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        box_gt_jitter_copies: int = 0,
        box_gt_jitter_std: float = 0.1,
        box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        mask_threshold: float = 0.5,
        mask_output: str = "binary",
        image_mean: Sequence[float] = transform.IMAGE_MEAN,
        image_std: Sequence[float] = transform.IMAGE_STD,
        min_size: int = transform.MIN_SIZE,
        max_size: int = transform.MAX_SIZE,
        size_divisible: int = transform.SIZE_DIVISIBLE,
        gt_mask_size: int = 128,
        jit_compile_masks: bool = True,
        mask_head_convs: int = 4,
        mask_head_channels: Optional[int] = None,
        fpn_norm: Optional[str] = None,
        rpn_conv_depth: int = 1,
        box_head_convs: int = 0,
        box_head_fcs: int = 2,
        head_norm: Optional[str] = None,
        loss_weights: Optional[Mapping[str, float]] = None,
        rpn_head: Optional[keras.layers.Layer] = None,
        box_head: Optional[keras.layers.Layer] = None,
        mask_head: Optional[keras.layers.Layer] = None,
        backbone_config: Optional[Mapping[str, Any]] = None,
        fpn_config: Optional[Mapping[str, Any]] = None,
        rpn_config: Optional[Mapping[str, Any]] = None,
        roi_heads_config: Optional[Mapping[str, Any]] = None,
        transform_config: Optional[Mapping[str, Any]] = None,
        **kwargs,
    ):
        groups = dict(backbone_config=backbone_config, fpn_config=fpn_config, rpn_config=rpn_config,
                      roi_heads_config=roi_heads_config, transform_config=transform_config)
        if any(groups.values()):
            # Spread the grouped settings into the flat arguments the stages are built from.
            given = {name: value for name, value in locals().items() if name in _FLAT_DEFAULTS}
            flat = flatten_stage_settings(groups, given, _FLAT_DEFAULTS)
            MaskRCNN.__init__(self, num_classes, backbone=backbone, rpn_head=rpn_head, box_head=box_head,
                              mask_head=mask_head, **flat, **kwargs)
            return
        if kwargs.get("dtype") == precision.AUTO:
            kwargs["dtype"] = precision.resolve_policy(precision.AUTO)
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (background excluded), got {num_classes}.")
        if mask_output not in MASK_FORMATS:
            raise ValueError(f"mask_output must be one of {MASK_FORMATS}, got {mask_output!r}.")
        self.num_classes = num_classes
        self.trainable_backbone_layers = trainable_backbone_layers
        self.backbone_norm = backbone_norm
        self.backbone_stage_channels = None if backbone_stage_channels is None else tuple(
            int(c) for c in backbone_stage_channels
        )
        self.mask_threshold = mask_threshold
        self.mask_output = mask_output
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.min_size = min_size
        self.max_size = max_size
        self.size_divisible = size_divisible
        self.gt_mask_size = gt_mask_size
        self.jit_compile_masks = jit_compile_masks
        self.loss_weights = checked_loss_weights(loss_weights)
        # Heads the user passed in (serialised in get_config); the others are built from the arguments.
        self._custom_head_names = tuple(
            name for name, head in zip(_INJECTABLE_HEADS, (rpn_head, box_head, mask_head)) if head is not None
        )

        policy = self.dtype_policy
        # Each stage gets its settings under its own names, renamed by the one mapping (STAGE_SETTINGS).
        flat = {name: value for name, value in locals().items() if name in _FLAT_DEFAULTS}
        self._backbone_name = backbone if isinstance(backbone, str) else None
        self.backbone = build_backbone(backbone, **stage_arguments("backbone_config", flat), dtype=policy)
        self.fpn = FeaturePyramidNetwork(**stage_arguments("fpn_config", flat), dtype=policy, name="fpn")
        self.rpn = build_rpn(
            as_layer(rpn_head), channels=fpn_channels, **stage_arguments("rpn_config", flat), dtype=policy
        )
        self.roi_heads = build_roi_heads(
            num_classes,
            as_layer(box_head),
            as_layer(mask_head),
            channels=fpn_channels,
            **stage_arguments("roi_heads_config", flat),
            dtype=policy,
        )
        # Settings that only shape the default heads, kept for get_config.
        self._head_settings = dict(
            fpn_channels=fpn_channels,
            representation_size=representation_size,
            mask_head_convs=mask_head_convs,
            mask_head_channels=mask_head_channels,
            rpn_conv_depth=rpn_conv_depth,
            box_head_convs=box_head_convs,
            box_head_fcs=box_head_fcs,
            head_norm=head_norm,
        )
        self._init_loss_trackers()

    # ----------------------------------------------------------------------------- building
    def build(self, input_shape=None):
        # Each sublayer is built from known channel counts, so a loaded model has every weight
        # before any call; sublayers that training already built are left alone.
        channels = self.fpn.channels
        if not self.backbone.built:
            self.backbone.build((None, None, None, 3))
        if not self.fpn.built:
            self.fpn.build([(None, None, None, c) for c in backbone_channels(self.backbone)])
        if not self.rpn.head.built:
            self.rpn.head.build([(None, None, None, channels)] * len(RPN_LEVELS))
        self.rpn.built = True
        self.roi_heads.build(channels=channels)
        self.built = True

    def get_build_config(self):
        # build() needs no shapes: always record one, so a model saved right after fit (never
        # called) still gets all its weights created on load. The format version tells a file
        # of 0.1.0 (whose weights are laid out differently) from a current one.
        return {"input_shape": None, "format_version": FORMAT_VERSION}

    def build_from_config(self, config):
        if config.get("format_version") is None:
            from keras_maskrcnn.saving import legacy_format_error

            raise legacy_format_error()
        self.build()

    # ----------------------------------------------------------------------------- forward
    def _unpack(self, inputs):
        if isinstance(inputs, dict):
            images = inputs["images"]
            image_sizes = inputs.get("image_sizes")
        else:
            images, image_sizes = inputs, None
        images = tf.convert_to_tensor(images)
        if images.shape.rank != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] RGB, got shape {images.shape}.")
        if image_sizes is None:
            shape = tf.shape(images)
            image_sizes = tf.tile(shape[None, 1:3], [shape[0], 1])
        return images, tf.cast(image_sizes, tf.int32)

    def _normalize_and_pad(self, images: tf.Tensor, image_sizes: tf.Tensor) -> tf.Tensor:
        """Normalise, zero everything outside each image's valid region, pad to ``size_divisible``
        (:func:`keras_maskrcnn.transform.normalize_and_pad`; padding is 0 *after* normalisation)."""
        return transform.normalize_and_pad(images, image_sizes, self.image_mean, self.image_std, self.size_divisible)

    def _features(self, images: tf.Tensor, training: bool, image_sizes: tf.Tensor):
        """Padded shape ``[2]`` and the pyramid ``{"P2": ..., "P6": ...}`` of a batch."""
        x = self._normalize_and_pad(images, image_sizes)
        backbone_features = self.backbone(x, training=training)
        if len(backbone_features) != 4:
            raise ValueError(f"The backbone must return four feature maps (C2..C5), got {len(backbone_features)}.")
        pyramid = self.fpn(list(backbone_features), training=training)
        return tf.shape(x)[1:3], dict(zip(RPN_LEVELS, pyramid))

    def call(self, inputs, training=None, mask_output: Optional[str] = None) -> Dict[str, tf.Tensor]:
        images, image_sizes = self._unpack(inputs)
        padded_shape, features = self._features(images, training=False, image_sizes=image_sizes)
        proposals = self.rpn(features, padded_shape, image_sizes, training=False)
        detections = self.roi_heads(features, proposals["proposals"], proposals["num_proposals"], image_sizes)
        masks = detections.pop("masks")
        detections["masks"] = self._format_masks(masks, detections, tf.shape(images)[1], tf.shape(images)[2], mask_output)
        return detections

    def _format_masks(self, masks, detections, height, width, mask_output=None) -> tf.Tensor:
        mask_output = mask_output or self.mask_output
        row_valid = tf.range(tf.shape(masks)[1])[None, :] < detections["num_detections"][:, None]
        masks = tf.where(row_valid[..., None, None], masks, 0.0)  # a zero mask pastes as zeros
        if mask_output == "box":
            return masks
        threshold = None if mask_output == "probability" else self.mask_threshold
        return transform.paste_masks_in_image(
            masks, detections["boxes"], height, width, threshold=threshold, jit_compile=self.jit_compile_masks
        )

    # ----------------------------------------------------------------------------- inference helper
    def predict_images(self, images: Sequence[np.ndarray], batch_size: int = 2) -> List[Dict[str, np.ndarray]]:
        """Detect objects in a list of RGB images of any sizes (uint8 or float in [0, 255]).

        Each image is resized by the ``min_size`` / ``max_size`` rule, batched (padded), run
        through the model, and the results are mapped back to that image's original pixels.

        Returns:
            one dict per image with numpy arrays ``boxes [n, 4]`` float32 (x1, y1, x2, y2) in the
            original image's pixels, ``scores [n]``, ``classes [n]`` int32 (1-based) and
            ``masks [n, h, w]`` (uint8 0/1, or float32 probabilities when ``mask_output`` is
            ``"probability"``) at the original size; ``n`` is the number of detections.
        """
        from keras_maskrcnn.inference import predict_images

        return predict_images(self, images, batch_size=batch_size)

    # ----------------------------------------------------------------------------- serialisation
    def get_config(self) -> Dict[str, Any]:
        """torchvision's flat hyperparameters, read from the stages that own them, plus any
        injected head serialised with ``keras.layers.serialize``."""
        config = super().get_config()
        config.update(flat_settings(self))
        for name in self._custom_head_names:
            config[name] = keras.layers.serialize(getattr(self, name))
        return config

    def stage_config(self) -> Dict[str, Any]:
        """:meth:`get_config` with the settings grouped by stage (``rpn_config``, ``roi_heads_config``,
        ...: the constructor's grouped form); ``MaskRCNN.from_config`` accepts either."""
        return group_stage_settings(self.get_config())

    @classmethod
    def from_preset(cls, name: str, num_classes: Optional[int] = None, **kwargs) -> "MaskRCNN":
        """A model with a published preset's weights (``keras_maskrcnn.model_zoo``: fetched, verified,
        converted once, cached); ``num_classes=N`` gives new predictors for fine-tuning."""
        from keras_maskrcnn.model_zoo import from_preset

        return from_preset(name, num_classes=num_classes, **kwargs)

    @property
    def _backbone_config(self):
        if self._backbone_name is not None:
            return self._backbone_name
        return keras.saving.serialize_keras_object(self.backbone)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("backbone"), dict):
            config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        # Not built here: Keras' loader calls build_from_config next, which checks the format.
        return cls(**config)



# Defaults of the flat settings that a group can also give (for telling a given value from a default).
_FLAT_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(MaskRCNN.__init__).parameters.items()
    if any(name in group for group in STAGE_SETTINGS.values())
}
