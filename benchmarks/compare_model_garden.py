"""keras_maskrcnn against TensorFlow Model Garden's Mask R-CNN, side by side in one run.

    bash ../shared/tools/setup_model_garden_peer.sh /tmp/tfm-venv     # once: the peer's own venv
    python benchmarks/compare_model_garden.py --runs 5 --markdown BENCHMARKS.md

Both systems run the torchvision / COCO Mask R-CNN R50-FPN configuration with random weights
(91 logits incl. background), on the same random input, one configuration per fresh process, so
that the first call (tracing and compiling) and the peak memory (``ru_maxrss``) belong to that
configuration. Configurations: inference at 1024x1024, batch 1 and 4, float32 and
mixed_bfloat16; one training step (forward, five losses, gradients, SGD update) at 512x512,
batch 2, in both precisions. Each time is the median of ``--runs`` calls after the first, every
call timed until its outputs are in numpy. The two systems alternate configuration by
configuration, so load on the machine affects both alike; compare the ratios.

Inference is compared on the same output: boxes, scores, classes and 28x28 box-relative mask
probabilities of 100 detections per image (Model Garden's output; ours with
``mask_output="box"``). Our default output goes further, binary masks pasted into the image
(``[B, 100, H, W]`` uint8, what torchvision returns); that is timed too, in its own process, and
shown in its own column.

``--worker ours ...`` runs one of our configurations and prints its JSON (used internally);
Model Garden's worker is ``benchmarks/peer_model_garden.py``, run with the peer's Python.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from markdown_sections import command_line, load_average, machine_kind, replace_section

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_PEER_PYTHON = "/tmp/tfm-venv/bin/python"

CONFIGS = [
    ("infer", 1024, 1024, 1, "float32"),
    ("infer", 1024, 1024, 1, "mixed_bfloat16"),
    ("infer", 1024, 1024, 4, "float32"),
    ("infer", 1024, 1024, 4, "mixed_bfloat16"),
    ("train", 512, 512, 2, "float32"),
    ("train", 512, 512, 2, "mixed_bfloat16"),
]
# One section per kind of CPU (native or emulated bfloat16), so a run on one kind keeps the other's.
MARK_BEGIN = "<!-- compare_model_garden: begin {kind} -->"
MARK_END = "<!-- compare_model_garden: end {kind} -->"


# ------------------------------------------------------------------------------ our worker
def _timed_calls(fn, runs: int):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def run_ours(
    mode: str, height: int, width: int, batch: int, precision: str, runs: int, masks: str, inter_op_threads: int = 0
) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)

    from keras_maskrcnn import MaskRCNN
    from keras_maskrcnn.data import synthetic_dataset

    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    model = MaskRCNN(num_classes=90)
    if mode == "infer":
        images = tf.constant(np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), np.uint8))
        infer = tf.function(lambda x: model(x, mask_output=masks))

        def call():
            return tf.nest.map_structure(lambda t: t.numpy(), infer(images))

        notes = f"masks: {masks} ({'pasted into the image, uint8' if masks == 'binary' else '28x28 box-relative'})"
    else:
        data = synthetic_dataset(batch, batch, image_size=(height, width), num_classes=5, seed=0)
        inputs, targets = next(iter(data))
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))

        def call():
            return model.train_on_batch(inputs, targets)

        notes = f"{int(tf.reduce_sum(tf.cast(targets['classes'] > 0, tf.int32)))} ground-truth instances in the batch"
    first, times = _timed_calls(call, runs)
    return {
        "system": "keras_maskrcnn",
        "mode": mode,
        "height": height,
        "width": width,
        "batch": batch,
        "precision": precision,
        "first_call_s": first,
        "times_s": times,
        "median_s": statistics.median(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "tf_version": tf.__version__,
        "notes": notes,
    }


# ------------------------------------------------------------------------------ orchestration
def _run_worker(command, timeout: float) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def _fmt(value, spec=".2f", suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _table(rows, bf16_emulated: bool = False) -> str:
    lines = [
        "| run | precision | ours median s | Model Garden median s | speed-up | ours, masks pasted, median s "
        "| ours first call s | Model Garden first call s | ours peak MiB | Model Garden peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, ours, peer, pasted in rows:
        mode, h, w, b, precision = config
        name = f"{'inference' if mode == 'infer' else 'train step'} {h}x{w}, batch {b}"
        o, p = ours.get("median_s"), peer.get("median_s")
        ratio = p / o if o and p else None
        if precision == "mixed_bfloat16" and bf16_emulated:
            precision += " (emulated)"
        lines.append(
            f"| {name} | {precision} | {_fmt(o) if o else ours.get('error', '-')} "
            f"| {_fmt(p) if p else peer.get('error', '-')} | {_fmt(ratio, '.2f', 'x')} "
            f"| {_fmt(pasted.get('median_s')) if pasted else '-'} "
            f"| {_fmt(ours.get('first_call_s'), '.1f')} | {_fmt(peer.get('first_call_s'), '.1f')} "
            f"| {_fmt(ours.get('peak_rss_mib'), '.0f')} | {_fmt(peer.get('peak_rss_mib'), '.0f')} |"
        )
    return "\n".join(lines)


def _write_markdown(path: str, command: str, table: str, rows, loads) -> None:
    from keras_maskrcnn.precision import detect_hardware, machine_summary

    hardware = detect_hardware()
    kind = machine_kind(hardware)
    begin, end = MARK_BEGIN.format(kind=kind), MARK_END.format(kind=kind)
    ours_tf = next((r[1].get("tf_version") for r in rows if "tf_version" in r[1]), "?")
    peer_tf = next((r[2].get("tf_version") for r in rows if "tf_version" in r[2]), "?")
    details = "\n".join(
        f"- {c[0]} {c[1]}x{c[2]} b{c[3]} {c[4]}: ours {[round(t, 3) for t in o.get('times_s', [])]}, "
        f"Model Garden {[round(t, 3) for t in p.get('times_s', [])]}"
        + (f", ours with masks pasted {[round(t, 3) for t in q.get('times_s', [])]}" if q else "")
        for c, o, p, q in rows
    )
    section = f"""{begin}
