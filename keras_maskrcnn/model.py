"""The Mask R-CNN model (He et al. 2017) as a subclassed ``keras.Model``."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from keras_maskrcnn.layers.anchors import AnchorGenerator
from keras_maskrcnn.layers.backbone import backbone_channels, build_backbone
from keras_maskrcnn.layers.box_head import BoxHead
from keras_maskrcnn.layers.detections import DetectionLayer
from keras_maskrcnn.layers.fpn import FeaturePyramidNetwork
from keras_maskrcnn.layers.mask_head import MaskHead
from keras_maskrcnn.layers.proposals import ProposalLayer
from keras_maskrcnn.layers.roi_align import MultiLevelROIAlign
from keras_maskrcnn.layers.rpn import RPNHead
from keras_maskrcnn import losses as loss_fns
from keras_maskrcnn import precision
from keras_maskrcnn import targets as target_fns
from keras_maskrcnn import transform

MASK_FORMATS = ("binary", "probability", "box")
LOSS_NAMES = ("rpn_objectness_loss", "rpn_box_loss", "class_loss", "box_loss", "mask_loss")


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class MaskRCNN(keras.Model):
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
        The remaining arguments are torchvision's hyperparameters of the same names.

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
        box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        mask_threshold: float = 0.5,
        mask_output: str = "binary",
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        min_size: int = 800,
        max_size: int = 1333,
        size_divisible: int = 32,
        gt_mask_size: int = 128,
        jit_compile_masks: bool = True,
        mask_head_convs: int = 4,
        mask_head_channels: Optional[int] = None,
        **kwargs,
    ):
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
        self.fpn_channels = fpn_channels
        self.anchor_sizes = tuple(anchor_sizes)
        self.aspect_ratios = tuple(aspect_ratios)
        self.rpn_fg_iou_threshold = rpn_fg_iou_threshold
        self.rpn_bg_iou_threshold = rpn_bg_iou_threshold
        self.rpn_batch_size_per_image = rpn_batch_size_per_image
        self.rpn_positive_fraction = rpn_positive_fraction
        self.box_roi_size = box_roi_size
        self.mask_roi_size = mask_roi_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.representation_size = representation_size
        self.box_fg_iou_threshold = box_fg_iou_threshold
        self.box_bg_iou_threshold = box_bg_iou_threshold
        self.box_batch_size_per_image = box_batch_size_per_image
        self.box_positive_fraction = box_positive_fraction
        self.box_coder_weights = tuple(float(w) for w in box_coder_weights)
        self.mask_threshold = mask_threshold
        self.mask_output = mask_output
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.min_size = min_size
        self.max_size = max_size
        self.size_divisible = size_divisible
        self.gt_mask_size = gt_mask_size
        self.jit_compile_masks = jit_compile_masks

        policy = self.dtype_policy
        self._backbone_name = backbone if isinstance(backbone, str) else None
        self.backbone = build_backbone(
            backbone, trainable_layers=trainable_backbone_layers, norm=backbone_norm, dtype=policy
        )
        self.fpn = FeaturePyramidNetwork(fpn_channels, dtype=policy, name="fpn")
        self.anchor_generator = AnchorGenerator(anchor_sizes, aspect_ratios, name="anchor_generator")
        self.rpn_head = RPNHead(len(aspect_ratios), fpn_channels, dtype=policy, name="rpn_head")
        self.proposal_layer = ProposalLayer(
            rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test,
            rpn_nms_threshold,
            rpn_min_size,
            name="proposals",
        )
        self.box_roi_align = MultiLevelROIAlign(
            box_roi_size, sampling_ratio=sampling_ratio, aligned=aligned, dtype=policy, name="box_roi_align"
        )
        self.box_head = BoxHead(num_classes, representation_size, dtype=policy, name="box_head")
        self.detection_layer = DetectionLayer(
            box_score_threshold,
            box_nms_threshold,
            detections_per_image,
            box_coder_weights=box_coder_weights,
            name="detections",
        )
        self.mask_roi_align = MultiLevelROIAlign(
            mask_roi_size, sampling_ratio=sampling_ratio, aligned=aligned, dtype=policy, name="mask_roi_align"
        )
        self.mask_head_convs = mask_head_convs
        self.mask_head_channels = mask_head_channels
        self.mask_head = MaskHead(
            num_classes, mask_head_channels or fpn_channels, num_convs=mask_head_convs, dtype=policy, name="mask_head"
        )
        self._loss_trackers = [keras.metrics.Mean(name=name) for name in ("loss",) + LOSS_NAMES]

    # ----------------------------------------------------------------------------- building
    def build(self, input_shape=None):
        # Each sublayer is built from known channel counts, so a loaded model has every weight
        # before any call; sublayers that training already built are left alone.
        roi, mask_roi, channels = self.box_roi_size, self.mask_roi_size, self.fpn_channels
        shapes = [
            (self.backbone, (None, None, None, 3)),
            (self.fpn, [(None, None, None, c) for c in backbone_channels(self.backbone)]),
            (self.rpn_head, [(None, None, None, channels)] * 5),
            (self.box_head, (None, None, roi, roi, channels)),
            (self.mask_head, (None, None, mask_roi, mask_roi, channels)),
        ]
        for layer, shape in shapes:
            if not layer.built:
                layer.build(shape)
        self.built = True

    def get_build_config(self):
        # build() needs no shapes: always record one, so a model saved right after fit (never
        # called) still gets all its weights created on load.
        return {"input_shape": None}

    def build_from_config(self, config):
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
        x = self._normalize_and_pad(images, image_sizes)
        backbone_features = self.backbone(x, training=training)
        if len(backbone_features) != 4:
            raise ValueError(f"The backbone must return four feature maps (C2..C5), got {len(backbone_features)}.")
        features = self.fpn(list(backbone_features))
        return tf.shape(x)[1:3], features

    def _rpn(self, padded_shape, features, image_sizes, training: bool):
        objectness, deltas, _ = self.rpn_head(features)
        anchors = self.anchor_generator(padded_shape, [tf.shape(f)[1:3] for f in features])
        proposals, _, num_proposals = self.proposal_layer(objectness, deltas, anchors, image_sizes, training=training)
        return objectness, deltas, anchors, proposals, num_proposals

    def _mask_probabilities(self, features, boxes, classes) -> tf.Tensor:
        """``[B, N, 28, 28]`` float32 mask probabilities of each box's class."""
        return tf.sigmoid(self.mask_head(self.mask_roi_align(features[:4], boxes), classes=classes))

    def call(self, inputs, training=None, mask_output: Optional[str] = None) -> Dict[str, tf.Tensor]:
        images, image_sizes = self._unpack(inputs)
        padded_shape, features = self._features(images, training=False, image_sizes=image_sizes)
        _, _, _, proposals, num_proposals = self._rpn(padded_shape, features, image_sizes, training=False)
        class_logits, box_deltas = self.box_head(self.box_roi_align(features[:4], proposals))
        detections = self.detection_layer(class_logits, box_deltas, proposals, num_proposals, image_sizes)
        masks = self._mask_probabilities(features, detections["boxes"], detections["classes"])
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

    # ----------------------------------------------------------------------------- training
    def compute_losses(self, inputs, targets, training: bool = True) -> Dict[str, tf.Tensor]:
        """The five Mask R-CNN losses for a batch (see :mod:`keras_maskrcnn.data` for the format).

        ``targets``: ``boxes [B, G, 4]`` (x1, y1, x2, y2) in input pixels, ``classes [B, G]`` int
        (0 = padding), ``masks [B, G, N, N]`` box-relative ground-truth coverage masks (uint8,
        255 = covered; see :mod:`keras_maskrcnn.data`).
        """
        images, image_sizes = self._unpack(inputs)
        gt_boxes = tf.cast(targets["boxes"], tf.float32)
        gt_classes = tf.cast(targets["classes"], tf.int32)
        gt_masks = targets["masks"]
        gt_valid = gt_classes > 0

        padded_shape, features = self._features(images, training=training, image_sizes=image_sizes)
        objectness, deltas, anchors, proposals, num_proposals = self._rpn(
            padded_shape, features, image_sizes, training=training
        )
        labels, box_targets, positive, sampled = target_fns.rpn_targets(
            tf.concat(anchors, axis=0),
            gt_boxes,
            gt_valid,
            self.rpn_fg_iou_threshold,
            self.rpn_bg_iou_threshold,
            self.rpn_batch_size_per_image,
            self.rpn_positive_fraction,
        )
        rpn_objectness_loss, rpn_box_loss = loss_fns.rpn_losses(
            objectness, deltas, labels, box_targets, positive, sampled
        )

        rois = target_fns.sample_rois(
            proposals,
            num_proposals,
            gt_boxes,
            gt_classes,
            self.box_fg_iou_threshold,
            self.box_bg_iou_threshold,
            self.box_batch_size_per_image,
            self.box_positive_fraction,
            self.box_coder_weights,
        )
        class_logits, box_deltas = self.box_head(self.box_roi_align(features[:4], rois["rois"]))
        class_loss, box_loss = loss_fns.box_head_losses(
            class_logits, box_deltas, rois["labels"], rois["box_targets"], rois["valid"], rois["positive"]
        )

        # Positives come first in the sampled RoIs, so the mask head sees only those slots.
        num_pos_slots = int(self.box_batch_size_per_image * self.box_positive_fraction)
        pos_rois = rois["rois"][:, :num_pos_slots]
        pos_labels = rois["labels"][:, :num_pos_slots]
        mask_logits = self.mask_head(self.mask_roi_align(features[:4], pos_rois), classes=pos_labels)
        mask_size = 2 * self.mask_roi_size
        mask_targets = target_fns.mask_targets(
            pos_rois, rois["matched_gt"][:, :num_pos_slots], gt_boxes, gt_masks, mask_size, image_sizes
        )
        mask_loss = loss_fns.mask_loss(mask_logits, pos_labels, mask_targets, rois["positive"][:, :num_pos_slots])
        # Final reduction. Each loss above is a mean over the items sampled from this batch; under a
        # tf.distribute strategy with several replicas it becomes this replica's share of the mean
        # over the GLOBAL batch (sum here / count summed over replicas), so that the optimizer's sum
        # of the replicas' gradients is the gradient of the global-batch loss (see
        # keras_maskrcnn.distribute). Unchanged on one replica.
        from keras_maskrcnn import distribute

        means = tf.stack([rpn_objectness_loss, rpn_box_loss, class_loss, box_loss, mask_loss])
        num_sampled = tf.reduce_sum(tf.cast(sampled, tf.float32))
        num_rois = tf.reduce_sum(tf.cast(rois["valid"], tf.float32))
        num_pos = tf.reduce_sum(tf.cast(rois["positive"][:, :num_pos_slots], tf.float32))
        counts = tf.stack([num_sampled, num_sampled, num_rois, num_rois, num_pos])
        shares = distribute.global_batch_shares(tf.cast(means, tf.float32), counts)
        return dict(zip(LOSS_NAMES, tf.unstack(shares)))

    @property
    def metrics(self):
        return list(self._loss_trackers)

    def _update_trackers(self, total, losses):
        # Under a strategy each replica holds its share of the global-batch losses: their sum over
        # replicas (one all-reduce) is the global-batch loss, which every replica then records, so
        # the logged metrics are the same on all replicas and workers. A no-op on one replica.
        from keras_maskrcnn import distribute

        values = tf.stack([tf.cast(total, tf.float32)] + [tf.cast(losses[name], tf.float32) for name in LOSS_NAMES])
        values = distribute.sum_over_replicas(values)
        for tracker, value in zip(self._loss_trackers, tf.unstack(values)):
            tracker.update_state(value)
        results = {tracker.name: tracker.result() for tracker in self._loss_trackers}
        if distribute.is_multi_worker():
            # Keras reduces step outputs over workers with strategy.reduce("MEAN", axis=0), which
            # needs a leading axis; the mean of identical values is the value.
            results = {name: tf.reshape(value, [1]) for name, value in results.items()}
        return results

    @staticmethod
    def _split(data):
        if not isinstance(data, (tuple, list)) or len(data) < 2:
            raise ValueError(
                "Training data must be (inputs, targets) pairs as made by keras_maskrcnn.data; "
                f"got {type(data).__name__}."
            )
        return data[0], data[1]

    def train_step(self, data):
        """One optimisation step on a batch (under a strategy: on this replica's share of it).

        The optimizer sums the replicas' gradients, so every term is this replica's share of the
        global-batch loss: :meth:`compute_losses` returns shares, and regularisation losses are
        divided by the number of replicas. The returned metrics are global-batch values.
        """
        if not self.built:  # fit() does not call the model, so build it here
            self.build()
        from keras_maskrcnn import distribute

        inputs, targets = self._split(data)
        with tf.GradientTape() as tape:
            losses = self.compute_losses(inputs, targets, training=True)
            total = tf.add_n(list(losses.values()))
            if self.losses:
                regularization = tf.cast(tf.add_n(self.losses), total.dtype)
                total = total + regularization / float(distribute.num_replicas_in_sync())
            scaled = self.optimizer.scale_loss(total)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
        return self._update_trackers(total, losses)

    def test_step(self, data):
        if not self.built:  # fit() does not call the model, so build it here
            self.build()
        inputs, targets = self._split(data)
        losses = self.compute_losses(inputs, targets, training=False)
        return self._update_trackers(tf.add_n(list(losses.values())), losses)

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
    def get_config(self):
        config = super().get_config()
        backbone = self._backbone_config
        config.update(
            {
                "num_classes": self.num_classes,
                "backbone": backbone,
                "trainable_backbone_layers": self.trainable_backbone_layers,
                "backbone_norm": self.backbone_norm,
                "fpn_channels": self.fpn_channels,
                "anchor_sizes": list(self.anchor_sizes),
                "aspect_ratios": list(self.aspect_ratios),
                "rpn_pre_nms_top_n_train": self.proposal_layer.pre_nms_top_n_train,
                "rpn_pre_nms_top_n_test": self.proposal_layer.pre_nms_top_n_test,
                "rpn_post_nms_top_n_train": self.proposal_layer.post_nms_top_n_train,
                "rpn_post_nms_top_n_test": self.proposal_layer.post_nms_top_n_test,
                "rpn_nms_threshold": self.proposal_layer.nms_threshold,
                "rpn_min_size": self.proposal_layer.min_size,
                "rpn_fg_iou_threshold": self.rpn_fg_iou_threshold,
                "rpn_bg_iou_threshold": self.rpn_bg_iou_threshold,
                "rpn_batch_size_per_image": self.rpn_batch_size_per_image,
                "rpn_positive_fraction": self.rpn_positive_fraction,
                "box_roi_size": self.box_roi_size,
                "mask_roi_size": self.mask_roi_size,
                "sampling_ratio": self.sampling_ratio,
                "aligned": self.aligned,
                "representation_size": self.representation_size,
                "box_score_threshold": self.detection_layer.score_threshold,
                "box_nms_threshold": self.detection_layer.nms_threshold,
                "detections_per_image": self.detection_layer.max_detections,
                "box_fg_iou_threshold": self.box_fg_iou_threshold,
                "box_bg_iou_threshold": self.box_bg_iou_threshold,
                "box_batch_size_per_image": self.box_batch_size_per_image,
                "box_positive_fraction": self.box_positive_fraction,
                "box_coder_weights": list(self.box_coder_weights),
                "mask_threshold": self.mask_threshold,
                "mask_output": self.mask_output,
                "image_mean": list(self.image_mean),
                "image_std": list(self.image_std),
                "min_size": self.min_size,
                "max_size": self.max_size,
                "size_divisible": self.size_divisible,
                "gt_mask_size": self.gt_mask_size,
                "jit_compile_masks": self.jit_compile_masks,
                "mask_head_convs": self.mask_head_convs,
                "mask_head_channels": self.mask_head_channels,
            }
        )
        return config

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
        model = cls(**config)
        # Built here, so loading a saved model always finds every variable (also files saved
        # before the model recorded a build config).
        model.build()
        return model
