"""Training-step time of the small configurations (the demo's and the CLI's from-scratch plan).

    python benchmarks/train_step.py [--runs 6] [--markdown BENCHMARKS.md]

Each variant runs in a fresh process (TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, at import),
and the variants alternate over ``--rounds`` rounds, so load on the shared machine affects all
alike. A variant trains ``--runs`` steps in one ``model.fit`` after a first one (tracing), timed by a
callback around each step (so the input pipeline, which prefetches, is not timed); reported are the median
wall time per step and the process CPU time per step (user + system, all threads: less
sensitive to other processes on the machine than wall time). The machine (CPU model and
extensions) is printed and written with the table.

Variants: the small preset as it is (``presets.small_model_config``: 64-channel FPN, a two-conv
64-channel mask head, 64 RoIs per image) and with the previous, wider heads (128-channel FPN and
mask head of four convolutions, 128 RoIs per image), each with TensorFlow's oneDNN CPU kernels on
and off (TensorFlow turns them on by default only on CPUs with AVX-512 VNNI / BF16 or AMX).
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
WIDE_HEADS = dict(fpn_channels=128, mask_head_channels=128, mask_head_convs=4, box_batch_size_per_image=128)
VARIANTS = {
    "small preset, oneDNN on": ({}, "1"),
    "small preset, oneDNN off": ({}, "0"),
    "previous wide heads, oneDNN on": (WIDE_HEADS, "1"),
    "previous wide heads, oneDNN off": (WIDE_HEADS, "0"),
}
MARK = "<!-- train_step: {kind} -->"


def worker(overrides: dict, image_size: int, batch: int, runs: int, precision: str) -> dict:
    import keras

    from keras_maskrcnn import MaskRCNN
    from keras_maskrcnn.data import synthetic_dataset
    from keras_maskrcnn.optimizers import FusedAdamW
    from keras_maskrcnn.precision import set_global_policy
    from keras_maskrcnn.presets import small_model_config

    policy = set_global_policy(precision)
    keras.utils.set_random_seed(0)
    data = synthetic_dataset(512, batch, image_size=(image_size, image_size), seed=1, max_instances=16, repeat=True)
    model = MaskRCNN(num_classes=3, **dict(small_model_config(image_size), **overrides))
    model.compile(optimizer=FusedAdamW(1e-3, weight_decay=1e-4, clipnorm=10.0))
    start = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    first = time.perf_counter() - start
    walls, cpus = [], []

    class StepTimes(keras.callbacks.Callback):
        """Each step's wall and process CPU time inside one fit (a fit per step would time the
        input pipeline's start with it)."""

        def on_train_batch_begin(self, batch, logs=None):
            self.wall, self.cpu = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, batch, logs=None):
            walls.append(time.perf_counter() - self.wall)
            cpus.append(time.process_time() - self.cpu)

    model.fit(data, epochs=1, steps_per_epoch=runs, verbose=0, callbacks=[StepTimes()])
    return {"policy": policy, "first_s": first, "wall_s": walls, "cpu_s": cpus}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=4, help="timed steps per process after the first")
    parser.add_argument("--rounds", type=int, default=1, help="processes per variant, alternating")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--markdown", help="write the table into this file (one section per CPU kind)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        overrides = json.loads(args.worker)
        print(json.dumps(worker(overrides, args.image_size, args.batch, args.runs, args.precision)))
        return

    sys.path.insert(0, ROOT)
    from keras_maskrcnn.precision import detect_hardware, machine_summary

    hardware = detect_hardware()
    print(f"Machine: {machine_summary(hardware)}", flush=True)
    results = {name: {"wall_s": [], "cpu_s": [], "first_s": []} for name in VARIANTS}
    loads = [load_average()]
    for _ in range(args.rounds):
        for name, (overrides, onednn) in VARIANTS.items():
            env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
            command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(overrides),
                       "--image-size", str(args.image_size), "--batch", str(args.batch), "--runs", str(args.runs),
                       "--precision", args.precision]
            out = run_json_worker(command, env, ROOT, name)
            for key in ("wall_s", "cpu_s"):
                results[name][key] += out[key]
            results[name]["first_s"].append(out["first_s"])
            results[name]["policy"] = out["policy"]
            print(f"{name}: wall {statistics.median(out['wall_s']):.2f} s, cpu {statistics.median(out['cpu_s']):.2f} s "
                  f"per step, first {out['first_s']:.0f} s", flush=True)
    loads.append(load_average())
    base = statistics.median(results["small preset, oneDNN on"]["wall_s"])
    rows = ["| variant | precision | wall s per step (median) | CPU s per step (median) | first step s | wall vs small preset, oneDNN on |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        wall, cpu = statistics.median(r["wall_s"]), statistics.median(r["cpu_s"])
        rows.append(f"| {name} | {r['policy']} | {wall:.2f} | {cpu:.2f} | "
                    f"{'-'.join(f'{x:.0f}' for x in (min(r['first_s']), max(r['first_s'])))} | {wall / base:.2f}x |")
    table = "\n".join(rows)
    print(table)
    if args.markdown:
        kind = machine_kind(hardware)
        command = command_line("train_step.py", sys.argv[1:], args.markdown)
        section = (
            f"{MARK.format(kind=kind + ' begin')}\n## Training step of the small configuration ({hardware.cpu_model})\n\n"
            f"Machine: {machine_summary(hardware)}.\nCommand: `{command}` ({datetime.date.today().isoformat()}, "
            f"{args.image_size}x{args.image_size}, batch {args.batch}, {args.runs} steps x {args.rounds} process(es) "
            f"per variant; load average {loads[0]} before, {loads[1]} after).\n\n{table}\n"
            f"{MARK.format(kind=kind + ' end')}"
        )
        replace_section(args.markdown, MARK.format(kind=kind + " begin"), MARK.format(kind=kind + " end"), section)


if __name__ == "__main__":
    main()
