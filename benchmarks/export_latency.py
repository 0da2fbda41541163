"""Latency of the exported SavedModel against the Keras model on the same input.

    python benchmarks/export_latency.py                       # small config, 256 x 256, batch 1
    python benchmarks/export_latency.py --image-size 512 --batch-size 2 --runs 10
    python benchmarks/export_latency.py --model runs/train_coco/model.keras --height 800 --width 1067

Exports the model twice (box-relative masks, and with ``full_masks``) to a temporary folder, loads
each with ``tf.saved_model.load`` and times, on one uint8 batch at the model's input size (so the
in-graph resize keeps the size): ``model.predict`` with mask_output "box" against
``serving_default``, ``model.predict`` with mask_output "binary" (masks pasted at the image size)
against ``serving_default`` with ``full_masks``, plus ``serving_bytes`` (PNG decoding included)
and ``model.predict_images``. Each row is the median of ``--runs`` calls after ``--warmup``
calls, timed round-robin. The target: exported within 10% of ``model.predict`` (ratio <= 1.10).
"""
import argparse
import json
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

import keras_maskrcnn  # noqa: F401  (registers the model's classes for load_model)
from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.export import export_saved_model
from keras_maskrcnn.presets import small_model_config


def interleaved_medians(fns, runs, warmup):
    """Median seconds of each of ``fns``, timed round-robin (one call of each per round) so that
    load from other processes affects all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, seconds in zip(fns, times):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
    return [statistics.median(seconds) for seconds in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="saved model (.keras); default: small_model_config(--image-size)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--height", type=int, help="input height (default: --image-size)")
    parser.add_argument("--width", type=int, help="input width (default: --image-size)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=9, help="timed calls per row (median; >= 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be >= 5")

    keras.utils.set_random_seed(0)
    if args.model:
        import keras_maskrcnn.schedules  # noqa: F401  (registers the learning-rate schedule)

        model = keras.models.load_model(args.model, compile=False)
    else:
        model = MaskRCNN(num_classes=3, **small_model_config(image_size=args.image_size))
        model.build()
    # Same weights, two mask formats (model.predict returns what mask_output says).
    models = {}
    for mask_output in ("box", "binary"):
        models[mask_output] = MaskRCNN.from_config(dict(model.get_config(), mask_output=mask_output))
        models[mask_output].build()
        models[mask_output].set_weights(model.get_weights())
    height = args.height or args.image_size
    width = args.width or args.image_size
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, height, width, 3)).astype(np.uint8)
    tensor = tf.constant(images)
    pngs = tf.constant([tf.io.encode_png(image).numpy() for image in images])

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        box_dir = export_saved_model(model, tmp + "/box")
        export_seconds = time.perf_counter() - start
        full_dir = export_saved_model(model, tmp + "/full", full_masks=True)
        box = tf.saved_model.load(box_dir)
        full = tf.saved_model.load(full_dir)
        paths = [
            ("box masks", "model.predict", lambda: models["box"].predict(images, batch_size=args.batch_size, verbose=0)),
            ("box masks", "model.predict_on_batch", lambda: models["box"].predict_on_batch(images)),
            ("box masks", "SavedModel serving_default", lambda: box.signatures["serving_default"](images=tensor)["boxes"].numpy()),
            ("box masks", "SavedModel serving_bytes (PNG)", lambda: box.signatures["serving_bytes"](image_bytes=pngs)["boxes"].numpy()),
            ("full masks", "model.predict", lambda: models["binary"].predict(images, batch_size=args.batch_size, verbose=0)),
            ("full masks", "SavedModel serving_default", lambda: full.signatures["serving_default"](images=tensor)["full_masks"].numpy()),
            ("full masks", "model.predict_images", lambda: model.predict_images(list(images), batch_size=args.batch_size)),
        ]
        medians = interleaved_medians([fn for _, _, fn in paths], args.runs, args.warmup)
    rows = [(group, name, seconds) for (group, name, _), seconds in zip(paths, medians)]

    baseline = {group: seconds for group, name, seconds in rows if name == "model.predict"}
    print(
        f"\nbatch {args.batch_size} x {height} x {width}, model min/max size {model.min_size}/{model.max_size}, "
        f"{tf.config.list_physical_devices('GPU') and 'GPU' or 'CPU'}, median of {args.runs} after {args.warmup} "
        f"warm-up; export took {export_seconds:.1f} s\n"
    )
    print(f"{'masks':<11} {'path':<32} {'median ms':>10} {'vs predict':>11}")
    result = []
    for group, name, seconds in rows:
        ratio = seconds / baseline[group]
        print(f"{group:<11} {name:<32} {seconds * 1000:>10.1f} {ratio:>10.2f}x")
        result.append({"masks": group, "path": name, "median_ms": round(seconds * 1000, 2), "ratio": round(ratio, 3)})
    exported = [r for r in result if r["path"] == "SavedModel serving_default"]
    ok = all(r["ratio"] <= 1.10 for r in exported)
    print(f"\nserving_default within 10% of model.predict: {'yes' if ok else 'NO'}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "rows": result, "within_10_percent": ok}, f, indent=1)


if __name__ == "__main__":
    main()
