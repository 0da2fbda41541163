"""Convert torchvision's COCO Mask R-CNN weights and evaluate them on COCO val2017.

Download the weights yourself (this script never goes online), e.g.

    wget https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth

then

    python examples/evaluate_torchvision_coco.py maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth \\
        --annotations coco/annotations/instances_val2017.json --images coco/val2017

Expected (torchvision's published numbers for these weights, all 5000 images): box AP 37.9,
mask AP 34.6. A ``.pth`` is read without PyTorch (a restricted unpickler that only rebuilds
tensors: keras_maskrcnn.torch_pickle); ``.safetensors`` and ``.npz`` copies work too. ``--save model.keras`` also writes the converted
model. ``--max-images 50`` gives a quick (not comparable) check.

Class ids: torchvision's COCO model predicts the original COCO category ids (1..90, with gaps) as
its labels, so the converted model's class ``k`` *is* COCO category ``k``. ``evaluate_coco`` maps
contiguous class ids to categories through the sorted category ids, so the model is wrapped to
translate category ids into those contiguous ids (and drop the ten ids COCO never uses, which
COCOeval would ignore anyway).
"""
import argparse
import os
import time

import numpy as np

from keras_maskrcnn.convert import from_torchvision
from keras_maskrcnn.data import categories
from keras_maskrcnn.evaluation import METRIC_NAMES, evaluate_coco
from pycocotools.coco import COCO

EXPECTED = {"bbox": 0.379, "segm": 0.346}


class CategoryIdsAsClasses:
    """A model predicting COCO category ids, seen through the contiguous ids ``evaluate_coco`` expects."""

    def __init__(self, model, category_ids):
        self.model = model
        self.to_class = categories.category_to_class(category_ids)

    def predict_images(self, images, batch_size=1):
        predictions = []
        for p in self.model.predict_images(images, batch_size=batch_size):
            keep = np.isin(p["classes"], list(self.to_class))
            p = {name: value[keep] for name, value in p.items()}
            p["classes"] = np.array([self.to_class[int(c)] for c in p["classes"]], np.int32)
            predictions.append(p)
        return predictions


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="torchvision state dict: .pth, .safetensors or .npz")
    parser.add_argument("--annotations", required=True, help="instances_val2017.json")
    parser.add_argument("--images", required=True, help="folder of the val2017 images")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="images per batch (default 1, as torchvision's evaluation: a batch is padded to its "
        "largest image, which changes features near the border slightly)",
    )
    parser.add_argument("--max-images", type=int, help="evaluate only the first N images")
    parser.add_argument("--results-file", help="write the COCO results JSON here")
    parser.add_argument("--save", help="also save the converted model (.keras or .weights.h5)")
    args = parser.parse_args()

    start = time.time()
    model = from_torchvision(args.weights)  # torchvision's preprocessing: min_size 800, max_size 1333
    print(f"converted {args.weights}: {model.num_classes} classes ({time.time() - start:.0f} s)")
    if args.save:
        parent = os.path.dirname(args.save)
        if parent:
            os.makedirs(parent, exist_ok=True)
        model.save(args.save) if args.save.endswith(".keras") else model.save_weights(args.save)
        print(f"saved {args.save}")

    coco_gt = COCO(args.annotations)
    start = time.time()
    metrics = evaluate_coco(
        CategoryIdsAsClasses(model, coco_gt.getCatIds()),
        coco_gt,
        args.images,
        batch_size=args.batch_size,
        max_images=args.max_images,
        results_file=args.results_file,
    )
    print(f"evaluated in {time.time() - start:.0f} s")
    print(f"{'metric':<8}{'bbox':>9}{'segm':>9}")
    for name in METRIC_NAMES:
        print(f"{name:<8}{metrics['bbox'][name]:>9.4f}{metrics['segm'][name]:>9.4f}")
    print(f"expected AP (torchvision, all 5000 images): bbox {EXPECTED['bbox']}, segm {EXPECTED['segm']}")


if __name__ == "__main__":
    main()
