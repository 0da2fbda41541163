"""The training optimizers: AdamW with a fused kernel, PyTorch's SGD with coupled L2, the recipes' builder.

Keras' ``AdamW.update_step`` is written as about ten elementwise ops per variable (two moment
updates, square, square root, divide, three assignments), each a full pass over the variable
in memory: 10-15 % of a CPU training step of the small synthetic-set Mask R-CNN.
:class:`FusedAdamW` computes the same update with TensorFlow's ``ResourceApplyAdam`` (one pass:
``m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)``,
exactly Keras' formula) and keeps everything else of ``keras.optimizers.AdamW`` (decoupled weight
decay, clipping, EMA, loss scaling, serialisation). Where the fused kernel does not apply
(``amsgrad``, a variable that is not float32, or not a plain resource variable, e.g. under a
distribution strategy) it falls back to Keras' update.

**Weight decay, coupled or decoupled.** Keras' optimizers decay *decoupled* from the gradient
(``w -= lr * wd * w`` each step, beside the momentum). ``torch.optim.SGD(weight_decay=wd)``, which
torchvision's and detectron2's recipes use, adds an L2 gradient *before* the momentum
(``g += wd * w``), so at momentum 0.9 each decay term acts about ``1 / (1 - 0.9) = 10`` times
(summed over the steps it stays in the momentum buffer). :class:`CoupledL2SGD` is that optimizer
exactly; ``keras.optimizers.SGD(weight_decay=wd)`` is not, whatever ``wd``, as soon as the
learning rate changes.

:func:`build_optimizer` builds the optimizers of the training recipes: ``"sgd"`` (Keras' SGD with
momentum and decoupled decay), ``"sgd_l2"`` (:class:`CoupledL2SGD`, torchvision's) or
``"adamw"`` (:class:`FusedAdamW`), with gradient clipping and a learning-rate schedule from
:mod:`keras_maskrcnn.schedules`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import keras
import tensorflow as tf
from keras import ops
from tensorflow.python.ops import resource_variable_ops

from keras_maskrcnn.schedules import learning_rate_schedule

OPTIMIZERS = ("sgd", "sgd_l2", "adamw")
# The trainable variables of Keras' normalisation layers (BatchNormalization, LayerNormalization,
# GroupNormalization): what torchvision's ``norm_weight_decay`` applies to.
NORM_VARIABLE_NAMES = ("gamma", "beta")


def _resource(variable):
    """The one TensorFlow resource variable behind ``variable`` (a Keras variable or, as Keras'
    TensorFlow backend passes to ``update_step``, its ``tf.Variable``); None for others (e.g.
    distributed variables)."""
    for candidate in (variable, getattr(variable, "value", None)):
        if isinstance(candidate, resource_variable_ops.BaseResourceVariable) and not isinstance(
            candidate, tf.distribute.DistributedValues
        ):
            return candidate
    return None


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class FusedAdamW(keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` with the Adam step as one fused kernel per variable (same math).

    Arguments are those of ``keras.optimizers.AdamW``.

    Example:

    ```python
    model.compile(optimizer=FusedAdamW(learning_rate=1e-3, weight_decay=1e-4))
    ```
    """

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        momentum, velocity = self._momentums[index], self._velocities[index]
        resources = [_resource(v) for v in (variable, momentum, velocity)]
        if self.amsgrad or any(r is None for r in resources) or resources[0].dtype != tf.float32:
            return super().update_step(gradient, variable, learning_rate)
        dtype = tf.float32
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=resources[0].handle,
            m=resources[1].handle,
            v=resources[2].handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
            use_locking=False,
        )


