"""The main job on a built-in default: train a small Mask R-CNN on synthetic shapes for a few
minutes, evaluate it with COCO AP on held-out images, and write pictures of its detections.

    python examples/demo.py --output demo_output [--minutes 4]
"""
import argparse
import os

# Before TensorFlow loads: hide its C++ info/warning logs (grappler cost-model noise).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import json
import time

import keras

from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.callbacks import CosineDecayOverTime, TimeLimit
from keras_maskrcnn.data import SyntheticShapes, synthetic_dataset
from keras_maskrcnn.evaluation import evaluate_coco
from keras_maskrcnn.optimizers import FusedAdamW
from keras_maskrcnn.presets import small_model_config
from keras_maskrcnn.visualize import draw_detections, save_png


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for the model, metrics and pictures")
    parser.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    parser.add_argument("--eval-images", type=int, default=40, help="held-out synthetic images to evaluate")
    parser.add_argument("--pictures", type=int, default=6, help="how many pictures to write")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # bfloat16 convs: fast on AMX CPUs
    keras.utils.set_random_seed(0)

    train = synthetic_dataset(5000, 4, seed=1, max_instances=16, repeat=True)
    model = MaskRCNN(num_classes=3, **small_model_config(image_size=256))
    # From scratch in minutes: AdamW, with a cosine decay that ends when the time budget does.
    model.compile(optimizer=FusedAdamW(1e-3, weight_decay=1e-4, clipnorm=10.0))
    budget = args.minutes * 60
    print(f"Training for {args.minutes:g} minutes on synthetic shapes ...")
    start = time.time()
    callbacks = [CosineDecayOverTime(1e-3, budget, warmup_steps=100), TimeLimit(budget)]
    model.fit(train, epochs=10_000, steps_per_epoch=25, callbacks=callbacks, verbose=2)
    print(f"Trained in {time.time() - start:.0f} s")
    model.save(os.path.join(args.output, "model.keras"))

    heldout = SyntheticShapes(seed=12345)  # another seed: images the model never saw
    heldout_dir = os.path.join(args.output, "heldout")
    annotations = heldout.write_coco(heldout_dir, args.eval_images)
    metrics = evaluate_coco(model, annotations, heldout_dir, batch_size=4)
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print("held-out COCO metrics:")
    for iou_type in ("bbox", "segm"):
        print(f"  {iou_type}: AP {metrics[iou_type]['AP']:.3f}  AP50 {metrics[iou_type]['AP50']:.3f}  AP75 {metrics[iou_type]['AP75']:.3f}")

    images = [heldout.sample(i).image for i in range(args.pictures)]
    for i, (image, result) in enumerate(zip(images, model.predict_images(images, batch_size=4))):
        picture = draw_detections(image, result["boxes"], result["classes"], result["scores"], result["masks"],
                                  class_names=heldout.class_names)
        save_png(picture, os.path.join(args.output, f"detections_{i}.png"))
    print(f"Wrote {args.pictures} pictures, model.keras and metrics.json to {args.output}/")


if __name__ == "__main__":
    main()
