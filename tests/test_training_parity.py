"""Training-mode parity with torchvision (issue 17): the same weights, images and ground truth give
the same targets, losses, gradients and SGD step as torchvision's ``maskrcnn_resnet50_fpn``.

torchvision's model is built as ``maskrcnn_resnet50_fpn`` builds it for pretrained weights
(``FrozenBatchNorm2d``, ``trainable_backbone_layers=3``: the layout ``from_torchvision`` gives), with
random weights made to behave like trained ones as in tests/test_convert.py (frozen batch-norm
statistics measured on the test batch, the RPN and predictor outputs rescaled), and converted with
``keras_maskrcnn.convert.from_torchvision``. Both sides then take one training step on a batch of
two images: one with seven objects (among them thin and small ones, and objects touching the
image's edges), one without any ground truth.

Deterministic by construction: the sample budgets are so large that both samplers take every
candidate (no random sampling), and torchvision's transform does not resize (``_skip_resize``: the
images are fed at their size, and the Keras model does not resize in training either).

The ground-truth masks are given to the Keras model as box-relative coverage masks
(``keras_maskrcnn.data``: ``N x N`` cells over the box), an approximation of torchvision's
full-image masks where cells straddle pixels (``targets.mask_targets``). Here every box is a whole
number of pixels whose width and height divide ``N``, so each cell lies inside one pixel and the
coverage masks represent the full-image masks exactly: the mask targets and loss are compared
tightly, not the representation's rounding.
"""
import numpy as np
import pytest
import tensorflow as tf
import tvref
from test_convert import TV_FAST_ROI_ALIGN

from keras_maskrcnn import boxes as box_ops
from keras_maskrcnn import targets as target_fns
from keras_maskrcnn.convert import from_torchvision, maskrcnn_targets
from keras_maskrcnn.data.masks import mini_mask
from keras_maskrcnn.matching import match
from keras_maskrcnn.model_training import LOSS_NAMES
from keras_maskrcnn.optimizers import CoupledL2SGD
from keras_maskrcnn.roi_heads import positive_slots

NUM_CLASSES = 6  # torchvision's count, background included
GT_MASK_SIZE = 128  # N of the coverage masks (the data pipeline's default)
# Sample budgets so large that both samplers keep every positive and negative candidate; fewer
# proposals than torchvision's 2000 / 2000 to keep the test fast (the same on both sides).
SETTINGS = dict(
    rpn_pre_nms_top_n_train=1000,
    rpn_post_nms_top_n_train=500,
    rpn_batch_size_per_image=65536,  # > the 25575 anchors of a 320 x 320 batch
    rpn_positive_fraction=0.5,
    box_batch_size_per_image=512,  # > 500 proposals + 7 ground-truth boxes
    box_positive_fraction=0.25,  # 128 positives at most: the mask head's RoI slots
)
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.02, 0.9, 1e-4  # torchvision's reference recipe

# torchvision's ordering of the losses in LOSS_NAMES' order.
TV_LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")

