"""Distributed training with ``tf.distribute``: strategies, and how Mask R-CNN's losses are reduced.

Usage (one machine, all its GPUs)::

    strategy = keras_maskrcnn.distribute.get_strategy("mirrored")
    with strategy.scope():  # the model's and the optimizer's variables are created here
        model = MaskRCNN(num_classes=3)
        optimizer = build_optimizer(0.02 * global_batch / 16, ...)
    train(model, dataset, "runs/exp", optimizer=optimizer)  # dataset batches are GLOBAL batches

Several machines: run the same command on every worker with ``TF_CONFIG`` describing the cluster
(``{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": i}}``)
and ``get_strategy("multi_worker")``, created before any other TensorFlow work. Worker 0 (the
chief) writes the output folder (checkpoints, logs, backup); the others write nothing. On
resume every worker restores the chief's backup, so the output folder must be on a file system
all workers share (:func:`check_same_on_all_workers` refuses to go on when they disagree).

Loss reduction
--------------
Keras' TensorFlow trainer runs ``train_step`` once per replica on that replica's share of the
global batch, and the optimizer **sums** the replicas' gradients (an all-reduce) before applying
them. Each of Mask R-CNN's five losses is a mean over the items sampled from the whole batch
(anchors for the RPN losses, RoIs for the box head, positive RoIs for the mask loss; see
:mod:`keras_maskrcnn.losses`), and the number of sampled items differs from image to image (an
image with few objects gives few positive RoIs). So :meth:`MaskRCNN.compute_losses` turns each
replica's mean into its share of the global-batch mean::

    share_r = mean_r * count_r / sum_over_replicas(count)      (counts all-reduced)

and the shares sum, over replicas, to ``sum(all items) / count(all items)``: exactly the loss a
single device computes on the global batch, and their summed gradients are its gradient.
(Dividing each replica's mean by ``num_replicas_in_sync`` would be exact only when every replica
samples the same number of items, which the mask and box losses do not.) Regularisation losses
(``model.losses``) are divided by ``num_replicas_in_sync``. The loss metrics are all-reduced too,
so the logged numbers are the global-batch losses and every replica (every worker) sees the same
value: a non-finite loss stops all of them at the same step.

What stays per replica: proposal generation, NMS, anchor/RoI matching and the random
positive/negative sampling (each replica samples from its own images; with a fixed
``*_batch_size_per_image`` per image, the sampled set has the same distribution as on one
device). Trainable batch normalisation (``backbone_norm="batch_norm"``, ``fpn_norm``, ``head_norm``)
computes its statistics per replica, as ``keras.layers.BatchNormalization`` does by default, unless
it is synchronized (``synchronized=True``: :func:`keras_maskrcnn.layers.norm.synchronize_batch_norm`,
used by the ``lsj`` recipes), which gives global-batch statistics. Per-replica moving statistics
drift apart between replicas (each writes its own copy; saving reads replica 0's); synchronized
ones stay equal.

Keras 3 workarounds for ``MultiWorkerMirroredStrategy`` (both needed for ``fit`` to run at all):
:func:`fit_scope` skips Keras' pre-fit symbolic build, which cannot reduce dict batches over
workers (keras-team/keras#20329); and ``MaskRCNN``'s step returns its metrics with a leading
axis of 1 there, because Keras reduces step outputs over workers with
``strategy.reduce("MEAN", axis=0)``, which fails on scalars. :func:`keras_maskrcnn.train.train`
applies both; with plain ``model.fit``, build the model and wrap the call in
``with fit_scope(model):``.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator, Optional, Sequence

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")


def get_strategy(name: str = "default", devices: Optional[Sequence[str]] = None) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy called ``name``.

    Args:
        name: ``"default"`` (no distribution: the current default strategy, one device),
            ``"mirrored"`` (``MirroredStrategy``: synchronous data parallelism over the devices
            of this machine) or ``"multi_worker"`` (``MultiWorkerMirroredStrategy`` over the
            workers listed in the ``TF_CONFIG`` environment variable; create it before any other
            TensorFlow operation runs).
        devices: for ``"mirrored"``, the devices to use (default: all GPUs, else the CPU).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=list(devices) if devices else None)
    if name == "multi_worker":
        if devices:
            raise ValueError("devices is only for the 'mirrored' strategy.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}.")


def _multi_replica_context() -> Optional[tf.distribute.ReplicaContext]:
    """The replica context when running one replica of several, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def num_replicas_in_sync() -> int:
    """Replicas training in sync, seen from inside ``train_step`` (1 without distribution)."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context
        return tf.distribute.get_strategy().num_replicas_in_sync
    return context.num_replicas_in_sync


def sum_over_replicas(value: tf.Tensor) -> tf.Tensor:
    """All-reduce (sum) ``value`` over the replicas in sync; ``value`` itself with one replica."""
    context = _multi_replica_context()
    if context is None:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def global_batch_shares(means: tf.Tensor, counts: tf.Tensor) -> tf.Tensor:
    """Each replica's share of global-batch means (see the module docstring).

    Args:
        means: ``[K]`` losses, each a sum over this replica's sampled items divided by
            ``max(counts[k], 1)``.
        counts: ``[K]`` the number of items each mean is over, on this replica.

    Returns:
        ``[K]``: ``means * max(counts, 1) / max(sum over replicas of counts, 1)``, which sum over
        replicas to the means over the global batch; ``means`` unchanged with one replica.
    """
    if _multi_replica_context() is None:
        return means
    counts = tf.stop_gradient(tf.cast(counts, means.dtype))
    total = sum_over_replicas(counts)
    return means * (tf.maximum(counts, 1.0) / tf.maximum(total, 1.0))


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


def is_multi_worker(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
    """True for a ``MultiWorkerMirroredStrategy`` with more than one worker."""
    strategy = strategy or tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return False
    spec = resolver.cluster_spec().as_dict()
    return sum(len(tasks) for kind, tasks in spec.items() if kind in ("chief", "worker")) > 1


def is_chief(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
    """Whether this process writes the outputs: always, except on non-chief multi-worker workers."""
    strategy = strategy or tf.distribute.get_strategy()
    if not is_multi_worker(strategy):
        return True
    return bool(strategy.extended.should_checkpoint)


def worker_name(strategy: Optional[tf.distribute.Strategy] = None) -> str:
    """``"<task type>-<task id>"`` of this worker (``"chief"`` without a cluster)."""
    strategy = strategy or tf.distribute.get_strategy()
    if not is_multi_worker(strategy):
        return "chief"
    resolver = strategy.cluster_resolver
    return f"{resolver.task_type}-{resolver.task_id}"


def check_same_on_all_workers(value: int, what: str, strategy: Optional[tf.distribute.Strategy] = None) -> None:
    """Raise ``RuntimeError`` unless every worker passes the same integer ``value`` (a collective:
    every worker must call it). A no-op without several workers."""
    strategy = strategy or tf.distribute.get_strategy()
    if not is_multi_worker(strategy):
        return
    local = tf.constant([int(value)], tf.int64)
    values = strategy.gather(strategy.run(lambda: tf.identity(local)), axis=0).numpy()
    low, high = int(values.min()), int(values.max())
    if low != high:
        raise RuntimeError(
            f"The workers disagree on {what} (from {low} to {high}; this worker, {worker_name(strategy)}, has "
            f"{value}). Every worker reads the chief's output folder: put it on a file system all workers share."
        )


@contextlib.contextmanager
def fit_scope(model) -> Iterator[None]:
    """Context for ``model.fit`` / ``model.evaluate`` under ``MultiWorkerMirroredStrategy``.

    Keras' pre-fit "symbolic build" reduces the first batch over the workers with
    ``strategy.reduce``, which fails on ``(inputs, targets)`` dict batches
    (keras-team/keras#20329). Inside this context it is skipped for ``model``; the model must be
    built (``model.build()``) and its optimizer is built here, which is all it would do. A no-op
    for other strategies. (:func:`keras_maskrcnn.train.train` uses it.)
    """
    strategy = model.distribute_strategy
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        yield
        return
    if not model.built:
        raise ValueError("Build the model (model.build()) before fit under MultiWorkerMirroredStrategy.")
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        with strategy.scope():
            optimizer.build(model.trainable_variables)
    object.__setattr__(model, "_maybe_symbolic_build", lambda iterator=None, data_batch=None: None)
    try:
        yield
    finally:
        object.__delattr__(model, "_maybe_symbolic_build")


def tf_config() -> dict:
    """The parsed ``TF_CONFIG`` environment variable (``{}`` when unset)."""
    text = os.environ.get("TF_CONFIG", "")
    return json.loads(text) if text else {}


__all__ = [
    "STRATEGIES",
    "check_same_on_all_workers",
    "fit_scope",
    "get_strategy",
    "global_batch_shares",
    "is_chief",
    "is_multi_worker",
    "num_replicas_in_sync",
    "sum_over_replicas",
    "tf_config",
    "worker_name",
]
