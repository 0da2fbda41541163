"""FusedAdamW against Keras' AdamW: one training step of the small synthetic-set model, and the
optimizer update alone.

    python benchmarks/optimizer_step.py [--rounds 4] [--steps 5]

Both optimizers get the same model (small config, 256x256, batch 4, 64 sampled RoIs,
mixed_bfloat16) and the same batch; rounds alternate between them (the shared machine's speed
drifts) and the medians of the per-round mean step times are printed. The update alone is timed
on 10.5M float32 parameters with weight decay and gradient clipping, as in training.
"""
import argparse
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from keras_maskrcnn import MaskRCNN
from keras_maskrcnn.data import synthetic_dataset
from keras_maskrcnn.optimizers import FusedAdamW
from keras_maskrcnn.presets import small_model_config

OPTIMIZERS = {"keras AdamW": keras.optimizers.AdamW, "FusedAdamW": FusedAdamW}


def _alternate(calls, rounds: int, repeats: int):
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            times[name].append((time.perf_counter() - start) / repeats)
    return times


def training_steps(rounds: int, steps: int, precision: str = "auto"):
    from keras_maskrcnn.precision import set_global_policy

    set_global_policy(precision)
    config = dict(small_model_config(256), box_batch_size_per_image=64, rpn_post_nms_top_n_train=500)
    inputs, targets = next(iter(synthetic_dataset(4, 4, seed=1, max_instances=16)))
    calls = {}
    for name, cls in OPTIMIZERS.items():
        keras.utils.set_random_seed(0)
        model = MaskRCNN(num_classes=3, **config)
        model.compile(optimizer=cls(2e-3, weight_decay=1e-4, clipnorm=10.0))
        for _ in range(3):  # trace and warm up
            model.train_on_batch(inputs, targets)
        calls[name] = lambda model=model: model.train_on_batch(inputs, targets)
    keras.mixed_precision.set_global_policy("float32")
    return _alternate(calls, rounds, steps)


def _compiled_update(optimizer, variables, gradients):
    @tf.function
    def update():
        optimizer.apply(gradients, variables)

    return update


def optimizer_updates(rounds: int, steps: int):
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 128, 128)] * 60 + [(6272, 256), (256, 256)]
    gradients = [tf.constant(rng.normal(size=s).astype("float32")) for s in shapes]
    calls = {}
    for name, cls in OPTIMIZERS.items():
        variables = [keras.Variable(rng.normal(size=s).astype("float32")) for s in shapes]
        optimizer = cls(2e-3, weight_decay=1e-4, clipnorm=10.0)
        optimizer.build(variables)
        update = _compiled_update(optimizer, variables, gradients)
        update()
        calls[name] = lambda update=update, variables=variables: (update(), variables[0].numpy())
    return _alternate(calls, rounds, steps), sum(int(np.prod(s)) for s in shapes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="calls per round")
    parser.add_argument("--precision", default="auto", help="dtype policy of the training steps (auto: chosen for this machine)")
    args = parser.parse_args()
    from keras_maskrcnn.precision import machine_summary

    print(f"Machine: {machine_summary()}")
    updates, params = optimizer_updates(args.rounds, 2 * args.steps)
    steps = training_steps(args.rounds, args.steps, args.precision)
    print(f"| measurement | {' | '.join(OPTIMIZERS)} |\n|---|---|---|")
    for label, times in ((f"update of {params / 1e6:.1f}M parameters", updates),
                         ("training step (small config, batch 4)", steps)):
        cells = " | ".join(f"{1000 * statistics.median(times[name]):.0f} ms" for name in OPTIMIZERS)
        print(f"| {label} | {cells} |")


if __name__ == "__main__":
    main()