TV_TRAIN_SCRIPT = TV_FAST_ROI_ALIGN + r"""
from torchvision.models import resnet50
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.mask_rcnn import MaskRCNN
from torchvision.ops import box_iou
from torchvision.ops.misc import FrozenBatchNorm2d

settings = {k[4:]: v.item() for k, v in inputs.items() if k.startswith("set.")}
num_images = sum(1 for k in inputs if k.startswith("image"))
images = [torch.from_numpy(inputs[f"image{i}"]).permute(2, 0, 1).float() / 255 for i in range(num_images)]
targets = [
    {
        "boxes": torch.from_numpy(inputs[f"boxes{i}"]),
        "labels": torch.from_numpy(inputs[f"labels{i}"]).long(),
        "masks": torch.from_numpy(inputs[f"masks{i}"]),
    }
    for i in range(num_images)
]

# maskrcnn_resnet50_fpn's model for pretrained weights (FrozenBatchNorm2d, 3 trainable stages);
# no resizing in training (_skip_resize): the images are fed at their size.
torch.manual_seed(0)
body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
m = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=int(inputs["num_classes"]), _skip_resize=True, **settings)

# Weights that behave like trained ones: frozen batch-norm statistics of the test batch (each
# layer's input, in one pass), random affine parameters; the RPN and predictor outputs rescaled.
def calibrate(module, args):
    x = args[0]
    module.weight.uniform_(0.5, 1.5)
    module.bias.normal_(0.0, 0.2)
    module.running_mean.copy_(x.mean((0, 2, 3)))
    module.running_var.copy_(x.var((0, 2, 3), unbiased=False))

def rescale(module, output, std, center=False):
    factor = std / output.std()
    module.weight.mul_(factor)
    module.bias.mul_(factor)
    if center:  # every class about as likely
        module.bias.sub_(output.mean(0) * factor)

m.eval()
m.transform.train()  # no resizing
with torch.no_grad():
    batch, _ = m.transform(images)
    hooks = [mod.register_forward_pre_hook(calibrate) for mod in m.modules() if isinstance(mod, FrozenBatchNorm2d)]
    m.backbone.body(batch.tensors)
    for hook in hooks:
        hook.remove()
    features = m.backbone(batch.tensors)
    head = m.rpn.head
    levels = [head.conv(f) for f in features.values()]
    rescale(head.cls_logits, torch.cat([head.cls_logits(t).flatten() for t in levels]), 1.0)
    rescale(head.bbox_pred, torch.cat([head.bbox_pred(t).flatten() for t in levels]), 0.2)
    proposals, _ = m.rpn(batch, features)
    roi_heads = m.roi_heads
    x = roi_heads.box_head(roi_heads.box_roi_pool(features, proposals, batch.image_sizes))
    rescale(roi_heads.box_predictor.cls_score, roi_heads.box_predictor.cls_score(x), 1.0, center=True)
    rescale(roi_heads.box_predictor.bbox_pred, roi_heads.box_predictor.bbox_pred(x), 1.0)
    few = [p[:64] for p in proposals]  # the mask head is costly: its logits' spread from a few RoIs
    x = roi_heads.mask_head(roi_heads.mask_roi_pool(features, few, batch.image_sizes))
    x = roi_heads.mask_predictor.conv5_mask(x).relu()
    rescale(roi_heads.mask_predictor.mask_fcn_logits, roi_heads.mask_predictor.mask_fcn_logits(x), 4.0)
for k, v in m.state_dict().items():
    outputs["sd." + k] = v.clone()
outputs["batch"] = batch.tensors
outputs["image_sizes"] = np.array(batch.image_sizes)

# The training step, with its intermediates recorded from the submodules.
rpn = m.rpn
record = {}

def recorded(name, function):
    def wrapper(*args):
        result = function(*args)
        record[name] = (args, result)
        return result
    return wrapper

rpn.assign_targets_to_anchors = recorded("assign", rpn.assign_targets_to_anchors)
rpn.box_coder.encode = recorded("rpn_encode", rpn.box_coder.encode)
rpn.fg_bg_sampler = recorded("rpn_sampler", rpn.fg_bg_sampler)
rpn.filter_proposals = recorded("filter", rpn.filter_proposals)
roi_heads.select_training_samples = recorded("select", roi_heads.select_training_samples)
projections = []
project = tv_roi_heads.project_masks_on_boxes
tv_roi_heads.project_masks_on_boxes = lambda *args: projections.append((args, project(*args))) or projections[-1][1]

m.train()
losses = m(images, targets)
total = sum(losses.values())
total.backward()
trainable = {k: p for k, p in m.named_parameters() if p.requires_grad}
optimizer = torch.optim.SGD(
    trainable.values(), lr=float(inputs["lr"]), momentum=float(inputs["momentum"]), weight_decay=float(inputs["weight_decay"])
)
optimizer.step()

for k, v in losses.items():
    outputs["loss." + k] = v
for k, p in trainable.items():
    outputs["grad." + k] = p.grad
    outputs["after." + k] = p
outputs["frozen"] = np.array([k for k, p in m.named_parameters() if not p.requires_grad])

(anchors, _), (rpn_labels, _) = record["assign"][0], record["assign"][1]
outputs["anchors"] = anchors[0]
outputs["rpn_labels"] = torch.stack(rpn_labels)
outputs["rpn_matches"] = torch.stack([
    rpn.proposal_matcher(box_iou(t["boxes"], a)) if t["boxes"].numel() else torch.full((len(a),), -1)
    for a, t in zip(anchors, targets)
])
outputs["rpn_box_targets"] = torch.stack(record["rpn_encode"][1])
positive, negative = record["rpn_sampler"][1]
outputs["rpn_sampled_positive"] = torch.stack(positive)
outputs["rpn_sampled_negative"] = torch.stack(negative)
for i, boxes in enumerate(record["filter"][1][0]):
    outputs[f"proposals{i}"] = boxes
rois, matched, labels, box_targets = record["select"][1]
for i in range(num_images):
    outputs[f"rois{i}"] = rois[i]
    outputs[f"roi_matched{i}"] = matched[i]
    outputs[f"roi_labels{i}"] = labels[i]
    outputs[f"roi_box_targets{i}"] = box_targets[i]
    (_, mask_rois, mask_matched, _), mask_targets = projections[i]
    outputs[f"mask_rois{i}"] = mask_rois
    outputs[f"mask_matched{i}"] = mask_matched
    outputs[f"mask_targets{i}"] = mask_targets
"""

