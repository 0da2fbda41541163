"""Train Mask R-CNN on a COCO-format dataset, then evaluate it (COCO box and mask AP).

    python examples/train_coco.py --output runs/fruits   # ../shared/datasets/fruits_nuts by default

The last --val-images images of the annotation file are held out for evaluation.
"""
import argparse
import os

from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.data import CocoSource, coco_dataset
from keras_maskrcnn.evaluation import evaluate_coco
from keras_maskrcnn.optimizers import build_optimizer
from keras_maskrcnn.train import train

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "datasets", "fruits_nuts")
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
HAVE_DEFAULT = os.path.isdir(DEFAULT)
parser.add_argument("--annotations", default=os.path.join(DEFAULT, "instances.json") if HAVE_DEFAULT else None,
                    required=not HAVE_DEFAULT, help="COCO instances JSON")
parser.add_argument("--images", default=DEFAULT if HAVE_DEFAULT else None, required=not HAVE_DEFAULT,
                    help="folder the images' file_name is relative to")
parser.add_argument("--output", default="runs/train_coco", help="output folder")
parser.add_argument("--epochs", type=int, default=12)
parser.add_argument("--batch-size", type=int, default=2)
parser.add_argument("--min-size", type=int, default=512)
parser.add_argument("--max-size", type=int, default=853)
parser.add_argument("--val-images", type=int, default=4, help="images held out for evaluation")
args = parser.parse_args()

source = CocoSource(args.annotations, args.images)
train_ids, val_ids = source.image_ids[: -args.val_images], source.image_ids[-args.val_images :]
dataset = coco_dataset(args.annotations, args.images, args.batch_size, training=True, image_ids=train_ids,
                       min_size=args.min_size, max_size=args.max_size, drop_remainder=True)
# Randomly initialised backbone: trainable batch norm (frozen_bn is for pretrained weights).
model = MaskRCNN(num_classes=source.num_classes, min_size=args.min_size, max_size=args.max_size,
                 backbone_norm="batch_norm")
steps = len(train_ids) // args.batch_size
model.compile(optimizer=build_optimizer(0.02 * args.batch_size / 16, warmup_steps=min(100, steps),
                                        total_steps=args.epochs * steps))
train(model, dataset, args.output, epochs=args.epochs)  # checkpoints, logs, classes.json, model.keras

metrics = evaluate_coco(model, args.annotations, args.images, image_ids=val_ids)
for iou_type, numbers in metrics.items():
    print(iou_type, " ".join(f"{name}={value:.3f}" for name, value in numbers.items()))
