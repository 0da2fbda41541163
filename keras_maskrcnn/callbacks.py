"""Keras callbacks for training Mask R-CNN.

* Time budgets: :class:`TimeLimit`, :class:`CosineDecayOverTime`, :class:`EpochTimeEstimate`.
* Used by :func:`keras_maskrcnn.train.train`: :class:`StopOnNonFiniteLoss` and the
  non-finite-aware wrappers (:class:`FiniteModelCheckpoint`, :class:`UnlessStopped`),
  :class:`PruneCheckpoints`, and the TensorBoard logs (:func:`tensorboard_callback`). The backup
  callback, :class:`~keras_maskrcnn.checkpoints.TrainingBackup`, lives beside its reader in
  :mod:`keras_maskrcnn.checkpoints`.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from typing import Any, Dict, Optional

import keras
import tensorflow as tf

from keras_maskrcnn.checkpoints import finite_loss, prune_checkpoints, step_count


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


class EpochTimeEstimate(keras.callbacks.Callback):
    """Prints, once, the time of the first step (tracing) and the estimated time per epoch and
    for the whole run, measured over the ``measure_steps`` steps after the first."""

    def __init__(self, steps_per_epoch: int, epochs: int, measure_steps: int = 5, clock=time.time, print_fn=print):
        super().__init__()
        self.steps_per_epoch, self.epochs, self.measure_steps = steps_per_epoch, epochs, max(1, measure_steps)
        self.clock, self.print_fn = clock, print_fn
        self.times = []  # start of training, then the end of each step until the estimate
        self.done = False

    def on_train_begin(self, logs=None):
        if not self.done:
            self.times = [self.clock()]

    def on_train_batch_end(self, batch, logs=None):
        if self.done:
            return
        self.times.append(self.clock())
        if len(self.times) == self.measure_steps + 2:
            self.done = True
            first = self.times[1] - self.times[0]
            per_step = (self.times[-1] - self.times[1]) / self.measure_steps
            epoch = per_step * self.steps_per_epoch
            self.print_fn(
                f"\nSpeed: first step {first:.0f} s (tracing), then {per_step:.2f} s per step: about "
                f"{epoch / 60:.1f} min per epoch, {epoch * self.epochs / 60:.0f} min for {self.epochs} epochs "
                "(evaluation not counted)"
            )


# --------------------------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------------------------


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite, and records where.

    Keras' running loss (``logs["loss"]``, the epoch's mean so far) is checked after every
    batch; a non-finite value sets ``model.stop_training`` and ``stopped_at`` to
    ``{"epoch": E, "batch": B, "step": S, "loss": value}`` (``E`` and ``B`` 1-based, ``S`` the
    optimizer's step count after that batch).
    :class:`~keras_maskrcnn.checkpoints.TrainingBackup` and the checkpoints skip saving
    non-finite states, so the newest backup and checkpoint are the last good ones.
    """

    def __init__(self):
        super().__init__()
        self.stopped_at: Optional[Dict[str, Any]] = None
        self.batch_offset = 0
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.stopped_at is None and not finite_loss(logs):
            step = step_count(self.model)
            self.stopped_at = {
                "epoch": self._epoch + 1,
                "batch": self.batch_offset + batch + 1,
                "step": step,
                "loss": float(logs["loss"]),
            }
            print(
                f"\nThe loss became {float(logs['loss'])} at epoch {self._epoch + 1}, batch "
                f"{self.batch_offset + batch + 1} (training step {step}): stopping training."
            )
            self.model.stop_training = True


class FiniteModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that does not save epochs whose loss is not finite."""

    def on_epoch_end(self, epoch, logs=None):
        if finite_loss(logs):
            super().on_epoch_end(epoch, logs)


class UnlessStopped(keras.callbacks.Callback):
    """Runs ``inner.on_epoch_end`` only while ``guard`` has not stopped training (no COCO
    evaluation of NaN weights)."""

    def __init__(self, inner: keras.callbacks.Callback, guard: StopOnNonFiniteLoss):
        super().__init__()
        self.inner = inner
        self.guard = guard

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params(params)

    def on_train_begin(self, logs=None):
        self.inner.on_train_begin(logs)

    def on_train_end(self, logs=None):
        self.inner.on_train_end(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.inner.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.stopped_at is None:
            self.inner.on_epoch_end(epoch, logs)


# --------------------------------------------------------------------------------------------
# Checkpoints and logs
# --------------------------------------------------------------------------------------------


class PruneCheckpoints(keras.callbacks.Callback):
    """Deletes all but the newest ``keep`` ``epoch-NNN.keras`` files after each epoch
    (:func:`keras_maskrcnn.checkpoints.prune_checkpoints`)."""

    def __init__(self, directory: str, keep: int):
        super().__init__()
        self.directory = directory
        self.keep = keep

    def on_epoch_end(self, epoch, logs=None):
        prune_checkpoints(self.directory, self.keep)


class ScalarSummaries(keras.callbacks.Callback):
    """Epoch logs as TensorBoard scalars (``epoch_<name>`` under ``log_dir/train``), written with
    ``tf.summary.write``, which works without the ``tensorboard`` package installed."""

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        # Imported here: evaluation imports pycocotools, which the time-budget callbacks do not need.
        from keras_maskrcnn.evaluation import _write_scalar

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        with self._writer.as_default():
            for name, value in (logs or {}).items():
                if name.startswith("val_"):
                    continue  # CocoEvaluationCallback writes its own under coco_eval/
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    continue
                _write_scalar(f"epoch_{name}", value, step=epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def tensorboard_callback(log_dir: str) -> keras.callbacks.Callback:
    """Keras' ``TensorBoard`` callback when the ``tensorboard`` package is installed (it needs it
    for ``tf.summary.scalar``), else :class:`ScalarSummaries`."""
    if importlib.util.find_spec("tensorboard") is not None:
        return keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False)
    return ScalarSummaries(log_dir)
