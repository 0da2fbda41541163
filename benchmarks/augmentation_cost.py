"""Training steps per second with each augmentation of the data pipeline (none, flip, multiscale, LSJ).

    python benchmarks/augmentation_cost.py [--data ../shared/datasets/fruits_nuts] [--steps 6] [--markdown BENCHMARKS.md]

``model.fit`` of the small preset (``presets.small_model_config``) fed by
:func:`keras_maskrcnn.data.coco_dataset` with ``augmentation=NAME``: the pipeline's cost is
what it adds to a training step, since it prefetches while the model computes. Each augmentation
runs in a fresh process (``--rounds`` rounds, alternating, so load on the shared machine affects
all alike); a process times ``--steps`` steps after two untimed ones (tracing; multiscale and LSJ
trace once per new input shape, so the untimed steps do not cover every shape: the median does).
Sizes: short side ``--min-size``, long side at most ``--max-size``; the augmentations' own sizes
are what ``keras-maskrcnn train --augmentation NAME`` uses at that short side
(:func:`keras_maskrcnn.recipes.augmentation_options`: torchvision's short sides 480-800 and LSJ's
1024 frame, scaled by ``min_size / 800``), so LSJ batches are square frames (the table gives each
batch's shape).
Without the folder (``--data``) it writes 16 synthetic images and uses them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

from markdown_sections import command_line, load_average, machine_kind, replace_section, run_json_worker

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "datasets", "fruits_nuts")
AUGMENTATIONS = ("none", "flip", "multiscale", "lsj")
MARK = "<!-- augmentation_cost: {kind} -->"


def worker(name: str, annotations: str, images: str, batch: int, steps: int, min_size: int, max_size: int,
           precision: str) -> dict:
    import keras

    from keras_maskrcnn import MaskRCNN
    from keras_maskrcnn.data import coco_dataset
    from keras_maskrcnn.optimizers import FusedAdamW
    from keras_maskrcnn.precision import set_global_policy
    from keras_maskrcnn.presets import small_model_config
    from keras_maskrcnn.recipes import augmentation_options

    policy = set_global_policy(precision)
    keras.utils.set_random_seed(0)
    model = MaskRCNN(num_classes=3, **dict(small_model_config(min_size), max_size=max_size))
    data = coco_dataset(annotations, images, batch, training=True, min_size=min_size, max_size=max_size, seed=0,
                        augmentation=name, augmentation_options=augmentation_options(name, min_size), repeat=True,
                        drop_remainder=True, size_divisible=model.size_divisible, mask_size=model.gt_mask_size)
    shape = tuple(next(iter(data))[0]["images"].shape)
    model.compile(optimizer=FusedAdamW(1e-3, weight_decay=1e-4, clipnorm=10.0))
    model.fit(data, epochs=1, steps_per_epoch=2, verbose=0)

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    times = []
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[StepTimes()])
    return {"policy": policy, "step_s": times, "shape": shape}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder with instances.json and the images it names")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per augmentation, alternating")
    parser.add_argument("--min-size", type=int, default=384)
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--markdown", help="write the table into this file (one section per CPU kind)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--annotations", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.annotations, args.images, args.batch, args.steps,
                                args.min_size, args.max_size, args.precision)))
        return

    sys.path.insert(0, ROOT)
    from keras_maskrcnn.precision import detect_hardware, machine_summary, resolve_policy

    annotations, images = os.path.join(args.data, "instances.json"), args.data
    if not os.path.exists(annotations):
        from keras_maskrcnn.data import SyntheticShapes

        images = tempfile.mkdtemp(prefix="augmentation_cost_")
        annotations = SyntheticShapes((384, 512), seed=0).write_coco(images, 16)
        print(f"{args.data} has no instances.json: using 16 synthetic images in {images}")
    hardware = detect_hardware()
    # "auto" decided once here: decided in each worker, its bfloat16 check can come out
    # differently from one process to the next on a loaded machine, mixing precisions in one table.
    precision = resolve_policy(args.precision)
    print(f"Machine: {machine_summary(hardware)}", flush=True)
    results = {name: {"step_s": []} for name in AUGMENTATIONS}
    loads = [load_average()]
    for _ in range(args.rounds):
        for name in AUGMENTATIONS:
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
            command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--annotations", annotations,
                       "--images", images, "--batch", str(args.batch), "--steps", str(args.steps),
                       "--min-size", str(args.min_size), "--max-size", str(args.max_size), "--precision", precision]
            out = run_json_worker(command, env, ROOT, name)
            results[name]["step_s"] += out["step_s"]
            results[name].update(policy=out["policy"], shape=out["shape"])
            print(f"{name}: median {statistics.median(out['step_s']):.2f} s per step, batch {tuple(out['shape'])}",
                  flush=True)
    loads.append(load_average())
    base = 1.0 / statistics.median(results["none"]["step_s"])
    rows = ["| augmentation | precision | first batch's shape | s per step (median) | steps/s | vs none |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        seconds = statistics.median(r["step_s"])
        rows.append(f"| {name} | {r['policy']} | {' x '.join(str(d) for d in r['shape'])} | {seconds:.2f} | "
                    f"{1 / seconds:.2f} | {1 / seconds / base:.2f}x |")
    table = "\n".join(rows)
    print(table)
    if args.markdown:
        kind = machine_kind(hardware)
        command = command_line("augmentation_cost.py", sys.argv[1:], args.markdown)
        section = (
            f"{MARK.format(kind=kind + ' begin')}\n## Training steps/s with each augmentation ({hardware.cpu_model})\n\n"
            f"Machine: {machine_summary(hardware)}.\nCommand: `{command} --markdown BENCHMARKS.md` "
            f"({datetime.date.today().isoformat()}; {os.path.basename(os.path.normpath(args.data))}, small preset, "
            f"batch {args.batch}, short side {args.min_size}, long side at most {args.max_size}; {args.steps} steps x "
            f"{args.rounds} processes per augmentation after two untimed steps each; load average {loads[0]} before, "
            f"{loads[1]} after).\n\n{table}\n{MARK.format(kind=kind + ' end')}"
        )
        replace_section(args.markdown, MARK.format(kind=kind + " begin"), MARK.format(kind=kind + " end"), section)


if __name__ == "__main__":
    main()
