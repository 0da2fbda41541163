"""The main job on a built-in default: train a small Mask R-CNN on synthetic shapes for a few
minutes, evaluate it with COCO AP on held-out images, and write pictures of its detections.

    python examples/demo.py --output demo_output [--minutes 5.3] [--precision auto]

The configuration is :func:`keras_maskrcnn.presets.demo_config` (the small preset at 160 px),
sized for a 2-core CPU without native bfloat16, where it trains in float32; the precision is
chosen for the machine (``auto``, logged). Measured held-out AP: BENCHMARKS.md, "The demo".
"""
import argparse
import os

# Before TensorFlow loads: hide its C++ info/warning logs (grappler cost-model noise).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow enables its oneDNN CPU kernels by default only on CPUs with AVX-512 VNNI/BF16 or AMX;
# on an AVX2-only CPU they took 7-20 % less CPU time per float32 training step, about the same wall
# time (BENCHMARKS.md); the demo's measured results were taken with them on.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
import json
import time

import keras

from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.callbacks import CosineDecayOverTime, TimeLimit
from keras_maskrcnn.data import SyntheticShapes, synthetic_dataset
from keras_maskrcnn.evaluation import evaluate_coco
from keras_maskrcnn.optimizers import FusedAdamW
from keras_maskrcnn.precision import POLICIES, set_global_policy
from keras_maskrcnn.presets import DEMO_IMAGE_SIZE, demo_config
from keras_maskrcnn.visualize import draw_detections, save_png


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for the model, metrics and pictures")
    parser.add_argument("--minutes", type=float, default=5.3,
                        help="training time budget (tracing included); with the evaluation it stays under 6 minutes")
    parser.add_argument("--eval-images", type=int, default=40, help="held-out synthetic images to evaluate")
    parser.add_argument("--pictures", type=int, default=6, help="how many pictures to write")
    parser.add_argument("--precision", default="auto", choices=("auto",) + POLICIES,
                        help="dtype policy (auto: chosen for this machine)")
    parser.add_argument("--image-size", type=int, default=DEMO_IMAGE_SIZE, help="side of the synthetic images")
    parser.add_argument("--batch-size", type=int, default=4, help="images per training step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup-steps", type=int, default=150, help="steps of linear learning-rate warmup")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    set_global_policy(args.precision)
    keras.utils.set_random_seed(0)

    size = (args.image_size, args.image_size)
    train = synthetic_dataset(5000, args.batch_size, image_size=size, seed=1, max_instances=16, repeat=True)
    model = MaskRCNN(num_classes=3, **demo_config(image_size=args.image_size))
    # From scratch in minutes: AdamW, with a cosine decay that ends when the time budget does. A
    # 150-step warmup (50 before): at the 760 steps a slow float32 CPU manages, held-out segm AP50
    # 0.535 / 0.547 / 0.497 against 0.504 / 0.512 / 0.434 (three seeds; BENCHMARKS.md, session 16).
    model.compile(optimizer=FusedAdamW(args.lr, weight_decay=1e-4, clipnorm=10.0))
    budget = args.minutes * 60
    print(f"Training for {args.minutes:g} minutes on synthetic shapes ({args.image_size} px, batch {args.batch_size}) ...")
    start = time.time()
    callbacks = [CosineDecayOverTime(args.lr, budget, warmup_steps=args.warmup_steps), TimeLimit(budget)]
    history = model.fit(train, epochs=10_000, steps_per_epoch=25, callbacks=callbacks, verbose=2)
    steps = int(model.optimizer.iterations.numpy())
    print(f"Trained {steps} steps in {time.time() - start:.0f} s; loss {history.history['loss'][0]:.2f} in the first "
          f"epoch, {history.history['loss'][-1]:.2f} in the last")
    model.save(os.path.join(args.output, "model.keras"))

    start = time.time()
    heldout = SyntheticShapes(size, seed=12345)  # another seed: images the model never saw
    heldout_dir = os.path.join(args.output, "heldout")
    annotations = heldout.write_coco(heldout_dir, args.eval_images)
    metrics = evaluate_coco(model, annotations, heldout_dir, batch_size=8)
    print(f"Evaluated {args.eval_images} held-out images in {time.time() - start:.0f} s")
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