@keras.saving.register_keras_serializable(package="keras_maskrcnn")
class CoupledL2SGD(keras.optimizers.Optimizer):
    """``torch.optim.SGD(params, lr, momentum, weight_decay=wd)``: SGD with momentum and *coupled*
    L2 weight decay, PyTorch's update exactly (``dampening=0``)::

        g = gradient + wd * w          # after gradient clipping, as PyTorch sees .grad
        buf = momentum * buf + g       # buf starts at 0, so the first step sets buf = g
        w -= lr * buf                  # nesterov: w -= lr * (g + momentum * buf)

    Unlike ``keras.optimizers.SGD`` (``v = momentum * v - lr * g; w += v``), the learning rate
    multiplies the whole buffer, so a learning-rate change (warmup, step decay) acts at once, as in
    PyTorch; and the decay term goes through the momentum (coupled), about ``1 / (1 - momentum)``
    times stronger than Keras' decoupled ``weight_decay``. Each float32 variable's step is one fused
    ``ResourceApplyMomentum`` kernel (whose definition is exactly the two lines above); other
    variables, e.g. under a distribution strategy, take the same update in plain ops.

    Args:
        learning_rate: float or ``LearningRateSchedule``.
        momentum: in ``[0, 1]``; 0 is plain SGD (no momentum buffer).
        weight_decay: the L2 coefficient ``wd`` (0 or ``None``: none). Variables passed to
            ``exclude_from_weight_decay`` before the first step get none.
        norm_weight_decay: ``wd`` for the trainable variables of normalisation layers (named
            ``gamma`` / ``beta``, :data:`NORM_VARIABLE_NAMES`), as torchvision's
            ``--norm-weight-decay`` (detectron2's ``weight_decay_norm``); ``None``: ``weight_decay``.
        nesterov: PyTorch's Nesterov form.
        **kwargs: the base optimizer's arguments (``global_clipnorm``, ``clipnorm``, ``use_ema``, ...).

    Example:

    ```python
    model.compile(optimizer=CoupledL2SGD(0.02, momentum=0.9, weight_decay=1e-4))
    ```
    """

    def __init__(self, learning_rate=0.01, momentum=0.9, weight_decay=None, norm_weight_decay=None,
                 nesterov=False, name="coupled_l2_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay or None, name=name, **kwargs)
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs a momentum > 0.")
        self.momentum = float(momentum)
        self.norm_weight_decay = None if norm_weight_decay is None else float(norm_weight_decay)
        self.nesterov = bool(nesterov)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum") if self.momentum else []
        # The L2 coefficient of each variable, by its index (fixed at build, as Keras' exclusions).
        self._decays = [self._decay_for(v) for v in variables]

    def _decay_for(self, variable) -> float:
        if not self.weight_decay or not self._use_weight_decay(variable):
            return 0.0
        if self.norm_weight_decay is not None and variable.name.split("/")[-1] in NORM_VARIABLE_NAMES:
            return self.norm_weight_decay
        return float(self.weight_decay)

    def _apply_weight_decay(self, variables):
        """Keras' decoupled decay: none here, the decay is in the gradient (``update_step``)."""

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        gradient = tf.cast(gradient, variable.dtype)
        if self._decays[index]:
            gradient = gradient + tf.constant(self._decays[index], variable.dtype) * tf.convert_to_tensor(variable)
        learning_rate = tf.cast(learning_rate, variable.dtype)
        if not self.momentum:
            return self.assign_sub(variable, learning_rate * gradient)
        buffer = self.momentums[index]
        resources = [_resource(v) for v in (variable, buffer)]
        momentum = tf.constant(self.momentum, variable.dtype)
        if all(r is not None for r in resources) and resources[0].dtype == tf.float32:
            tf.raw_ops.ResourceApplyMomentum(
                var=resources[0].handle, accum=resources[1].handle, lr=learning_rate, grad=gradient,
                momentum=momentum, use_locking=False, use_nesterov=self.nesterov,
            )
            return
        self.assign(buffer, ops.add(ops.multiply(buffer, momentum), gradient))
        step = ops.add(gradient, ops.multiply(buffer, momentum)) if self.nesterov else buffer
        self.assign_sub(variable, ops.multiply(step, learning_rate))

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "norm_weight_decay": self.norm_weight_decay,
                "nesterov": self.nesterov}