# ----------------------------------------------------------------------------------------------
# The batch: image 0 (height 256, width 320) with seven objects, image 1 (320 x 288) with none;
# the batch is 320 x 320, so each image is padded on one side.
IMAGE_SHAPES = ((256, 320), (320, 288))
# Image 0's objects: box (x1, y1, width, height) in whole pixels, width and height dividing
# GT_MASK_SIZE (see the module docstring), and the shape drawn in it.
OBJECTS = (
    ((16, 24, 128, 64), "blob"),
    ((96, 56, 64, 128), "blob"),  # overlaps the first
    ((176, 32, 64, 16), "thin_bar"),  # a 3 px thick bar with a block at one end
    ((40, 160, 64, 64), "thin_diagonal"),  # a 3 px wide diagonal stroke
    ((150, 120, 8, 8), "small"),
    ((0, 0, 32, 32), "blob"),  # touches the image's top and left edges
    ((248, 192, 64, 64), "blob"),  # touches the image's bottom edge, above the batch's padding
)


def _polygons(box, shape, rng):
    """COCO polygons (flat x, y lists) of ``shape`` inside ``box``."""
    x, y, w, h = (float(v) for v in box)
    if shape == "blob":  # a star-shaped polygon reaching the box's four sides
        angles = np.sort(rng.uniform(0, 2 * np.pi, 14))
        angles[:4] = (0.0, 0.5 * np.pi, np.pi, 1.5 * np.pi)
        angles = np.sort(angles)
        radius = rng.uniform(0.55, 1.0, len(angles))
        radius[np.isin(angles, (0.0, 0.5 * np.pi, np.pi, 1.5 * np.pi))] = 1.0
        px = x + w / 2 + np.cos(angles) * radius * w / 2
        py = y + h / 2 + np.sin(angles) * radius * h / 2
        return [np.stack([px, py], 1).ravel().tolist()]
    if shape == "thin_bar":  # pixel rows y + 7 .. y + 9 across the box, and a 12 px block on the left
        return [[x, y + 6.5, x + w, y + 6.5, x + w, y + 9.5, x, y + 9.5], [x, y, x + 12, y, x + 12, y + h, x, y + h]]
    if shape == "thin_diagonal":  # about 3 px wide, corner to corner
        return [[x, y, x + 3, y, x + w, y + h - 3, x + w, y + h, x + w - 3, y + h, x, y + 3]]
    if shape == "small":  # a diamond
        return [[x + w / 2, y, x + w, y + h / 2, x + w / 2, y + h, x, y + h / 2]]
    raise ValueError(shape)


