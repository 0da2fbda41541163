"""Is a trained model's classification limited by its features or by its class predictor?

Diagnostic on a saved ``.keras`` model (BENCHMARKS.md, "Learning per image seen", session 13):

1. the model's own classifier on the ground-truth boxes of the training and held-out sets;
2. a linear probe: a logistic regression fitted on the box head's last features (the input of
   ``cls_score``) of the training ground-truth boxes, scored on both sets;
3. a refit of ``cls_score`` alone on those features of the training RoIs (the model's proposals and
   the ground-truth boxes, labelled by IoU >= 0.5, ``--background-ratio`` background RoIs per
   foreground), everything else frozen; written to ``--output`` for ``keras-maskrcnn evaluate``.

    python benchmarks/classifier_refit.py --model O/model.keras \
        --train-annotations A --train-images I --val-annotations VA --val-images VI --output refit.keras
    keras-maskrcnn evaluate --annotations VA --images VI --model refit.keras
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from keras_maskrcnn import boxes as box_ops  # noqa: E402
from keras_maskrcnn.data.categories import category_to_class  # noqa: E402
from keras_maskrcnn.layers.box_head import _dense  # noqa: E402


def box_features(model, features, boxes):
    """``[N, D]`` float32 features of the box head before ``cls_score`` for ``boxes [N, 4]`` of
    one image's pyramid ``features``."""
    heads = model.roi_heads
    x = heads._pool(heads.box_roi_align, features, tf.constant(boxes[None], tf.float32))
    x = tf.reshape(x, [len(boxes), -1])
    for fc in heads.box_head.fcs:
        x = _dense(fc, x)
    return tf.cast(x, tf.float32).numpy()


def collect(model, classes_of, annotations, images, proposals, background_ratio, rng):
    """Per set: features and classes of the ground-truth boxes, and (``proposals``) of sampled RoIs."""
    coco = COCO(annotations)
    gt_x, gt_y, roi_x, roi_y = [], [], [], []
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        image = np.asarray(Image.open(os.path.join(images, info["file_name"])).convert("RGB"), np.float32)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        if not anns:
            continue
        gt = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                       for a in anns], np.float32)
        classes = np.array([classes_of[a["category_id"]] for a in anns])
        sizes = tf.constant([image.shape[:2]], tf.int32)
        padded, features = model._features(tf.constant(image[None]), False, sizes)  # once per image
        gt_x.append(box_features(model, features, gt))
        gt_y.append(classes)
        if proposals:
            out = model.rpn(features, padded, sizes, training=False)
            rois = np.concatenate([out["proposals"][0, : int(out["num_proposals"][0])].numpy(), gt])
            iou = box_ops.pairwise_iou(tf.constant(rois), tf.constant(gt)).numpy()
            labels = np.where(iou.max(1) >= 0.5, classes[iou.argmax(1)], 0)
            fg, bg = np.nonzero(labels > 0)[0], np.nonzero(labels == 0)[0]
            bg = rng.choice(bg, min(len(bg), max(int(background_ratio * len(fg)), 16)), replace=False)
            keep = np.concatenate([fg, bg])
            roi_x.append(box_features(model, features, rois[keep]))
            roi_y.append(labels[keep])
    cat = lambda parts: np.concatenate(parts) if parts else None  # noqa: E731
    return cat(gt_x), cat(gt_y), cat(roi_x), cat(roi_y)


def fit_softmax(x, y, num_outputs, l2, kernel=None, bias=None, steps=1000):
    """Multinomial logistic regression (Adam, full batch) from ``kernel``/``bias`` or zeros."""
    w = tf.Variable(np.zeros((x.shape[1], num_outputs), np.float32) if kernel is None else kernel)
    b = tf.Variable(np.zeros(num_outputs, np.float32) if bias is None else bias)
    xt, yt = tf.constant(x), tf.constant(y)
    optimizer = keras.optimizers.Adam(1e-3 if kernel is not None else 1e-2)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yt, xt @ w + b))
            loss += l2 * tf.reduce_sum(w * w)
        optimizer.apply_gradients(zip(tape.gradient(loss, [w, b]), [w, b]))
    return w.numpy(), b.numpy()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train-annotations", required=True)
    p.add_argument("--train-images", required=True)
    p.add_argument("--val-annotations", required=True)
    p.add_argument("--val-images", required=True)
    p.add_argument("--output", required=True, help="the model with the refitted cls_score (.keras)")
    p.add_argument("--background-ratio", type=float, default=3.0)
    p.add_argument("--l2", type=float, default=1e-4, help="of the refit")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    model = keras.models.load_model(a.model, compile=False)
    classes_of = category_to_class(COCO(a.train_annotations).getCatIds())  # the data pipeline's map
    rng = np.random.default_rng(a.seed)
    tr_x, tr_y, roi_x, roi_y = collect(model, classes_of, a.train_annotations, a.train_images, True, a.background_ratio, rng)
    va_x, va_y, _, _ = collect(model, classes_of, a.val_annotations, a.val_images, False, a.background_ratio, rng)
    score = model.roi_heads.box_head.cls_score
    kernel, bias = (tf.cast(v, tf.float32).numpy() for v in (score.kernel, score.bias))

    def accuracy(w, b, x, y, offset):  # argmax over the object classes only
        return float(np.mean(np.argmax((x @ w + b)[:, offset:], 1) + 1 == y))

    print(f"own classifier on ground-truth boxes: train {accuracy(kernel, bias, tr_x, tr_y, 1):.3f} "
          f"held-out {accuracy(kernel, bias, va_x, va_y, 1):.3f}")
    mean, std = tr_x.mean(0), tr_x.std(0) + 1e-6
    for l2 in (1e-4, 1e-2, 1e-1):
        w, b = fit_softmax((tr_x - mean) / std, tr_y - 1, len(classes_of), l2)
        print(f"linear probe (l2 {l2:g}): train {accuracy(w, b, (tr_x - mean) / std, tr_y, 0):.3f} "
              f"held-out {accuracy(w, b, (va_x - mean) / std, va_y, 0):.3f}")
    w, b = fit_softmax(roi_x, roi_y, kernel.shape[1], a.l2, kernel, bias)
    print(f"refit on {len(roi_y)} training RoIs ({int((roi_y > 0).sum())} foreground): own classifier on "
          f"held-out ground-truth boxes {accuracy(kernel, bias, va_x, va_y, 1):.3f} -> {accuracy(w, b, va_x, va_y, 1):.3f}")
    score.kernel.assign(w)
    score.bias.assign(b)
    model.save(a.output)
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