def build_optimizer(
    learning_rate: float = 0.02,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    warmup_steps: int = 1000,
    warmup_factor: float = 0.001,
    schedule: str = "step",
    total_steps: Optional[int] = None,
    decay_steps: Optional[Sequence[int]] = None,
    decay_factor: float = 0.1,
    clipnorm: Optional[float] = None,
    optimizer: str = "sgd",
    norm_weight_decay: Optional[float] = None,
) -> keras.optimizers.Optimizer:
    """SGD with momentum (or AdamW) and weight decay, a linear warmup, then a step, cosine or
    constant schedule.

    The defaults take torchvision's reference schedule (lr 0.02 for 16 images per batch, scaled
    linearly with the batch size; 1000 warmup steps from 0.001) but Keras' *decoupled* weight
    decay (``optimizer="sgd"``), which is not torchvision's: its recipe is ``optimizer="sgd_l2"``
    (coupled L2, :class:`CoupledL2SGD`), as :mod:`keras_maskrcnn.recipes` ``torchvision_v1`` builds it.

    Args:
        learning_rate: base learning rate (after warmup).
        momentum: SGD momentum.
        weight_decay: for ``"sgd"`` and ``"adamw"`` Keras' decoupled weight decay (``w -= lr *
            weight_decay * w`` per step); for ``"sgd_l2"`` PyTorch's coupled L2 (``g += weight_decay * w``).
        warmup_steps: steps of linear warmup from ``warmup_factor * learning_rate``; 0: none.
        warmup_factor: the learning rate multiplier at step 0.
        schedule: ``"step"`` (multiply by ``decay_factor`` at each of ``decay_steps``; by default
            at 2/3 and 8/9 of ``total_steps``, as detectron2's 1x schedule), ``"cosine"``
            (cosine decay to 0 at ``total_steps``) or ``"constant"``.
        total_steps: length of training in steps; needed by ``"cosine"`` and by ``"step"`` without
            ``decay_steps``.
        decay_steps: the steps from which ``"step"`` decays (absolute step numbers; the
            optimizer's step counter starts at 0, so ``E * steps_per_epoch`` decays after epoch ``E``).
        decay_factor: the ``"step"`` decay multiplier.
        clipnorm: clip the global norm of the gradients to this value (``global_clipnorm``).
        optimizer: ``"sgd"`` (Keras' SGD with momentum, decoupled decay; for fine-tuning
            pretrained weights), ``"sgd_l2"`` (:class:`CoupledL2SGD`: ``torch.optim.SGD``, the
            published recipes' optimizer) or ``"adamw"`` (converges much faster from scratch: about
            1e-3 for small models; ``momentum`` is then unused).
        norm_weight_decay: ``"sgd_l2"`` only: the decay of normalisation layers' ``gamma`` /
            ``beta`` (torchvision's ``--norm-weight-decay``); ``None``: ``weight_decay``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    if norm_weight_decay is not None and optimizer != "sgd_l2":
        raise ValueError(f"norm_weight_decay is an option of optimizer 'sgd_l2', not {optimizer!r}.")
    lr = learning_rate_schedule(
        learning_rate,
        schedule,
        total_steps=total_steps,
        decay_steps=decay_steps,
        decay_factor=decay_factor,
        warmup_steps=warmup_steps,
        warmup_factor=warmup_factor,
    )
    common = dict(
        learning_rate=lr,
        weight_decay=weight_decay if weight_decay > 0 else None,
        global_clipnorm=clipnorm if clipnorm else None,
    )
    if optimizer == "adamw":
        return FusedAdamW(**common)
    if optimizer == "sgd_l2":
        return CoupledL2SGD(momentum=momentum, norm_weight_decay=norm_weight_decay, **common)
    return keras.optimizers.SGD(momentum=momentum, **common)


__all__ = ["CoupledL2SGD", "FusedAdamW", "NORM_VARIABLE_NAMES", "OPTIMIZERS", "build_optimizer"]
