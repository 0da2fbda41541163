"""Does mixed_bfloat16 change the answers? The same trained weights in float32 and bfloat16.

    python benchmarks/train_synthetic.py --minutes 14 --save model.keras     # a trained model
    python benchmarks/precision_accuracy.py --model model.keras [--images 50] [--markdown BENCHMARKS.md]

On held-out synthetic images (seed 12345, as ``train_synthetic.py`` evaluates): every float32
detection with score >= ``--score`` must have a bfloat16 detection of the same class with box
IoU >= 0.9, and the pasted binary masks of the matched pairs are compared (IoU); then both
precisions are evaluated with the COCO metric (segm and bbox AP).
"""
import argparse
import json
import os
import tempfile

import keras
import numpy as np

from keras_maskrcnn.data import SyntheticShapes
from keras_maskrcnn.evaluation import evaluate_coco
from keras_maskrcnn.precision import with_dtype_policy


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def compare_detections(reference, other, score: float):
    """Matches of ``reference``'s confident detections in ``other``.

    Returns ``(matched, total, mask_ious, exceptions)``: ``exceptions`` describes every confident
    reference detection without a match and every matched pair with mask IoU < 0.95 (its score,
    the best box IoU found, the mask's area and how many pixels differ), so a difference can be
    told apart from a detection near the score threshold or a boundary pixel on a small object.
    """
    matched, total, mask_ious, exceptions = 0, 0, [], []
    for image_index, (ref, oth) in enumerate(zip(reference, other)):
        keep = ref["scores"] >= score
        total += int(keep.sum())
        if not keep.any():
            continue
        ious = _box_iou(ref["boxes"][keep], oth["boxes"]) if len(oth["boxes"]) else np.zeros((keep.sum(), 0))
        same_class = ref["classes"][keep][:, None] == oth["classes"][None, :]
        same_class_ious = np.where(same_class, ious, 0.0)
        for i, ref_index in enumerate(np.nonzero(keep)[0]):
            record = {"image": image_index, "score": round(float(ref["scores"][ref_index]), 3),
                      "class": int(ref["classes"][ref_index])}
            if ious.shape[1] == 0:
                exceptions.append(dict(record, kind="unmatched", best_same_class_box_iou=None, best_any_class=None))
                continue
            if same_class_ious[i].max() < 0.9:
                best = int(ious[i].argmax())
                exceptions.append(dict(
                    record, kind="unmatched", best_same_class_box_iou=round(float(same_class_ious[i].max()), 3),
                    best_any_class={"box_iou": round(float(ious[i, best]), 3), "class": int(oth["classes"][best]),
                                    "score": round(float(oth["scores"][best]), 3)}))
                continue
            matched += 1
            other_index = int(same_class_ious[i].argmax())
            a = ref["masks"][ref_index].astype(bool)
            b = oth["masks"][other_index].astype(bool)
            iou = (a & b).sum() / max((a | b).sum(), 1)
            mask_ious.append(iou)
            if iou < 0.95:
                exceptions.append(dict(record, kind="mask IoU < 0.95", mask_iou=round(float(iou), 3),
                                       area=int(a.sum()), pixels_differing=int((a ^ b).sum()),
                                       other_score=round(float(oth["scores"][other_index]), 3)))
    return matched, total, np.array(mask_ious), exceptions


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained model (.keras)")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--score", type=float, default=0.5, help="float32 detections compared (score >=)")
    parser.add_argument("--markdown", help="append the result to this file")
    args = parser.parse_args()

    loaded = keras.models.load_model(args.model)
    models = {policy: with_dtype_policy(loaded, policy) for policy in ("float32", "mixed_bfloat16")}
    source = SyntheticShapes(seed=12345)
    images = [source.sample(i).image for i in range(args.images)]
    predictions = {policy: model.predict_images(images, batch_size=4) for policy, model in models.items()}
    matched, total, mask_ious, exceptions = compare_detections(predictions["float32"], predictions["mixed_bfloat16"], args.score)
    with tempfile.TemporaryDirectory() as tmp:
        annotations = source.write_coco(tmp, args.images)
        metrics = {p: evaluate_coco(m, annotations, tmp, batch_size=4) for p, m in models.items()}
    result = {
        "float32 detections (score >= %.2f)" % args.score: total,
        "matched in bfloat16 (same class, box IoU >= 0.9)": matched,
        "mask IoU min / median": [float(mask_ious.min()) if len(mask_ious) else None,
                                  float(np.median(mask_ious)) if len(mask_ious) else None],
        "masks with IoU >= 0.95": f"{int((mask_ious >= 0.95).sum())} of {len(mask_ious)}",
        "segm AP float32 / bfloat16": [metrics["float32"]["segm"]["AP"], metrics["mixed_bfloat16"]["segm"]["AP"]],
        "bbox AP float32 / bfloat16": [metrics["float32"]["bbox"]["AP"], metrics["mixed_bfloat16"]["bbox"]["AP"]],
        "exceptions": exceptions,
    }
    print(json.dumps(result, indent=1))
    if args.markdown:
        seg = result["segm AP float32 / bfloat16"]
        box = result["bbox AP float32 / bfloat16"]
        lo, med = result["mask IoU min / median"]
        with open(args.markdown, "a") as f:
            f.write(
                f"\n## Same weights, float32 vs mixed_bfloat16\n\nCommand: `python benchmarks/precision_accuracy.py "
                f"--model {os.path.basename(args.model)} --images {args.images}` (the model trained by "
                f"`train_synthetic.py` below; {args.images} held-out synthetic images).\n\n"
                f"| check | result |\n|---|---|\n"
                f"| float32 detections with score >= {args.score} found in bfloat16 (same class, box IoU >= 0.9) | {matched} of {total} |\n"
                f"| mask IoU of those pairs, min / median | {lo:.3f} / {med:.3f} |\n"
                f"| pairs with mask IoU >= 0.95 | {result['masks with IoU >= 0.95']} |\n"
                f"| segm AP float32 / bfloat16 | {seg[0]:.4f} / {seg[1]:.4f} (difference {abs(seg[0] - seg[1]) * 100:.2f} points) |\n"
                f"| bbox AP float32 / bfloat16 | {box[0]:.4f} / {box[1]:.4f} |\n"
            )
            if exceptions:
                f.write("\nThe exceptions (float32 score; for masks, the float32 mask's area and the pixels that differ):\n\n")
                for e in exceptions:
                    if e["kind"] == "unmatched":
                        other = e["best_any_class"]
                        found = "nothing" if other is None else (
                            f"best box IoU {other['box_iou']} with class {other['class']} at score {other['score']}; "
                            f"same class best IoU {e['best_same_class_box_iou']}")
                        f.write(f"- unmatched: image {e['image']}, class {e['class']}, score {e['score']}: bfloat16 has {found}\n")
                    else:
                        f.write(f"- mask IoU {e['mask_iou']}: image {e['image']}, score {e['score']} (bfloat16 "
                                f"{e['other_score']}), area {e['area']} px, {e['pixels_differing']} px differ\n")


if __name__ == "__main__":
    main()
