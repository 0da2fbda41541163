"""The region proposal stage (torchvision's ``rpn.RegionProposalNetwork``): its head, anchors and
proposal filtering, and in training its anchor matching, sampling and losses."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import keras
import tensorflow as tf

from keras_maskrcnn import losses as loss_fns
from keras_maskrcnn import targets as target_fns
from keras_maskrcnn.layers.anchors import AnchorGenerator
from keras_maskrcnn.layers.proposals import ProposalLayer
from keras_maskrcnn.layers.rpn import RPNHead

# The pyramid levels the RPN runs on, finest first (strides 4..64).
RPN_LEVELS = ("P2", "P3", "P4", "P5", "P6")


def as_layer(value: Union[None, keras.layers.Layer, Mapping[str, Any]]) -> Optional[keras.layers.Layer]:
    """A sub-layer given as a layer or as its ``keras.layers.serialize`` form (from a config);
    ``None`` stays ``None``. The stages and ``MaskRCNN``'s injected heads use it."""
    return keras.layers.deserialize(dict(value)) if isinstance(value, Mapping) else value


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class RegionProposalNetwork(keras.layers.Layer):
    """Proposals from the feature pyramid, and the RPN losses in training.

    Args:
        head: the layer that maps the pyramid maps to objectness logits and box deltas
            (:class:`~keras_maskrcnn.layers.rpn.RPNHead`, or any layer with its call contract).
        anchor_generator: :class:`~keras_maskrcnn.layers.anchors.AnchorGenerator`.
        proposal_layer: :class:`~keras_maskrcnn.layers.proposals.ProposalLayer` (top-k, NMS).
        fg_iou_threshold, bg_iou_threshold: anchors with IoU ``>= fg`` are foreground, ``< bg``
            background, the rest ignored; each ground truth's best anchors are foreground too.
        batch_size_per_image, positive_fraction: anchors sampled per image for the losses, and
            the fraction of them that may be foreground.

    Call arguments:
        features: dict of NHWC maps ``"P2".."P6"`` (:data:`RPN_LEVELS`).
        padded_shape: ``[2]`` int, height and width of the padded input batch.
        image_sizes: ``[B, 2]`` int, each image's valid height and width.
        training: selects the training top-k values of the proposal layer.

    Returns:
        dict with ``proposals [B, P, 4]`` float32 ``(x1, y1, x2, y2)`` in input pixels,
        ``num_proposals [B]`` int32, and for :meth:`compute_losses` the raw ``objectness [B, A]``,
        ``deltas [B, A, 4]`` and ``anchors`` (list of ``[A_i, 4]``).

    Example:
        >>> rpn = RegionProposalNetwork(RPNHead(3, 64), AnchorGenerator(), ProposalLayer())
        >>> out = rpn(features, padded_shape, image_sizes)
        >>> losses, counts = rpn.compute_losses(out, gt_boxes, gt_valid)
    """

    def __init__(
        self,
        head: Union[keras.layers.Layer, Mapping[str, Any]],
        anchor_generator: Union[keras.layers.Layer, Mapping[str, Any]],
        proposal_layer: Union[keras.layers.Layer, Mapping[str, Any]],
        fg_iou_threshold: float = 0.7,
        bg_iou_threshold: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.head = as_layer(head)
        self.anchor_generator = as_layer(anchor_generator)
        self.proposal_layer = as_layer(proposal_layer)
        self.fg_iou_threshold = fg_iou_threshold
        self.bg_iou_threshold = bg_iou_threshold
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def build(self, input_shape=None):
        if not self.head.built:
            channels = getattr(self.head, "channels", None)
            self.head.build([(None, None, None, channels)] * len(RPN_LEVELS))
        self.built = True

    def call(self, features: Mapping[str, tf.Tensor], padded_shape, image_sizes, training: bool = False) -> Dict[str, Any]:
        maps = [features[name] for name in RPN_LEVELS]
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(padded_shape, [tf.shape(f)[1:3] for f in maps])
        proposals, _, num_proposals = self.proposal_layer(objectness, deltas, anchors, image_sizes, training=training)
        return {
            "proposals": proposals,
            "num_proposals": num_proposals,
            "objectness": objectness,
            "deltas": deltas,
            "anchors": anchors,
        }

    def compute_losses(
        self, outputs: Mapping[str, Any], gt_boxes: tf.Tensor, gt_valid: tf.Tensor
    ) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
        """The RPN losses of ``outputs`` (from :meth:`call`) for ground truth ``gt_boxes [B, G, 4]``
        (``gt_valid [B, G]`` bool).

        Returns ``(losses, counts)``: ``rpn_objectness_loss`` and ``rpn_box_loss``, each a mean
        over the sampled anchors of the batch, and the number of items each mean is over.
        """
        labels, box_targets, positive, sampled = target_fns.rpn_targets(
            tf.concat(outputs["anchors"], axis=0),
            gt_boxes,
            gt_valid,
            self.fg_iou_threshold,
            self.bg_iou_threshold,
            self.batch_size_per_image,
            self.positive_fraction,
        )
        objectness_loss, box_loss = loss_fns.rpn_losses(
            outputs["objectness"], outputs["deltas"], labels, box_targets, positive, sampled
        )
        num_sampled = tf.reduce_sum(tf.cast(sampled, tf.float32))
        losses = {"rpn_objectness_loss": objectness_loss, "rpn_box_loss": box_loss}
        return losses, {"rpn_objectness_loss": num_sampled, "rpn_box_loss": num_sampled}

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "head": keras.layers.serialize(self.head),
                "anchor_generator": keras.layers.serialize(self.anchor_generator),
                "proposal_layer": keras.layers.serialize(self.proposal_layer),
                "fg_iou_threshold": self.fg_iou_threshold,
                "bg_iou_threshold": self.bg_iou_threshold,
                "batch_size_per_image": self.batch_size_per_image,
                "positive_fraction": self.positive_fraction,
            }
        )
        return config


def build_rpn(
    head: Optional[keras.layers.Layer] = None,
    *,
    channels: int = 256,
    conv_depth: int = 1,
    anchor_sizes=(32, 64, 128, 256, 512),
    aspect_ratios=(0.5, 1.0, 2.0),
    pre_nms_top_n_train: int = 2000,
    pre_nms_top_n_test: int = 1000,
    post_nms_top_n_train: int = 2000,
    post_nms_top_n_test: int = 1000,
    nms_threshold: float = 0.7,
    min_size: float = 1e-3,
    fg_iou_threshold: float = 0.7,
    bg_iou_threshold: float = 0.3,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    dtype=None,
) -> RegionProposalNetwork:
    """A :class:`RegionProposalNetwork` from torchvision's argument names (its defaults are
    torchvision's). ``head`` replaces the default :class:`RPNHead` (``channels``, ``conv_depth``)."""
    if head is None:
        head = RPNHead(len(aspect_ratios), channels, conv_depth=conv_depth, dtype=dtype, name="head")
    return RegionProposalNetwork(
        head,
        AnchorGenerator(anchor_sizes, aspect_ratios, name="anchor_generator"),
        ProposalLayer(
            pre_nms_top_n_train,
            pre_nms_top_n_test,
            post_nms_top_n_train,
            post_nms_top_n_test,
            nms_threshold,
            min_size,
            name="proposals",
        ),
        fg_iou_threshold=fg_iou_threshold,
        bg_iou_threshold=bg_iou_threshold,
        batch_size_per_image=batch_size_per_image,
        positive_fraction=positive_fraction,
        dtype=dtype,
        name="rpn",
    )