## keras_maskrcnn vs TF Model Garden, same machine, same run ({hardware.cpu_model}, bfloat16 {kind.split("-")[0]})

Machine: {machine_summary(hardware)}.
Command: `{command}` ({datetime.date.today().isoformat()}; keras_maskrcnn on TensorFlow {ours_tf},
Model Garden 2.20 on TensorFlow {peer_tf}, {platform.machine()};
load average {loads[0]} before, {loads[1]} after). Medians of the timed calls after the first;
speed-up = Model Garden time / ours. Inference is compared on the same output (boxes, scores,
classes, 28x28 box-relative mask probabilities of 100 detections); "masks pasted" is our default
output, binary masks pasted into the image (`[B, 100, H, W]` uint8), which Model Garden does not
compute. Peak memory is that of the equal-output process.

{table}

Every timed call:
{details}
{end}"""
    replace_section(path, begin, end, section)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed calls after the first (median reported)")
    parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="Python of the Model Garden venv")
    parser.add_argument("--only", choices=["infer", "train"], help="run only these configurations")
    parser.add_argument("--precisions", nargs="+", choices=["float32", "mixed_bfloat16"],
                        default=["float32", "mixed_bfloat16"],
                        help="precisions to run (on CPUs without native bfloat16, float32 is the one that matters)")
    parser.add_argument("--skip-peer", action="store_true", help="time keras_maskrcnn only")
    parser.add_argument("--inter-op-threads", type=int, default=0,
                        help="TensorFlow's inter-op thread pool size for both systems (0 = TensorFlow's "
                             "default, one per core)")
    parser.add_argument("--markdown", help="write the table into this file (replacing an earlier one)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration and system")
    parser.add_argument("--worker", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["infer", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--height", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--masks", default="binary", choices=["binary", "box"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = run_ours(args.mode, args.height, args.width, args.batch, args.precision, args.runs, args.masks,
                          args.inter_op_threads)
        print(json.dumps(result))
        return

    if not args.skip_peer and not os.path.exists(args.peer_python):
        sys.exit(f"Model Garden's Python {args.peer_python} not found: run ../shared/tools/setup_model_garden_peer.sh")
    from keras_maskrcnn.precision import detect_hardware, machine_summary, native_bfloat16

    print(f"Machine: {machine_summary()}", flush=True)
    emulated = not native_bfloat16(detect_hardware())
    loads = [load_average()]
    rows = []
    for config in CONFIGS:
        mode, h, w, b, precision = config
        if (args.only and mode != args.only) or precision not in args.precisions:
            continue
        common = ["--mode", mode, "--height", str(h), "--width", str(w), "--batch", str(b),
                  "--precision", precision, "--runs", str(args.runs), "--inter-op-threads", str(args.inter_op_threads)]
        worker = [sys.executable, os.path.abspath(__file__), "--worker", "ours"] + common
        ours = _run_worker(worker + ["--masks", "box"], args.timeout)
        peer = {} if args.skip_peer else _run_worker(
            [args.peer_python, os.path.join(HERE, "peer_model_garden.py")] + common, args.timeout
        )
        pasted = _run_worker(worker + ["--masks", "binary"], args.timeout) if mode == "infer" else {}
        rows.append((config, ours, peer, pasted))
        print(_table([rows[-1]], emulated).splitlines()[-1], flush=True)
    loads.append(load_average())
    table = _table(rows, emulated)
    print(table)
    if args.markdown:
        command = command_line("compare_model_garden.py", sys.argv[1:], args.markdown)
        _write_markdown(args.markdown, command + " --markdown BENCHMARKS.md", table, rows, loads)


if __name__ == "__main__":
    main()
