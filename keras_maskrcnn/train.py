"""Training helpers shared by the ``keras-maskrcnn train`` command and the examples.

>>> from keras_maskrcnn import MaskRCNN
>>> from keras_maskrcnn.data import coco_dataset
>>> from keras_maskrcnn.train import build_optimizer, train
>>> data = coco_dataset("train.json", "images/", batch_size=2, training=True)
>>> model = MaskRCNN(num_classes=data.coco_source.num_classes)
>>> steps = len(data.coco_source) // 2
>>> model.compile(optimizer=build_optimizer(0.01, warmup_steps=100, total_steps=12 * steps))
>>> train(model, data, "runs/exp1", epochs=12, val_annotations="val.json", val_images="images/")

Output folder layout written by :func:`train`:

* ``checkpoints/epoch-NNN.keras``: the full model (with optimizer state) after epoch ``NNN``;
  loadable by ``keras.models.load_model`` and usable by ``keras-maskrcnn evaluate/predict``;
* ``backup/``: the training state of an unfinished run (:class:`TrainingBackup`: weights,
  optimizer state, epoch and step, every ``backup_every`` steps and after every epoch); the next
  :func:`train` call on the folder resumes from it; removed when the run ends normally;
* ``logs/``: TensorBoard logs (losses; COCO numbers under ``logs/coco_eval``);
* ``history.csv``: the epoch logs;
* ``classes.json``: the label map (see :func:`save_label_map`);
* ``model.keras``: the final model.

Fault tolerance: a run killed at any moment (``SIGKILL`` included) is resumed by running the
same :func:`train` call (or ``keras-maskrcnn train`` command) again: it continues from the last
backup at the same epoch, batch and optimizer step, losing at most ``backup_every`` steps. A NaN
or infinite loss stops training at once (:class:`StopOnNonFiniteLoss`) with a
``FloatingPointError`` naming the epoch, batch and step; non-finite states are never saved, so
the backup and the newest checkpoint hold the last good weights. Before training, the COCO
training and validation sets are checked (:mod:`keras_maskrcnn.data.validate`) and training
refuses to start while they have errors.

Distributed training (``tf.distribute``): create the model and the optimizer inside
``strategy.scope()`` and pass global batches; see :mod:`keras_maskrcnn.distribute`. Under
``MultiWorkerMirroredStrategy`` only the chief (worker 0) writes the output folder, which must be
on a file system shared by all workers (they all resume from its backup).

The checkpoints and ``model.keras`` load with ``keras.models.load_model`` in Keras' default
``safe_mode=True`` (no Python code is deserialised); nothing in this package turns it off.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import math
import os
import re
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import keras
import tensorflow as tf

from keras_maskrcnn.data.coco import read_json_file
from keras_maskrcnn.evaluation import CocoEvaluationCallback, _write_scalar
from keras_maskrcnn.optimizers import FusedAdamW

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
SCHEDULES = ("step", "cosine", "constant")
CHECKPOINT_PATTERN = "epoch-{epoch:03d}.keras"
_CHECKPOINT_RE = re.compile(r"^epoch-(\d+)\.keras$")


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


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


OPTIMIZERS = ("sgd", "adamw")


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
) -> keras.optimizers.Optimizer:
    """SGD with momentum (or AdamW) and weight decay, a linear warmup, then a step, cosine or
    constant schedule.

    Defaults are torchvision's reference recipe (lr 0.02 for 16 images per batch; scale it
    linearly with the batch size).

    Args:
        learning_rate: base learning rate (after warmup).
        momentum: SGD momentum.
        weight_decay: Keras' decoupled weight decay (``w -= lr * weight_decay * w`` per step).
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
        optimizer: ``"sgd"`` (torchvision's recipe; for fine-tuning pretrained weights) or
            ``"adamw"`` (converges much faster from scratch: about 1e-3 for small models;
            ``momentum`` is then unused).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
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
        boundaries = sorted({int(s) - 1 for s in decay_steps if int(s) > 0})
        if boundaries:
            values = [float(learning_rate) * decay_factor**i for i in range(len(boundaries) + 1)]
            lr = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    elif schedule == "cosine":
        if not total_steps or total_steps < 1:
            raise ValueError("The 'cosine' schedule needs total_steps >= 1.")
        lr = keras.optimizers.schedules.CosineDecay(float(learning_rate), decay_steps=int(total_steps), alpha=0.0)
    if warmup_steps > 0:
        lr = LinearWarmup(lr, warmup_steps, warmup_factor)
    common = dict(
        learning_rate=lr,
        weight_decay=weight_decay if weight_decay > 0 else None,
        global_clipnorm=clipnorm if clipnorm else None,
    )
    if optimizer == "adamw":
        return FusedAdamW(**common)
    return keras.optimizers.SGD(momentum=momentum, **common)


# --------------------------------------------------------------------------------------------
# Label map
# --------------------------------------------------------------------------------------------


def save_label_map(
    path: PathLike, class_to_category: Mapping[int, int], class_names: Optional[Mapping[int, str]] = None
) -> str:
    """Write the label map as JSON: ``{"classes": [{"class": 1, "id": <category id>, "name": ...}, ...]}``.

    ``class`` is the model's contiguous class id, ``id`` the COCO category id it stands for.
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    class_names = class_names or {}
    entries = [
        {"class": int(cls), "id": int(cat), "name": str(class_names.get(cls, cat))}
        for cls, cat in sorted(class_to_category.items())
    ]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"classes": entries}, f, indent=1)
    return path


def load_label_map(path: PathLike) -> Tuple[Dict[int, int], Dict[int, str]]:
    """Read a label map written by :func:`save_label_map`, or the ``categories`` of a COCO
    annotation file (classes numbered by sorted category id, as in training).

    Returns:
        ``(class_to_category, class_names)``, both keyed by the contiguous class id.
    """
    path = os.fspath(path)
    data = read_json_file(path, "label map file")
    if isinstance(data, dict) and isinstance(data.get("classes"), list):
        entries = data["classes"]
        try:
            class_to_category = {int(e["class"]): int(e["id"]) for e in entries}
            class_names = {int(e["class"]): str(e.get("name", e["id"])) for e in entries}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Label map {path!r}: every class needs 'class' and 'id' ({e}).") from e
        return class_to_category, class_names
    if isinstance(data, dict) and isinstance(data.get("categories"), list):
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        class_to_category = {i + 1: cat for i, cat in enumerate(sorted(names))}
        return class_to_category, {cls: names[cat] for cls, cat in class_to_category.items()}
    raise ValueError(f"{path!r} is neither a label map ('classes') nor a COCO file ('categories').")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def latest_checkpoint(directory: PathLike) -> Optional[Tuple[str, int]]:
    """``(path, epoch)`` of the newest ``epoch-NNN.keras`` in ``directory``, or None."""
    found = []
    for path in glob.glob(os.path.join(os.fspath(directory), "epoch-*.keras")):
        match = _CHECKPOINT_RE.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        return None
    epoch, path = max(found)
    return path, epoch


class _PruneCheckpoints(keras.callbacks.Callback):
    """Deletes all but the newest ``keep`` ``epoch-NNN.keras`` files after each epoch."""

    def __init__(self, directory: str, keep: int):
        super().__init__()
        self.directory = directory
        self.keep = keep

    def on_epoch_end(self, epoch, logs=None):
        found = []
        for path in glob.glob(os.path.join(self.directory, "epoch-*.keras")):
            match = _CHECKPOINT_RE.match(os.path.basename(path))
            if match:
                found.append((int(match.group(1)), path))
        for _, path in sorted(found)[: max(len(found) - self.keep, 0)]:
            os.remove(path)


class _ScalarSummaries(keras.callbacks.Callback):
    """Epoch logs as TensorBoard scalars (``epoch_<name>`` under ``log_dir/train``), written with
    ``tf.summary.write``, which works without the ``tensorboard`` package installed."""

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
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


def _tensorboard_callback(log_dir: str) -> keras.callbacks.Callback:
    """Keras' ``TensorBoard`` callback when the ``tensorboard`` package is installed (it needs it
    for ``tf.summary.scalar``), else :class:`_ScalarSummaries`."""
    if importlib.util.find_spec("tensorboard") is not None:
        return keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False)
    return _ScalarSummaries(log_dir)


def _label_map_from(dataset: Any, num_classes: int) -> Tuple[Dict[int, int], Dict[int, str]]:
    source = getattr(dataset, "coco_source", None) or getattr(dataset, "source", None)
    if source is not None and hasattr(source, "class_to_category"):
        return dict(source.class_to_category), dict(getattr(source, "class_names", {}) or {})
    return {k: k for k in range(1, num_classes + 1)}, {k: str(k) for k in range(1, num_classes + 1)}


# --------------------------------------------------------------------------------------------
# Fault tolerance: backups, non-finite losses
# --------------------------------------------------------------------------------------------

BACKUP_STATE = "state.json"


def _step_count(model: keras.Model) -> Optional[int]:
    """The optimizer's step counter (works for distributed variables too); None without one."""
    if model.optimizer is None:
        return None
    return int(model.optimizer.iterations.numpy())