def make_scene(seed=0):
    """Images (uint8), and image 0's boxes, labels and full-image masks; image 1 has no objects."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SHAPES]
    height, width = IMAGE_SHAPES[0]
    boxes, masks = [], []
    for (x, y, w, h), shape in OBJECTS:
        rles = mask_utils.frPyObjects(_polygons((x, y, w, h), shape, rng), height, width)
        mask = mask_utils.decode(mask_utils.merge(rles)).astype(np.uint8)
        inside = np.zeros_like(mask)
        inside[y : y + h, x : x + w] = 1
        mask *= inside  # nothing outside the box (the coverage masks hold the box only)
        assert mask.sum() > 0.2 * min(w, h) ** 2 or shape.startswith("thin"), shape
        colour = rng.integers(0, 256, 3)
        noise = rng.integers(-20, 21, (height, width, 3))
        images[0] = np.where(mask[..., None] > 0, np.clip(colour + noise, 0, 255), images[0]).astype(np.uint8)
        boxes.append((x, y, x + w, y + h))
        masks.append(mask)
    labels = rng.integers(1, NUM_CLASSES, len(OBJECTS))
    return images, np.array(boxes, np.float32), labels.astype(np.int64), np.stack(masks)


def keras_side(state, images, boxes, labels, masks):
    """The Keras model from torchvision's ``state``: its losses, gradients, SGD step and
    intermediates on the batch, all as numpy."""
    model = from_torchvision(state, verbose=False, **SETTINGS)
    num_images = len(images)
    height = max(-(-im.shape[0] // 32) * 32 for im in images)
    width = max(-(-im.shape[1] // 32) * 32 for im in images)
    batch = np.zeros((num_images, height, width, 3), np.float32)
    for i, image in enumerate(images):
        batch[i, : image.shape[0], : image.shape[1]] = image
    sizes = np.array([im.shape[:2] for im in images], np.int32)
    g = len(boxes)
    gt_boxes = np.zeros((num_images, g, 4), np.float32)
    gt_classes = np.zeros((num_images, g), np.int32)
    gt_masks = np.zeros((num_images, g, GT_MASK_SIZE, GT_MASK_SIZE), np.uint8)
    gt_boxes[0], gt_classes[0] = boxes, labels
    gt_masks[0] = [mini_mask(mask, box, GT_MASK_SIZE) for mask, box in zip(masks, boxes)]
    inputs = {"images": tf.constant(batch), "image_sizes": tf.constant(sizes)}
    targets = {"boxes": tf.constant(gt_boxes), "classes": tf.constant(gt_classes), "masks": tf.constant(gt_masks)}

    out = {"coverage": gt_masks}
    with tf.GradientTape() as tape:
        losses = model.compute_losses(inputs, targets, training=True)
        total = tf.add_n([losses[name] for name in LOSS_NAMES])
    variables = model.trainable_variables
    grads = tape.gradient(total, variables)
    out["losses"] = {name: float(losses[name]) for name in LOSS_NAMES}
    out["grads"] = {v.path: None if g is None else g.numpy() for v, g in zip(variables, grads)}
    out["before"] = {v.path: v.numpy() for v in model.weights}

    # Intermediates, from the stages' public pieces on the same batch.
    rpn, roi_heads = model.rpn, model.roi_heads
    images_t, sizes_t = model._unpack(inputs)
    out["batch"] = model._normalize_and_pad(images_t, sizes_t).numpy()
    padded_shape, features = model._features(images_t, training=True, image_sizes=sizes_t)
    rpn_out = rpn(features, padded_shape, sizes_t, training=True)
    anchors = tf.concat(rpn_out["anchors"], axis=0)
    gt_valid = tf.constant(gt_classes > 0)
    rpn_labels, rpn_box_targets, rpn_positive, rpn_sampled = target_fns.rpn_targets(
        anchors, targets["boxes"], gt_valid, rpn.fg_iou_threshold, rpn.bg_iou_threshold,
        rpn.batch_size_per_image, rpn.positive_fraction,
    )
    iou = box_ops.pairwise_iou(tf.broadcast_to(anchors[None], [num_images, anchors.shape[0], 4]), targets["boxes"])
    out["anchors"] = anchors.numpy()
    out["rpn_matches"] = match(iou, gt_valid, rpn.fg_iou_threshold, rpn.bg_iou_threshold, True).numpy()
    out["rpn_labels"] = rpn_labels.numpy()
    out["rpn_box_targets"] = rpn_box_targets.numpy()
    out["rpn_positive"] = rpn_positive.numpy()
    out["rpn_sampled"] = rpn_sampled.numpy()
    out["proposals"] = [p[:n] for p, n in zip(rpn_out["proposals"].numpy(), rpn_out["num_proposals"].numpy())]
    sampler = roi_heads.sampler
    rois = target_fns.sample_rois(
        rpn_out["proposals"], rpn_out["num_proposals"], targets["boxes"], targets["classes"],
        roi_heads.fg_iou_threshold, roi_heads.bg_iou_threshold, sampler.batch_size_per_image,
        sampler.positive_fraction, roi_heads.box_coder.weights,
    )
    out["rois"] = {k: v.numpy() for k, v in rois.items()}
    # The mask head's RoIs (the positives) and their targets, as RoIHeads.compute_losses takes them.
    slots = positive_slots(rois["positive"], sampler.max_positive)
    pos = {k: tf.gather(rois[k], slots, batch_dims=1) for k in ("rois", "positive", "matched_gt")}
    mask_size = 2 * roi_heads.mask_roi_align.output_size[0]
    mask_targets = target_fns.mask_targets(pos["rois"], pos["matched_gt"], targets["boxes"], targets["masks"], mask_size, sizes_t)
    out["mask"] = {k: v.numpy() for k, v in pos.items()}
    out["mask"]["targets"] = mask_targets.numpy()

    # One step of torch.optim.SGD's update (coupled L2) on those gradients.
    optimizer = CoupledL2SGD(LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables)])
    out["after"] = {v.path: v.numpy() for v in model.weights}
    out["targets"] = {key: (variable.path, transform) for key, (variable, transform) in maskrcnn_targets(model).items()}
    out["trainable"] = [v.path for v in variables]
    out["max_positive"] = sampler.max_positive
    return out


@pytest.fixture(scope="module")
def parity():
    images, boxes, labels, masks = make_scene()
    inputs = {f"image{i}": image for i, image in enumerate(images)}
    for i, image in enumerate(images):
        g = len(boxes) if i == 0 else 0
        inputs[f"boxes{i}"] = boxes if i == 0 else np.zeros((0, 4), np.float32)
        inputs[f"labels{i}"] = labels if i == 0 else np.zeros((0,), np.int64)
        inputs[f"masks{i}"] = masks if i == 0 else np.zeros((g,) + image.shape[:2], np.uint8)
    settings = {f"set.{k}": np.array(v) for k, v in SETTINGS.items()}
    ref = tvref.run(
        TV_TRAIN_SCRIPT,
        num_classes=np.array(NUM_CLASSES),
        lr=np.array(LEARNING_RATE),
        momentum=np.array(MOMENTUM),
        weight_decay=np.array(WEIGHT_DECAY),
        **settings,
        **inputs,
    )
    state = {k[3:]: v for k, v in ref.items() if k.startswith("sd.")}
    ours = keras_side(state, images, boxes, labels, masks)
    return ref, ours
