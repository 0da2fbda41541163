"""torchvision's v2 Mask R-CNN layout against v1: inference and training-step time at 1024 x 1024.

    python benchmarks/v1_vs_v2.py [--runs 5] [--train-runs 2] [--markdown BENCHMARKS.md]

Both models are ResNet-50 FPN with COCO's 91 class slots and random weights (speed does not
depend on the values): v1 is ``presets.torchvision_maskrcnn_resnet50_fpn_config()`` (frozen batch
norm, conv biases, a two-FC box head, a one-conv RPN head), v2
``presets.torchvision_maskrcnn_resnet50_fpn_v2_config()`` (batch norm in the FPN and the heads, a
two-conv RPN head, a four-conv + one-FC box head). Images are 1024 x 1024 (``min_size`` =
``max_size`` = 1024, so nothing is resized). Each precision runs in a fresh process (the dtype
policy is global); inside it the two models are timed round-robin, so load on the shared machine
affects both alike, and reported are medians:

* inference: ``model.predict_on_batch`` on one uint8 image (boxes, classes, scores and the
  box-relative masks of up to 100 detections), ``--runs`` calls after one warm-up call;
* training: one ``model.train_on_batch`` step of ``--train-batch`` synthetic 1024 x 1024 images (SGD,
  torchvision's trainable stages of each layout; the batches are made beforehand, the same for
  both models), ``--train-runs`` steps after the first (tracing).

The machine (CPU model, extensions, whether bfloat16 is native) is printed and written with the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

from markdown_sections import command_line, load_average, machine_kind, replace_section, run_json_worker

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIZE = 1024
MARK = "<!-- v1_vs_v2: {kind} -->"


def _models(num_classes: int = 91):
    from keras_maskrcnn import MaskRCNN, presets

    size = dict(min_size=SIZE, max_size=SIZE)
    return {
        "v1": MaskRCNN(num_classes=num_classes, **presets.torchvision_maskrcnn_resnet50_fpn_config(**size)),
        "v2": MaskRCNN(num_classes=num_classes, **presets.torchvision_maskrcnn_resnet50_fpn_v2_config(**size)),
    }


def _round_robin(fns: dict, runs: int) -> dict:
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def worker(precision: str, runs: int, train_runs: int, train_batch: int) -> dict:
    import keras
    import numpy as np

    from keras_maskrcnn.data import synthetic_dataset
    from keras_maskrcnn.precision import set_global_policy

    policy = set_global_policy(precision)
    keras.utils.set_random_seed(0)
    models = _models()
    image = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3)).astype(np.uint8)
    out = {"policy": policy, "params": {}, "first_infer_s": {}, "first_train_s": {}}
    for name, model in models.items():
        model.build()
        out["params"][name] = int(sum(np.prod(w.shape) for w in model.weights))
        start = time.perf_counter()
        model.predict_on_batch(image)
        out["first_infer_s"][name] = time.perf_counter() - start
    out["infer_s"] = _round_robin({n: (lambda m=m: m.predict_on_batch(image)) for n, m in models.items()}, runs)
    if train_runs:
        # Batches made beforehand: timing model.fit calls would include the pipeline's start.
        data = synthetic_dataset(train_runs + 1, train_batch, image_size=(SIZE, SIZE), seed=1, max_instances=32,
                                 drop_remainder=True)
        batches = list(data)
        for name, model in models.items():
            model.compile(optimizer=keras.optimizers.SGD(0.001, momentum=0.9))
            start = time.perf_counter()
            model.train_on_batch(*batches[0])
            out["first_train_s"][name] = time.perf_counter() - start
        out["train_s"] = {name: [] for name in models}
        for inputs, targets in batches[1:]:  # every model trains on the same batches, round-robin
            for name, model in models.items():
                start = time.perf_counter()
                model.train_on_batch(inputs, targets)
                out["train_s"][name].append(time.perf_counter() - start)
    return out


def _run_worker(precision: str, args) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    command = [sys.executable, os.path.abspath(__file__), "--worker", precision, "--runs", str(args.runs),
               "--train-runs", str(args.train_runs), "--train-batch", str(args.train_batch)]
    return run_json_worker(command, env, ROOT, precision)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--runs", type=int, default=5, help="timed inference calls per model (median)")
    parser.add_argument("--train-runs", type=int, default=2, help="timed training steps per model (0: none)")
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--markdown", help="write the table into this file (one section per CPU kind)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.runs, args.train_runs, args.train_batch)))
        return

    sys.path.insert(0, ROOT)
    from keras_maskrcnn.precision import detect_hardware, machine_summary, native_bfloat16

    hardware = detect_hardware()
    print(f"Machine: {machine_summary(hardware)}", flush=True)
    loads = [load_average()]
    rows = ["| precision | model | parameters | inference s (median) | v2 / v1 | training step s (median) | v2 / v1 | first inference / training call s |",
            "|---|---|---|---|---|---|---|---|"]
    raw = []
    for precision in args.precisions:
        out = _run_worker(precision, args)
        infer = {n: statistics.median(t) for n, t in out["infer_s"].items()}
        train = {n: statistics.median(t) for n, t in out.get("train_s", {}).items()}
        for name in ("v1", "v2"):
            ratio = lambda d: f"{d[name] / d['v1']:.2f}x" if d else "-"  # noqa: E731
            first = f"{out['first_infer_s'][name]:.0f}" + (f" / {out['first_train_s'][name]:.0f}" if train else "")
            rows.append(f"| {out['policy']} | {name} | {out['params'][name] / 1e6:.1f} M | {infer[name]:.2f} | "
                        f"{ratio(infer)} | {f'{train[name]:.2f}' if train else '-'} | {ratio(train)} | {first} |")
            raw.append(f"{out['policy']} {name}: inference {[round(t, 3) for t in out['infer_s'][name]]}"
                       + (f", training {[round(t, 2) for t in out['train_s'][name]]}" if train else ""))
        print("\n".join(rows[-2:]), flush=True)
    loads.append(load_average())
    table = "\n".join(rows)
    print(table)
    if args.markdown:
        kind = machine_kind(hardware)
        command = command_line("v1_vs_v2.py", sys.argv[1:], args.markdown)
        bf16 = "" if native_bfloat16(hardware) else " bfloat16 is emulated on this CPU (no AMX/AVX512_BF16)."
        section = (
            f"{MARK.format(kind=kind + ' begin')}\n## torchvision's v2 layout against v1 at 1024 x 1024 ({hardware.cpu_model})\n\n"
            f"Machine: {machine_summary(hardware)}.{bf16}\nCommand: `{command} --markdown BENCHMARKS.md` "
            f"({datetime.date.today().isoformat()}; ResNet-50 FPN, 91 classes, random weights, one 1024 x 1024 image "
            f"per inference call, {args.train_batch} per training step; {args.runs} inference calls and "
            f"{args.train_runs} training steps per model after the first, the two models round-robin; load average "
            f"{loads[0]} before, {loads[1]} after).\n\n{table}\n\nEvery timed call:\n\n"
            + "\n".join(f"- {r}" for r in raw) + f"\n{MARK.format(kind=kind + ' end')}"
        )
        replace_section(args.markdown, MARK.format(kind=kind + " begin"), MARK.format(kind=kind + " end"), section)


if __name__ == "__main__":
    main()
