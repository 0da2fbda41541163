"""Learning-rate schedules: torchvision's linear warmup, then a step, cosine or constant rate.

The package root imports this small module (not the training loop, which needs pycocotools) so
that ``keras.models.load_model`` finds :class:`LinearWarmup` in models saved with their optimizer.

>>> from keras_maskrcnn.schedules import learning_rate_schedule
>>> rate = learning_rate_schedule(0.02, "step", total_steps=9000, warmup_steps=1000)
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import keras
import tensorflow as tf

SCHEDULES = ("step", "cosine", "constant")


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Multiplies a schedule by a factor rising linearly from ``warmup_factor`` to 1 over
    ``warmup_steps`` steps (torchvision's / detectron2's linear warmup).

    Args:
        schedule: the learning rate after warmup: a ``LearningRateSchedule`` or a float.
        warmup_steps: steps of warmup; 0 disables it.
        warmup_factor: the multiplier at step 0.
    """

    def __init__(self, schedule, warmup_steps: int, warmup_factor: float = 0.001):
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if isinstance(self.schedule, keras.optimizers.schedules.LearningRateSchedule):
            base = tf.cast(self.schedule(step), tf.float32)
        else:
            base = tf.constant(float(self.schedule), tf.float32)
        if self.warmup_steps <= 0:
            return base
        alpha = tf.minimum(step / float(self.warmup_steps), 1.0)
        return base * (self.warmup_factor * (1.0 - alpha) + alpha)

    def get_config(self):
        schedule = self.schedule
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            schedule = keras.saving.serialize_keras_object(schedule)
        return {"schedule": schedule, "warmup_steps": self.warmup_steps, "warmup_factor": self.warmup_factor}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["schedule"], dict):
            config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)


def learning_rate_schedule(
    learning_rate: float,
    schedule: str = "step",
    total_steps: Optional[int] = None,
    decay_steps: Optional[Sequence[int]] = None,
    decay_factor: float = 0.1,
    warmup_steps: int = 0,
    warmup_factor: float = 0.001,
) -> Union[float, keras.optimizers.schedules.LearningRateSchedule]:
    """The learning rate of :func:`keras_maskrcnn.optimizers.build_optimizer`: a linear warmup,
    then a step, cosine or constant schedule (a plain float when it is constant throughout).

    Args:
        learning_rate: base learning rate (after warmup).
        schedule: ``"step"`` (multiply by ``decay_factor`` at each of ``decay_steps``; by default
            at 2/3 and 8/9 of ``total_steps``, as detectron2's 1x schedule), ``"cosine"``
            (cosine decay to 0 at ``total_steps``) or ``"constant"``.
        total_steps: length of training in steps; needed by ``"cosine"`` and by ``"step"`` without
            ``decay_steps``.
        decay_steps: the steps from which ``"step"`` decays (absolute step numbers; the
            optimizer's step counter starts at 0, so ``E * steps_per_epoch`` decays after epoch ``E``).
        decay_factor: the ``"step"`` decay multiplier.
        warmup_steps: steps of linear warmup from ``warmup_factor * learning_rate``; 0: none.
        warmup_factor: the learning rate multiplier at step 0.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    lr: Any = float(learning_rate)
    if schedule == "step":
        if decay_steps is None:
            if total_steps is None:
                raise ValueError("The 'step' schedule needs decay_steps or total_steps.")
            decay_steps = [int(total_steps * 2 / 3), int(total_steps * 8 / 9)]
        # PiecewiseConstantDecay switches after a boundary: `s - 1` makes step `s` the first decayed.
        # Decays that fall on one step (a short run of a recipe) multiply there.
        steps = [int(s) for s in decay_steps if int(s) > 0]
        boundaries = sorted({s - 1 for s in steps})
        if boundaries:
            exponents = [0] + [sum(1 for s in steps if s - 1 <= b) for b in boundaries]
            values = [float(learning_rate) * decay_factor**e for e in exponents]
            lr = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    elif schedule == "cosine":
        if not total_steps or total_steps < 1:
            raise ValueError("The 'cosine' schedule needs total_steps >= 1.")
        lr = keras.optimizers.schedules.CosineDecay(float(learning_rate), decay_steps=int(total_steps), alpha=0.0)
    if warmup_steps > 0:
        lr = LinearWarmup(lr, warmup_steps, warmup_factor)
    return lr


__all__ = ["LinearWarmup", "SCHEDULES", "learning_rate_schedule"]
