"""Train from scratch on the built-in synthetic set within a time budget, then measure COCO AP on
held-out synthetic images (different seed) with the project's COCO evaluation.

    python benchmarks/train_synthetic.py [--minutes 14] [--precision mixed_bfloat16]

Defaults are the best recipe found so far (BENCHMARKS.md): batch 8, AdamW lr 0.002, 64 sampled
RoIs per image, 500 proposals, cosine decay over the time budget.
"""
import argparse
import json
import tempfile
import time

import keras

from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.callbacks import CosineDecayOverTime, TimeLimit
from keras_maskrcnn.data import SyntheticShapes, synthetic_dataset
from keras_maskrcnn.evaluation import evaluate_coco
from keras_maskrcnn.optimizers import FusedAdamW
from keras_maskrcnn.precision import machine_summary, set_global_policy
from keras_maskrcnn.presets import small_model_config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=14.0)
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_bfloat16"],
                        help="dtype policy (auto: chosen for this machine, keras_maskrcnn.precision)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--optimizer", default="adamw", choices=["sgd", "adamw"])
    parser.add_argument("--schedule", default="time", choices=["time", "steps"],
                        help="cosine decay over the time budget, or over --decay-steps steps")
    parser.add_argument("--decay-steps", type=int, default=1500, help="cosine decay length (steps)")
    parser.add_argument("--rois", type=int, default=64, help="sampled RoIs per image")
    parser.add_argument("--proposals", type=int, default=500, help="RPN proposals per image in training")
    parser.add_argument("--representation-size", type=int, default=256, help="box head width")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="keep an exponential moving average of the weights with this momentum "
                             "(e.g. 0.99) and evaluate it; 0 = off")
    parser.add_argument("--train-images", type=int, default=2000,
                        help="distinct training images (generated on the fly; the set repeats after these)")
    parser.add_argument("--eval-images", type=int, default=50)
    parser.add_argument("--output", default=None, help="write the metrics JSON here")
    parser.add_argument("--save", default=None, help="save the trained model here (.keras)")
    args = parser.parse_args()
    args.precision = set_global_policy(args.precision)
    print(f"Machine: {machine_summary()}")
    keras.utils.set_random_seed(0)

    train = synthetic_dataset(args.train_images, args.batch_size, seed=1, max_instances=16, repeat=True)

    config = dict(
        small_model_config(image_size=256),
        box_batch_size_per_image=args.rois,
        rpn_post_nms_top_n_train=args.proposals,
        representation_size=args.representation_size,
    )
    model = MaskRCNN(num_classes=3, **config)
    steps_per_epoch = 50
    callbacks = [TimeLimit(args.minutes * 60)]
    if args.schedule == "time":
        learning_rate = args.lr
        callbacks.append(CosineDecayOverTime(args.lr, args.minutes * 60, warmup_steps=100, final_fraction=0.05))
    else:
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=args.decay_steps, warmup_target=args.lr, warmup_steps=100, alpha=0.05
        )
    # With use_ema, fit ends by copying the averaged weights into the model.
    ema = dict(use_ema=args.ema > 0, ema_momentum=args.ema or 0.99)
    if args.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9, weight_decay=1e-4, clipnorm=10.0, **ema)
    else:
        optimizer = FusedAdamW(learning_rate, weight_decay=1e-4, clipnorm=10.0, **ema)
    model.compile(optimizer=optimizer)
    start = time.time()
    history = model.fit(train, epochs=1000, steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=2)
    train_seconds = time.time() - start

    if args.save:
        model.save(args.save)
    with tempfile.TemporaryDirectory() as tmp:
        annotations = SyntheticShapes(seed=12345).write_coco(tmp, args.eval_images)
        metrics = evaluate_coco(model, annotations, tmp, batch_size=4)
    result = {
        "train_seconds": round(train_seconds, 1),
        "steps": int(model.optimizer.iterations.numpy()),  # TimeLimit may end the last epoch early
        "precision": args.precision,
        "args": vars(args),
        "first_loss": history.history["loss"][0],
        "last_loss": history.history["loss"][-1],
        "bbox": metrics["bbox"],
        "segm": metrics["segm"],
    }
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
