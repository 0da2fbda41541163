"""Times TensorFlow Model Garden's Mask R-CNN (the peer) on this machine's CPU.

This script runs in the Model Garden virtualenv (built by
``../shared/tools/setup_model_garden_peer.sh``), NOT in keras_maskrcnn's
environment; it is self-contained and does not import keras_maskrcnn. Another
script runs it in a subprocess, one configuration per process, so that the
first call and the peak memory belong to that configuration alone.

Example::

    /tmp/tfm-venv/bin/python benchmarks/peer_model_garden.py \
        --mode infer --height 512 --width 512 --batch 1 \
        --precision float32 --runs 3

The model is Model Garden's COCO experiment ``maskrcnn_resnetfpn_coco``
(ResNet-50-FPN, 91 classes, masks on) with random weights and
``task.model.input_size`` set to ``[H, W, 3]``.

* ``infer``: ``model(images, image_shape=..., anchor_boxes=..., training=False)``
  inside a ``tf.function`` on random float images; each timed call runs until
  every output tensor has been fetched to numpy.
* ``train``: one full training step (forward, losses, gradients, optimizer
  update) of Model Garden's own ``MaskRCNNTask.train_step`` inside a
  ``tf.function``, with the experiment's optimizer (SGD, momentum 0.9, built by
  ``task.create_optimizer``) and synthetic labels produced by Model Garden's
  own training parser (``maskrcnn_input.Parser``) from random boxes and masks;
  each timed step runs until the loss has been fetched to numpy.

Progress goes to stderr; the LAST line of stdout is one JSON object::

    {"system": "model_garden", "mode": ..., "height": ..., "width": ...,
     "batch": ..., "precision": ..., "first_call_s": float,
     "times_s": [N floats], "median_s": float, "peak_rss_mib": float,
     "tf_version": str, "notes": str}
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

# Must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"  # Model Garden is built on tf-keras.


def log(*args):
    print("[peer_model_garden]", *args, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time TensorFlow Model Garden's Mask R-CNN (ResNet-50-FPN, "
        "COCO config, random weights) for one configuration and print one JSON "
        "object as the last line of stdout.")
    p.add_argument(
        "--mode", choices=("infer", "train"), required=True,
        help="infer: forward pass with training=False (detections + 28x28 "
        "masks); train: one full training step of MaskRCNNTask.train_step "
        "(forward, losses, gradients, SGD-momentum update).")
    p.add_argument(
        "--height", type=int, required=True,
        help="Input image height in pixels; must be a multiple of 2**max_level "
        "(64 for the COCO config).")
    p.add_argument(
        "--width", type=int, required=True,
        help="Input image width in pixels; must be a multiple of 2**max_level "
        "(64 for the COCO config).")
    p.add_argument("--batch", type=int, default=1,
                   help="Images per call / per training step (default 1).")
    p.add_argument(
        "--precision", choices=("float32", "mixed_bfloat16"),
        default="float32",
        help="Keras (tf-keras) global dtype policy set before the model is "
        "built (default float32). mixed_bfloat16 needs no loss scaling, so the "
        "optimizer is not wrapped (as in Model Garden).")
    p.add_argument("--runs", type=int, default=3,
                   help="Number of timed calls after the first (untimed-in-"
                   "median) call; the median is over these (default 3).")
    p.add_argument("--inter-op-threads", type=int, default=0,
                   help="TensorFlow inter-op thread pool size (0 = "
                   "TensorFlow's default, one per core).")
    p.add_argument("--gt-boxes", type=int, default=5,
                   help="train only: ground-truth instances per image "
                   "(default 5).")
    p.add_argument("--seed", type=int, default=0,
                   help="Random seed for images and labels, and the global TF "
                   "seed for weights (best effort: Model Garden's in-graph "
                   "sampling is not bit-reproducible) (default 0).")
    args = p.parse_args(argv)
    if args.height <= 0 or args.width <= 0 or args.batch <= 0 or args.runs <= 0:
        p.error("--height, --width, --batch and --runs must be positive")
    if args.gt_boxes <= 0:
        p.error("--gt-boxes must be positive")
    return args


def build_experiment(height, width):
    from official.vision.configs import maskrcnn as cfg_lib
    exp = cfg_lib.maskrcnn_resnetfpn_coco()
    mc = exp.task.model
    stride = 2 ** mc.max_level
    if height % stride or width % stride:
        raise SystemExit(
            "peer_model_garden: --height/--width must be multiples of %d "
            "(2**max_level) for Model Garden's Mask R-CNN; got %dx%d"
            % (stride, height, width))
    mc.input_size = [height, width, 3]
    # Random weights: never try to read the ImageNet backbone checkpoint.
    exp.task.init_checkpoint = None
    return exp


def multilevel_anchors(mc, height, width, batch):
    import tensorflow as tf
    from official.vision.ops import anchor
    boxes = anchor.Anchor(
        min_level=mc.min_level, max_level=mc.max_level,
        num_scales=mc.anchor.num_scales,
        aspect_ratios=mc.anchor.aspect_ratios,
        anchor_size=mc.anchor.anchor_size,
        image_size=(height, width)).multilevel_boxes
    return {k: tf.tile(tf.expand_dims(v, 0), [batch, 1, 1, 1])
            for k, v in boxes.items()}


def fetch(structure):
    """Fetches every tensor of a nested structure to numpy."""
    import tensorflow as tf
    return tf.nest.map_structure(
        lambda t: t.numpy() if hasattr(t, "numpy") else t, structure)


def setup_infer(args, exp):
    import tensorflow as tf
    from official.vision.modeling import factory

    mc = exp.task.model
    h, w, b = args.height, args.width, args.batch
    input_specs = tf.keras.layers.InputSpec(shape=[None, h, w, 3])
    model = factory.build_maskrcnn(input_specs=input_specs, model_config=mc)
    anchor_boxes = multilevel_anchors(mc, h, w, b)
    images = tf.random.uniform([b, h, w, 3], seed=args.seed)
    image_shape = tf.constant([[h, w]] * b, tf.float32)

    @tf.function
    def infer(images):
        return model(images, image_shape=image_shape,
                     anchor_boxes=anchor_boxes, training=False)

    def step():
        return fetch(infer(images))

    def describe(out):
        masks = out.get("detection_masks")
        return "detection_masks %s" % (
            (None if masks is None else tuple(masks.shape)),)

    notes = (
        "Model Garden maskrcnn_resnetfpn_coco (ResNet-50-FPN, 91 classes), "
        "random weights, tf.function without XLA (Model Garden enables XLA "
        "only on GPU), every output fetched to numpy. Model Garden returns "
        "28x28 box-relative masks (detection_masks [B, 100, 28, 28]); it does "
        "not paste masks into the image.")
    return step, describe, notes


def synthetic_decoded_example(rng, height, width, num_gt, num_classes):
    """One decoded example as Model Garden's TfExampleDecoder produces it.

    Boxes are normalized [ymin, xmin, ymax, xmax]; masks are full-image binary
    float masks (an ellipse inscribed in each box).
    """
    import numpy as np
    import tensorflow as tf
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    sizes = rng.uniform(0.1, 0.5, size=(num_gt, 2))
    y0 = rng.uniform(0.0, 1.0 - sizes[:, 0])
    x0 = rng.uniform(0.0, 1.0 - sizes[:, 1])
    boxes = np.stack([y0, x0, y0 + sizes[:, 0], x0 + sizes[:, 1]],
                     axis=1).astype(np.float32)
    yy = (np.arange(height, dtype=np.float32) + 0.5) / height
    xx = (np.arange(width, dtype=np.float32) + 0.5) / width
    masks = np.zeros((num_gt, height, width), np.float32)
    for i, (ya, xa, yb, xb) in enumerate(boxes):
        cy, cx, ry, rx = (ya + yb) / 2, (xa + xb) / 2, (yb - ya) / 2, (xb - xa) / 2
        masks[i] = (((yy[:, None] - cy) / ry) ** 2
                    + ((xx[None, :] - cx) / rx) ** 2 <= 1.0)
    classes = rng.integers(1, num_classes, size=(num_gt,)).astype(np.int64)
    return {
        "image": tf.constant(image),
        "height": tf.constant(height, tf.int32),
        "width": tf.constant(width, tf.int32),
        "groundtruth_classes": tf.constant(classes),
        "groundtruth_is_crowd": tf.zeros([num_gt], tf.bool),
        "groundtruth_area": tf.constant(masks.sum(axis=(1, 2))),
        "groundtruth_boxes": tf.constant(boxes),
        "groundtruth_instance_masks": tf.constant(masks),
    }


def setup_train(args, exp):
    import numpy as np
    import tensorflow as tf
    from official.vision.dataloaders import maskrcnn_input
    from official.vision.tasks import maskrcnn as maskrcnn_task

    tc = exp.task
    mc = tc.model
    pc = tc.train_data.parser
    h, w, b = args.height, args.width, args.batch

    task = maskrcnn_task.MaskRCNNTask(tc)
    model = task.build_model()  # includes the L2 regularizer of the config
    # Same call as Model Garden's trainer: SGD momentum 0.9 with the COCO
    # stepwise+warmup schedule; LossScaleOptimizer only for float16.
    optimizer = task.create_optimizer(exp.trainer.optimizer_config, exp.runtime)

    # Labels exactly as Model Garden's training parser produces them, with
    # augmentation off (it is input-pipeline work, outside the timed step).
    parser = maskrcnn_input.Parser(
        output_size=mc.input_size[:2],
        min_level=mc.min_level,
        max_level=mc.max_level,
        num_scales=mc.anchor.num_scales,
        aspect_ratios=mc.anchor.aspect_ratios,
        anchor_size=mc.anchor.anchor_size,
        rpn_match_threshold=pc.rpn_match_threshold,
        rpn_unmatched_threshold=pc.rpn_unmatched_threshold,
        rpn_batch_size_per_im=pc.rpn_batch_size_per_im,
        rpn_fg_fraction=pc.rpn_fg_fraction,
        aug_rand_hflip=False,
        aug_rand_vflip=False,
        aug_scale_min=1.0,
        aug_scale_max=1.0,
        skip_crowd_during_training=pc.skip_crowd_during_training,
        max_num_instances=pc.max_num_instances,
        include_mask=mc.include_mask,
        outer_boxes_scale=mc.outer_boxes_scale,
        mask_crop_size=pc.mask_crop_size,
        # Model Garden's COCO data config feeds bfloat16 images (DataConfig
        # dtype 'bfloat16'); keep that with mixed_bfloat16, float32 otherwise.
        dtype="bfloat16" if args.precision == "mixed_bfloat16" else "float32",
    )
    parse = parser.parse_fn(is_training=True)
    rng = np.random.default_rng(args.seed)
    examples = [parse(synthetic_decoded_example(rng, h, w, args.gt_boxes,
                                                mc.num_classes))
                for _ in range(b)]
    # Batch like tf.data's .batch() would.
    images, labels = tf.nest.map_structure(lambda *xs: tf.stack(xs), *examples)

    @tf.function
    def train_step(images, labels):
        logs = task.train_step((images, labels), model, optimizer)
        return logs[task.loss]

    losses = []

    def step():
        loss = float(train_step(images, labels).numpy())
        losses.append(loss)
        return loss

    def describe(loss):
        return "loss %.4f" % loss

    def notes():
        finite = all(np.isfinite(losses))
        return (
            "Model Garden maskrcnn_resnetfpn_coco (ResNet-50-FPN, 91 classes), "
            "random weights, MaskRCNNTask.train_step (RPN+Fast R-CNN+mask "
            "losses, L2 %g) with task.create_optimizer (%s, momentum 0.9%s) "
            "in tf.function without XLA (Model Garden enables XLA only on "
            "GPU); labels from maskrcnn_input.Parser (augmentation off, %s "
            "images), %d random boxes/masks per image; timed until loss "
            "fetched; losses %s%s." % (
                tc.losses.l2_weight_decay, type(optimizer).__name__,
                "" if not isinstance(
                    optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
                else ", loss-scaled",
                images.dtype.name, args.gt_boxes, [round(x, 4) for x in losses],
                "" if finite else " (NON-FINITE)"))

    return step, describe, notes


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    tf.random.set_seed(args.seed)
    np.random.seed(args.seed)
    if args.precision == "mixed_bfloat16":
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    else:
        tf.keras.mixed_precision.set_global_policy("float32")

    exp = build_experiment(args.height, args.width)
    # Keep the runtime section consistent with the requested precision; it is
    # what create_optimizer reads (bfloat16/float32 => no loss scaling).
    exp.runtime.mixed_precision_dtype = (
        "bfloat16" if args.precision == "mixed_bfloat16" else "float32")

    log("tf %s, mode=%s %dx%d batch=%d precision=%s runs=%d" % (
        tf.__version__, args.mode, args.height, args.width, args.batch,
        args.precision, args.runs))
    t = time.perf_counter()
    setup = setup_infer if args.mode == "infer" else setup_train
    step, describe, notes = setup(args, exp)
    log("built in %.1f s" % (time.perf_counter() - t))

    t = time.perf_counter()
    out = step()
    first = time.perf_counter() - t
    log("first call %.2f s (%s)" % (first, describe(out)))

    times = []
    for i in range(args.runs):
        t = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t)
        log("run %d/%d %.3f s (%s)" % (i + 1, args.runs, times[-1],
                                       describe(out)))

    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result = {
        "system": "model_garden",
        "mode": args.mode,
        "height": args.height,
        "width": args.width,
        "batch": args.batch,
        "precision": args.precision,
        "first_call_s": first,
        "times_s": times,
        "median_s": statistics.median(times),
        "peak_rss_mib": peak_rss_mib,
        "tf_version": tf.__version__,
        "notes": notes() if callable(notes) else notes,
    }
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
