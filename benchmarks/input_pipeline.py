"""Does the input pipeline keep the model busy? Training steps/s fed by the pipeline against the
same kind of batches already in memory.

    python benchmarks/input_pipeline.py [--data ../shared/datasets/fruits_nuts] [--steps 20] [--markdown BENCHMARKS.md]

Measured for ``keras_maskrcnn.data.coco_dataset`` (JPEG decoding, resizing by the COCO
rule, random flips, mask rasterisation, padding, batching, prefetch) on a real COCO-format set:
batches/s of the pipeline alone, and ``model.fit`` steps/s of a ResNet-50-FPN Mask R-CNN
(the precision ``--precision`` gives, by default the one ``auto`` picks; frozen batch norm, torchvision's defaults) fed three ways: by the pipeline; by
``--steps`` batches that the pipeline made beforehand, held in memory (the same kind of data, no
pipeline work during training); and by one batch repeated (the model then sees the same images
every step, which changes data-dependent work such as NMS). Two alternating rounds of ``--steps``
each; rates over both rounds. Equal "pipeline" and "in memory" rates mean the pipeline costs
the model nothing.
"""
import argparse
import os
import time

import keras
import tensorflow as tf

from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.data import coco_dataset

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "datasets", "fruits_nuts")


def _steps_per_second(model, dataset, steps: int) -> float:
    model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)  # trace and warm up
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder with instances.json and the images")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=512)
    parser.add_argument("--max-size", type=int, default=683)
    parser.add_argument("--precision", default="auto", help="dtype policy (auto: chosen for this machine)")
    parser.add_argument("--markdown", help="append the result to this file")
    args = parser.parse_args()
    annotations = os.path.join(args.data, "instances.json")
    if not os.path.exists(annotations):
        raise SystemExit(f"{annotations} not found (pass --data)")

    def real():
        return coco_dataset(annotations, args.data, args.batch_size, training=True, min_size=args.min_size,
                            max_size=args.max_size, repeat=True, seed=0)

    iterator = iter(real())
    next(iterator)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(iterator)
    pipeline_rate = args.steps / (time.perf_counter() - start)

    from keras_maskrcnn.precision import machine_summary, set_global_policy

    args.precision = set_global_policy(args.precision)
    print(f"Machine: {machine_summary()}")
    keras.utils.set_random_seed(0)
    model = MaskRCNN(num_classes=3, min_size=args.min_size, max_size=args.max_size)
    model.compile(optimizer=keras.optimizers.SGD(0.005, momentum=0.9))
    in_memory = real().take(args.steps + 2).cache()
    for _ in in_memory:  # fill the cache: later epochs read memory only
        pass
    datasets = {"fed": real(), "in memory": in_memory.repeat(), "one batch": real().take(1).cache().repeat()}
    # Alternate (the machine's speed drifts): each mode once per round.
    rates = {name: [] for name in datasets}
    for _ in range(2):
        for name, dataset in datasets.items():
            rates[name].append(_steps_per_second(model, dataset, args.steps))
    print("rounds:", {k: [round(r, 3) for r in v] for k, v in rates.items()})
    fed_rate, memory_rate, one_rate = (2 / sum(1 / r for r in rates[k]) for k in datasets)
    rows = [
        ("pipeline alone (batches/s)", pipeline_rate),
        ("model.fit fed by the pipeline (steps/s)", fed_rate),
        ("model.fit on the same kind of batches in memory (steps/s)", memory_rate),
        ("model.fit on one batch repeated (steps/s)", one_rate),
    ]
    for name, value in rows:
        print(f"{name:58s} {value:7.2f}")
    print(f"pipeline-fed / in memory: {fed_rate / memory_rate:.2f}")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(
                "\n## Input pipeline on real data\n\nCommand: `python benchmarks/input_pipeline.py "
                f"--steps {args.steps} --markdown BENCHMARKS.md` ({os.path.basename(os.path.normpath(args.data))}, "
                f"batch {args.batch_size}, min/max size {args.min_size}/{args.max_size}, ResNet-50-FPN, {args.precision}; {machine_summary()}).\n\n"
                "| measurement | rate |\n|---|---|\n"
                + "".join(f"| {name} | {value:.2f} |\n" for name, value in rows)
                + f"| pipeline-fed / in memory | {fed_rate / memory_rate:.2f} |\n\n"
                + "Rounds (steps/s): " + "; ".join(f"{k} {', '.join(f'{r:.3f}' for r in v)}" for k, v in rates.items())
                + ".\n"
            )


if __name__ == "__main__":
    main()
