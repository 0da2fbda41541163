"""Keras callbacks for training Mask R-CNN."""
from __future__ import annotations

import math
import time

import keras


class TimeLimit(keras.callbacks.Callback):
    """Stops training after ``seconds`` of wall-clock time (checked after every batch).

    Useful for demos and benchmarks that must finish in a fixed budget on any machine.
    """

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = float(seconds)
        self.start = None

    def on_train_begin(self, logs=None):
        self.start = time.time()

    def on_train_batch_end(self, batch, logs=None):
        if time.time() - self.start > self.seconds:
            self.model.stop_training = True


class CosineDecayOverTime(keras.callbacks.Callback):
    """Learning rate: linear warmup over ``warmup_steps`` steps, then a cosine decay to
    ``final_fraction * peak`` over a wall-clock budget of ``seconds``.

    For training in a fixed time (with :class:`TimeLimit`): the schedule reaches its end when the
    time does, however many steps the machine manages. The optimizer needs a float learning rate
    (not a schedule); the rate is set before every batch and logged as ``learning_rate``.

    Example:

    ```python
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    budget = 14 * 60
    model.fit(data, epochs=10_000, steps_per_epoch=50,
              callbacks=[CosineDecayOverTime(1e-3, budget), TimeLimit(budget)])
    ```
    """

    def __init__(self, peak: float, seconds: float, warmup_steps: int = 100, final_fraction: float = 0.05, clock=time.time):
        super().__init__()
        if peak <= 0 or seconds <= 0:
            raise ValueError(f"peak and seconds must be > 0, got {peak} and {seconds}.")
        self.peak = float(peak)
        self.seconds = float(seconds)
        self.warmup_steps = int(warmup_steps)
        self.final_fraction = float(final_fraction)
        self.clock = clock
        self.start = None
        self.step = 0

    def rate(self, step: int, elapsed: float) -> float:
        """The learning rate at ``step`` after ``elapsed`` seconds."""
        progress = min(max(elapsed / self.seconds, 0.0), 1.0)
        cosine = self.final_fraction + (1.0 - self.final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return self.peak * cosine * warmup

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = self.clock()

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate = self.rate(self.step, self.clock() - self.start)
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