def _finite_loss(logs: Optional[Mapping[str, Any]]) -> bool:
    """False when ``logs["loss"]`` exists and is NaN or infinite."""
    value = (logs or {}).get("loss")
    if value is None:
        return True
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite, and records where.

    Keras' running loss (``logs["loss"]``, the epoch's mean so far) is checked after every
    batch; a non-finite value sets ``model.stop_training`` and ``stopped_at`` to
    ``{"epoch": E, "batch": B, "step": S, "loss": value}`` (``E`` and ``B`` 1-based, ``S`` the
    optimizer's step count after that batch). :class:`TrainingBackup` and the checkpoints skip
    saving non-finite states, so the newest backup and checkpoint are the last good ones.
    """

    def __init__(self):
        super().__init__()
        self.stopped_at: Optional[Dict[str, Any]] = None
        self.batch_offset = 0
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.stopped_at is None and not _finite_loss(logs):
            step = _step_count(self.model)
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


class TrainingBackup(keras.callbacks.Callback):
    """Backs up the training state every ``save_freq`` training steps and after every epoch, so
    that a run killed at any moment (even ``SIGKILL``) resumes from the last backup.

    The folder holds ``state-<step>.weights.h5`` (model and optimizer variables, step counter
    included) and ``state.json`` (``{"weights": ..., "epoch": E, "batch": B, "step": S}``: ``B``
    batches of the 0-based epoch ``E`` were done). ``state.json`` is replaced atomically after the
    weights file is complete, and older weights files are deleted only then, so the folder always
    holds one complete state. States whose loss is not finite are not saved.
    :func:`read_backup` and :func:`restore_backup` read it back; :func:`train` uses them.

    Args:
        backup_dir: the folder (created when needed).
        save_freq: save when the optimizer's step count is a multiple of this; None or 0: only
            after every epoch.
    """

    def __init__(self, backup_dir: PathLike, save_freq: Optional[int] = None):
        super().__init__()
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = int(save_freq or 0)
        self.batch_offset = 0  # batches of the first epoch done before this fit call
        self._epoch = 0
        self._batches = 0
        self._saved_step = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches = batch + 1
        if not self.save_freq or not _finite_loss(logs):
            return
        step = _step_count(self.model)
        if step % self.save_freq == 0:
            self.save(self._epoch, self.batch_offset + batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        offset, self.batch_offset = self.batch_offset, 0
        if not _finite_loss(logs):
            return
        planned = (self.params or {}).get("steps")
        if planned and self._batches < planned:  # stopped early (a callback): the epoch is not done
            self.save(epoch, offset + self._batches)
        else:
            self.save(epoch + 1, 0)

    def save(self, epoch: int, batch: int) -> str:
        """Write the current state as ``batch`` batches done in epoch ``epoch``; returns its path."""
        os.makedirs(self.backup_dir, exist_ok=True)
        step = _step_count(self.model)
        name = f"state-{step:010d}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        if step != self._saved_step or not os.path.isfile(path):  # (the epoch's last step: saved already)
            self.model.save_weights(path, overwrite=True)
            self._saved_step = step
        state = {"weights": name, "epoch": int(epoch), "batch": int(batch), "step": step}
        tmp = os.path.join(self.backup_dir, BACKUP_STATE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.backup_dir, BACKUP_STATE))
        for old in glob.glob(os.path.join(self.backup_dir, "state-*.weights.h5")):
            if os.path.basename(old) != name:
                os.remove(old)
        return path


def read_backup(backup_dir: PathLike) -> Optional[Dict[str, Any]]:
    """The state written by :class:`TrainingBackup` in ``backup_dir`` (its ``weights`` made an
    absolute path), or None when there is none."""
    backup_dir = os.fspath(backup_dir)
    path = os.path.join(backup_dir, BACKUP_STATE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            state = json.load(f)
        state = {
            "weights": os.path.join(backup_dir, str(state["weights"])),
            "epoch": int(state["epoch"]),
            "batch": int(state["batch"]),
            "step": int(state["step"]),
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"Unreadable training backup {path!r} ({e}); delete {backup_dir!r} to start afresh.") from e
    if not os.path.isfile(state["weights"]):
        raise ValueError(f"The training backup {path!r} names {state['weights']!r}, which is missing; delete "
                         f"{backup_dir!r} to start afresh.")
    return state


def restore_backup(model: keras.Model, backup_dir: PathLike) -> Optional[Dict[str, Any]]:
    """Load the backup in ``backup_dir`` into ``model`` and its (built) optimizer; returns the state
    (see :func:`read_backup`) or None when there is none. The learning rate given to the
    optimizer now wins over the one saved (a constant rate is an optimizer variable)."""
    state = read_backup(backup_dir)
    if state is None:
        return None
    rate = getattr(model.optimizer, "_learning_rate", None)
    rate_value = rate.numpy() if isinstance(rate, keras.Variable) else None
    try:
        model.load_weights(state["weights"])
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"Cannot restore the interrupted run's backup {state['weights']!r} into this model ({e}). It was "
            f"made by another model or optimizer: delete {os.fspath(backup_dir)!r} to start afresh, or use another "
            "output folder."
        ) from e
    if rate_value is not None:
        rate.assign(rate_value)
    return state


class _FiniteModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that does not save epochs whose loss is not finite."""

    def on_epoch_end(self, epoch, logs=None):
        if _finite_loss(logs):
            super().on_epoch_end(epoch, logs)


class _UnlessStopped(keras.callbacks.Callback):
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


def _known_steps(dataset: Any, steps_per_epoch: Optional[int]) -> Optional[int]:
    if steps_per_epoch:
        return int(steps_per_epoch)
    try:
        cardinality = int(dataset.cardinality())
    except (AttributeError, TypeError):
        return None
    return cardinality if cardinality > 0 else None


def _validate_inputs(dataset: Any, val_annotations: Optional[PathLike], val_images: Optional[PathLike]) -> None:
    """Run :func:`~keras_maskrcnn.data.validate.validate_coco` (quick image checks) on the
    training set (when ``dataset`` comes from ``coco_dataset``) and on the validation set;
    raise :class:`~keras_maskrcnn.data.validate.DataValidationError` listing the errors."""
    from keras_maskrcnn.data.coco import CocoSource
    from keras_maskrcnn.data.validate import DataValidationError, errors_of, validate_coco

    sets = []
    source = getattr(dataset, "coco_source", None)
    if isinstance(source, CocoSource):
        sets.append((source.annotation_file, source.image_dir))
    if val_annotations is not None:
        sets.append((os.fspath(val_annotations), os.fspath(val_images)))
    for annotation_file, image_dir in sets:
        problems = validate_coco(annotation_file, image_dir, check_images="header")
        warnings = [p for p in problems if p.severity != "error"]
        if warnings:
            logger.warning(
                "%d warning(s) for %s (run `keras-maskrcnn validate` to list them all), e.g.:\n  %s",
                len(warnings), annotation_file, "\n  ".join(str(p) for p in warnings[:5]),
            )
        if errors_of(problems):
            raise DataValidationError(annotation_file, problems)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _default_optimizer(dataset: tf.data.Dataset, epochs: int, steps_per_epoch: Optional[int]) -> keras.optimizers.SGD:
    """:func:`build_optimizer` defaults, the step schedule sized by the training length (constant
    after warmup when the length is unknown)."""
    steps = steps_per_epoch
    if steps is None:
        cardinality = int(dataset.cardinality())
        steps = cardinality if cardinality > 0 else None
    if steps is None:
        return build_optimizer(schedule="constant")
    return build_optimizer(warmup_steps=min(1000, steps), total_steps=epochs * steps)



def train(
    model: keras.Model,
    dataset: tf.data.Dataset,
    output_dir: PathLike,
    epochs: int = 1,
    optimizer: Optional[keras.optimizers.Optimizer] = None,
    steps_per_epoch: Optional[int] = None,
    val_annotations: Optional[PathLike] = None,
    val_images: Optional[PathLike] = None,
    eval_every: int = 1,
    eval_max_images: Optional[int] = None,
    eval_batch_size: int = 2,
    resume: bool = False,
    keep_checkpoints: Optional[int] = None,
    class_to_category: Optional[Mapping[int, int]] = None,
    class_names: Optional[Mapping[int, str]] = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: Union[str, int] = "auto",
    backup_every: Optional[int] = 500,
    validate: bool = True,
) -> keras.callbacks.History:
    """Train ``model`` on ``dataset`` with checkpoints, backup/resume, logs and COCO evaluation.

    Args:
        model: a :class:`~keras_maskrcnn.MaskRCNN` (compiled or not). For distributed training,
            create it (and ``optimizer``) inside ``strategy.scope()``
            (:mod:`keras_maskrcnn.distribute`); ``dataset`` then yields global batches.
        dataset: ``(inputs, targets)`` batches from :mod:`keras_maskrcnn.data`.
        output_dir: the output folder (layout in the module docstring).
        epochs: the epoch to train up to (counting epochs already done when resuming).
        optimizer: compile the model with it; when None and the model is not compiled yet,
            :func:`build_optimizer` defaults are used (warmup of at most one epoch, decay at 2/3
            and 8/9 of training).
        steps_per_epoch: batches per epoch; None: one pass over ``dataset``. With a finite
            dataset, pass ``repeat=True`` to the data pipeline when setting it.
        val_annotations, val_images: a COCO annotation file and image folder to evaluate on
            (:class:`~keras_maskrcnn.evaluation.CocoEvaluationCallback`) every ``eval_every``
            epochs and after the last; ``eval_max_images`` limits the images used.
        resume: with no backup in ``output_dir`` (see below), continue from the newest
            checkpoint there (weights and optimizer; the epoch from its name).
        keep_checkpoints: keep only this many newest checkpoints (None: all).
        class_to_category, class_names: the label map written to ``classes.json``; by default
            taken from the dataset's ``coco_source`` / ``source`` (identity when there is none).
        callbacks: extra callbacks, run after the built-in ones. (When a run resumes in the
            middle of an epoch, ``fit`` is called twice, so they see ``on_train_begin`` twice.)
        verbose: passed to ``fit``.
        backup_every: back up the training state every this many steps (and after every
            epoch) to ``output_dir/backup``; None or 0: after every epoch only.
        validate: check the training set (when ``dataset`` comes from ``coco_dataset``) and the
            validation set with :func:`~keras_maskrcnn.data.validate.validate_coco` first, and
            refuse to start if they have errors.

    Interruptions: a run that is killed (even with ``SIGKILL``) leaves ``output_dir/backup``;
    calling ``train`` again with the same arguments restores it (weights, optimizer state, step
    counter, epoch and position in the epoch) and trains only the remaining steps, so at most the
    steps since the last backup are lost. The data order after resuming is not the one the
    uninterrupted run would have seen. The backup is deleted when training ends normally.

    Returns:
        The ``History`` of ``fit`` (of the epochs trained in this call). The final model is
        saved to ``output_dir/model.keras``.

    Raises:
        FloatingPointError: the loss became NaN or infinite; the message names the epoch, batch
            and step. Training stops there; the backup and the checkpoints keep the last good
            state and ``model.keras`` is not written.
        keras_maskrcnn.data.validate.DataValidationError: the data has errors (``validate``).
    """
    from keras_maskrcnn import distribute

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if (val_annotations is None) != (val_images is None):
        raise ValueError("val_annotations and val_images must be given together.")
    output_dir = os.fspath(output_dir)
    checkpoint_dir = os.path.join(output_dir, "checkpoints")
    backup_dir = os.path.join(output_dir, "backup")
    log_dir = os.path.join(output_dir, "logs")
    strategy = model.distribute_strategy
    # Multi-worker: the chief writes the outputs; every worker restores the chief's backup.
    chief = distribute.is_chief(strategy)

    if class_to_category is None:
        class_to_category, default_names = _label_map_from(dataset, model.num_classes)
        class_names = class_names or default_names
    if len(class_to_category) != model.num_classes:
        raise ValueError(
            f"The label map has {len(class_to_category)} classes but the model has num_classes={model.num_classes}."
        )
    if validate:
        _validate_inputs(dataset, val_annotations, val_images)
    if chief:
        os.makedirs(checkpoint_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
        save_label_map(os.path.join(output_dir, "classes.json"), class_to_category, class_names)

    with strategy.scope():
        if optimizer is None and not getattr(model, "compiled", False):
            optimizer = _default_optimizer(dataset, epochs, steps_per_epoch)
        if optimizer is not None:
            model.compile(optimizer=optimizer)
        # Restoring, and fit under MultiWorkerMirroredStrategy, need the variables of model and optimizer.
        if not model.built:
            model.build(None)
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)

        initial_epoch, done_batches, resumed = 0, 0, False
        # Loading creates variables, which multi-worker strategies broadcast: all workers or none.
        has_backup = os.path.isfile(os.path.join(backup_dir, BACKUP_STATE))
        distribute.check_same_on_all_workers(int(has_backup), "whether there is a backup to resume from", strategy)
        state = restore_backup(model, backup_dir)
        if state is not None:
            initial_epoch, done_batches, resumed = state["epoch"], state["batch"], True
            logger.info("Resuming from the backup in %s.", backup_dir)
            if chief:
                print(
                    f"Resuming the interrupted run from {backup_dir}: epoch {initial_epoch + 1}, after batch "
                    f"{done_batches} (training step {state['step']})"
                )
        elif resume:
            checkpoint = latest_checkpoint(checkpoint_dir)
            if checkpoint is not None:
                path, initial_epoch = checkpoint
                model.load_weights(path)
                resumed = True
                if chief:
                    print(f"Resuming from {path} (epoch {initial_epoch}, training step {_step_count(model)})")
            elif chief:
                print(f"Nothing to resume in {output_dir}: starting from scratch.")
    distribute.check_same_on_all_workers(_step_count(model), "the training step to start from", strategy)

    # The epochs to run: the rest of an interrupted epoch first (a fit of its remaining steps).
    phases: List[Tuple[int, int, Optional[int], int]] = []  # (initial_epoch, epochs, steps, batch offset)
    epoch = initial_epoch
    if done_batches and epoch < epochs:
        steps = _known_steps(dataset, steps_per_epoch)
        if steps is None:
            logger.warning("The epoch length is unknown: resuming epoch %d from its start.", epoch + 1)
        elif done_batches >= steps:
            epoch += 1
        else:
            phases.append((epoch, epoch + 1, steps - done_batches, done_batches))
            epoch += 1
    if epoch < epochs:
        phases.append((epoch, epochs, steps_per_epoch, 0))
    if initial_epoch >= epochs and chief:
        print(f"Already trained for {initial_epoch} >= {epochs} epochs; only saving the model.")

    nan_guard = StopOnNonFiniteLoss()
    backup = TrainingBackup(backup_dir, save_freq=backup_every) if chief else None
    csv_logger = None
    built_in: List[keras.callbacks.Callback] = [nan_guard]
    if chief:
        if val_annotations is not None:
            # Before the checkpoint, TensorBoard and CSV callbacks, so that they see its numbers.
            evaluation = CocoEvaluationCallback(
                val_annotations,
                val_images,
                every_n_epochs=eval_every,
                batch_size=eval_batch_size,
                max_images=eval_max_images,
                log_dir=log_dir,
            )
            built_in.append(_UnlessStopped(evaluation, nan_guard))
        csv_logger = keras.callbacks.CSVLogger(os.path.join(output_dir, "history.csv"), append=resumed)
        built_in += [
            backup,
            _FiniteModelCheckpoint(os.path.join(checkpoint_dir, CHECKPOINT_PATTERN)),
            _tensorboard_callback(log_dir),
            csv_logger,
        ]
        if keep_checkpoints:
            built_in.append(_PruneCheckpoints(checkpoint_dir, keep_checkpoints))

    data = dataset
    if distribute.is_multi_worker(strategy):
        # Each worker reads the whole pipeline and keeps its share of every global batch.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        data = dataset.with_options(options)

    history = keras.callbacks.History()
    history.history, history.epoch = {}, []
    with distribute.fit_scope(model):
        for index, (first, last, steps, offset) in enumerate(phases):
            nan_guard.batch_offset = offset
            if backup is not None:
                backup.batch_offset = offset
            if index > 0 and csv_logger is not None:
                csv_logger.append = True
            part = model.fit(
                data,
                epochs=last,
                initial_epoch=first,
                steps_per_epoch=steps,
                callbacks=built_in + list(callbacks),
                verbose=verbose,
            )
            history.epoch += list(part.epoch)
            for key, values in part.history.items():
                history.history.setdefault(key, []).extend(values)
            history.set_params(part.params)
            history.set_model(model)
            if model.stop_training or nan_guard.stopped_at is not None:
                break

    if nan_guard.stopped_at is not None:
        where = nan_guard.stopped_at
        good = latest_checkpoint(checkpoint_dir) if chief else None
        kept = read_backup(backup_dir) if chief else None
        raise FloatingPointError(
            f"the loss became {where['loss']} at epoch {where['epoch']}, batch {where['batch']} (training step "
            f"{where['step']}), so training stopped and model.keras was not written. The last good state: "
            + (f"the backup of step {kept['step']} in {backup_dir} (running the same command again resumes "
               "from it), " if kept else "")
            + f"checkpoint {good[0] if good else 'none'}. Lower the learning rate or clip gradients "
            "(--lr, --clipnorm)."
        )
    if chief:
        model.save(os.path.join(output_dir, "model.keras"))
        if os.path.isdir(backup_dir):
            shutil.rmtree(backup_dir)  # finished: nothing to resume
    return history


def steps_per_epoch_for(num_images: int, batch_size: int) -> int:
    """Full batches in one pass over ``num_images`` images (at least 1)."""
    return max(num_images // batch_size, 1)


__all__ = [
    "LinearWarmup",
    "SCHEDULES",
    "StopOnNonFiniteLoss",
    "TrainingBackup",
    "build_optimizer",
    "latest_checkpoint",
    "load_label_map",
    "read_backup",
    "restore_backup",
    "save_label_map",
    "steps_per_epoch_for",
    "train",
]
