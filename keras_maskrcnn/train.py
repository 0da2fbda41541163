"""Training helpers shared by the ``keras-maskrcnn train`` command and the examples.

>>> from keras_maskrcnn import MaskRCNN
>>> from keras_maskrcnn.data import coco_dataset
>>> from keras_maskrcnn.optimizers import build_optimizer
>>> from keras_maskrcnn.train import train
>>> data = coco_dataset("train.json", "images/", batch_size=2, training=True)
>>> model = MaskRCNN(num_classes=data.coco_source.num_classes)
>>> steps = len(data.coco_source) // 2
>>> model.compile(optimizer=build_optimizer(0.01, warmup_steps=100, total_steps=12 * steps))
>>> train(model, data, "runs/exp1", epochs=12, val_annotations="val.json", val_images="images/")

Output folder layout written by :func:`train`:

* ``checkpoints/epoch-NNN.keras``: the full model (with optimizer state) after epoch ``NNN``;
  loadable by ``keras.models.load_model`` and usable by ``keras-maskrcnn evaluate/predict``;
* ``backup/``: the training state of an unfinished run
  (:class:`~keras_maskrcnn.checkpoints.TrainingBackup`: weights,
  optimizer state, epoch and step, every ``backup_every`` steps and after every epoch); the next
  :func:`train` call on the folder resumes from it; removed when the run ends normally;
* ``logs/``: TensorBoard logs (losses; COCO numbers under ``logs/coco_eval``);
* ``history.csv``: the epoch logs;
* ``classes.json``: the label map (see :func:`keras_maskrcnn.label_maps.save_label_map`);
* ``model.keras``: the final model.

Fault tolerance: a run killed at any moment (``SIGKILL`` included) is resumed by running the
same :func:`train` call (or ``keras-maskrcnn train`` command) again: it continues from the last
backup at the same epoch, batch and optimizer step, losing at most ``backup_every`` steps. A NaN
or infinite loss stops training at once (:class:`~keras_maskrcnn.callbacks.StopOnNonFiniteLoss`) with a
``FloatingPointError`` naming the epoch, batch and step; non-finite states are never saved, so
the backup and the newest checkpoint hold the last good weights. Before training, the COCO
training and validation sets are checked (:mod:`keras_maskrcnn.data.validate`) and training
refuses to start while they have errors.

Distributed training (``tf.distribute``): create the model and the optimizer inside
``strategy.scope()`` and pass global batches; see :mod:`keras_maskrcnn.distribute`. Under
``MultiWorkerMirroredStrategy`` only the chief (worker 0) writes the output folder, which must be
on a file system shared by all workers (they all resume from its backup).

This module is the training loop; its parts live by idea in :mod:`keras_maskrcnn.schedules`
(learning-rate schedules), :mod:`keras_maskrcnn.optimizers` (:func:`build_optimizer`),
:mod:`keras_maskrcnn.label_maps`, :mod:`keras_maskrcnn.checkpoints` (checkpoints and backups) and
:mod:`keras_maskrcnn.callbacks`; the names that used to be defined here are still importable from it.

The checkpoints and ``model.keras`` load with ``keras.models.load_model`` in Keras' default
``safe_mode=True`` (no Python code is deserialised); nothing in this package turns it off.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import keras
import tensorflow as tf

from keras_maskrcnn import distribute
from keras_maskrcnn.callbacks import FiniteModelCheckpoint, PruneCheckpoints, StopOnNonFiniteLoss, UnlessStopped
from keras_maskrcnn.callbacks import tensorboard_callback
from keras_maskrcnn.checkpoints import CHECKPOINT_PATTERN, TrainingBackup, latest_checkpoint, read_backup
from keras_maskrcnn.checkpoints import restore_run, step_count
from keras_maskrcnn.data.validate import check_dataset
from keras_maskrcnn.evaluation import CocoEvaluationCallback
from keras_maskrcnn.label_maps import save_label_map, training_label_map
from keras_maskrcnn.optimizers import build_optimizer

# Re-exported: they were defined here before training was split by idea (tests, examples and
# users import them from keras_maskrcnn.train).
from keras_maskrcnn.checkpoints import BACKUP_STATE, restore_backup  # noqa: F401,E402
from keras_maskrcnn.label_maps import load_label_map  # noqa: F401,E402
from keras_maskrcnn.optimizers import OPTIMIZERS  # noqa: F401,E402
from keras_maskrcnn.plan import steps_per_epoch_for  # noqa: F401,E402
from keras_maskrcnn.schedules import SCHEDULES, LinearWarmup  # noqa: F401,E402

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


class _Paths(NamedTuple):
    """The output folder and its parts (layout in the module docstring)."""

    root: str
    checkpoints: str
    backup: str
    logs: str


class _Phase(NamedTuple):
    """One ``fit`` call: epochs ``first`` up to ``last``, ``steps`` per epoch, the first epoch
    already ``offset`` batches in (the rest of an interrupted epoch)."""

    first: int
    last: int
    steps: Optional[int]
    offset: int


# --------------------------------------------------------------------------------------------
# Before training: label map, data, compilation, what is left to do
# --------------------------------------------------------------------------------------------


def _check_data(dataset: Any, val_annotations: Optional[PathLike], val_images: Optional[PathLike]) -> None:
    """:func:`~keras_maskrcnn.data.validate.check_dataset` of the training set (when ``dataset``
    comes from ``coco_dataset``) and of the validation set."""
    from keras_maskrcnn.data.coco import CocoSource

    source = getattr(dataset, "coco_source", None)
    if isinstance(source, CocoSource):
        check_dataset(source.annotation_file, source.image_dir)
    if val_annotations is not None:
        check_dataset(val_annotations, val_images)


def _known_steps(dataset: Any, steps_per_epoch: Optional[int]) -> Optional[int]:
    """Batches per epoch: ``steps_per_epoch``, else the dataset's length when it is known."""
    if steps_per_epoch:
        return int(steps_per_epoch)
    try:
        cardinality = int(dataset.cardinality())
    except (AttributeError, TypeError):
        return None
    return cardinality if cardinality > 0 else None


def _default_optimizer(dataset: Any, epochs: int, steps_per_epoch: Optional[int]) -> keras.optimizers.Optimizer:
    """:func:`build_optimizer` defaults, the step schedule sized by the training length (constant
    after warmup when the length is unknown)."""
    steps = _known_steps(dataset, steps_per_epoch)
    if steps is None:
        return build_optimizer(schedule="constant")
    return build_optimizer(warmup_steps=min(1000, steps), total_steps=epochs * steps)


def _compile(
    model: keras.Model, optimizer: Optional[keras.optimizers.Optimizer], dataset: Any, epochs: int,
    steps_per_epoch: Optional[int],
) -> None:
    """Compile ``model`` (with the default optimizer when it has none) and build its variables
    and the optimizer's. Inside the strategy's scope."""
    if optimizer is None and not getattr(model, "compiled", False):
        optimizer = _default_optimizer(dataset, epochs, steps_per_epoch)
    if optimizer is not None:
        model.compile(optimizer=optimizer)
    # Restoring, and fit under MultiWorkerMirroredStrategy, need the variables of model and optimizer.
    if not model.built:
        model.build(None)
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _phases(
    epoch: int, done_batches: int, epochs: int, dataset: Any, steps_per_epoch: Optional[int]
) -> List[_Phase]:
    """The ``fit`` calls still to make after ``epoch`` epochs and ``done_batches`` batches: the
    rest of an interrupted epoch first, then the epochs."""
    phases = []
    if done_batches and epoch < epochs:
        steps = _known_steps(dataset, steps_per_epoch)
        if steps is None:
            logger.warning("The epoch length is unknown: resuming epoch %d from its start.", epoch + 1)
        elif done_batches >= steps:
            epoch += 1
        else:
            phases.append(_Phase(epoch, epoch + 1, steps - done_batches, done_batches))
            epoch += 1
    if epoch < epochs:
        phases.append(_Phase(epoch, epochs, steps_per_epoch, 0))
    return phases


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _built_in_callbacks(
    paths: _Paths, nan_guard: StopOnNonFiniteLoss, backup: TrainingBackup, resumed: bool,
    evaluation: Optional[keras.callbacks.Callback], keep_checkpoints: Optional[int],
) -> Tuple[List[keras.callbacks.Callback], keras.callbacks.CSVLogger]:
    """The chief's callbacks, in order, and its CSV logger (appended to when resuming)."""
    built_in: List[keras.callbacks.Callback] = [nan_guard]
    if evaluation is not None:
        # Before the checkpoint, TensorBoard and CSV callbacks, so that they see its numbers.
        built_in.append(UnlessStopped(evaluation, nan_guard))
    csv_logger = keras.callbacks.CSVLogger(os.path.join(paths.root, "history.csv"), append=resumed)
    built_in += [
        backup,
        FiniteModelCheckpoint(os.path.join(paths.checkpoints, CHECKPOINT_PATTERN)),
        tensorboard_callback(paths.logs),
        csv_logger,
    ]
    if keep_checkpoints:
        built_in.append(PruneCheckpoints(paths.checkpoints, keep_checkpoints))
    return built_in, csv_logger


def _distributed_input(dataset: tf.data.Dataset, strategy: tf.distribute.Strategy) -> tf.data.Dataset:
    if not distribute.is_multi_worker(strategy):
        return dataset
    # Each worker reads the whole pipeline and keeps its share of every global batch.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def _fit_phases(
    model: keras.Model, data: tf.data.Dataset, phases: Sequence[_Phase], callbacks: List[keras.callbacks.Callback],
    nan_guard: StopOnNonFiniteLoss, backup: Optional[TrainingBackup],
    csv_logger: Optional[keras.callbacks.CSVLogger], verbose: Union[str, int],
) -> keras.callbacks.History:
    """``fit`` each phase in turn; one ``History`` of them all."""
    history = keras.callbacks.History()
    history.history, history.epoch = {}, []
    with distribute.fit_scope(model):
        for index, phase in enumerate(phases):
            nan_guard.batch_offset = phase.offset
            if backup is not None:
                backup.batch_offset = phase.offset
            if index > 0 and csv_logger is not None:
                csv_logger.append = True
            part = model.fit(
                data,
                epochs=phase.last,
                initial_epoch=phase.first,
                steps_per_epoch=phase.steps,
                callbacks=callbacks,
                verbose=verbose,
                shuffle=False,  # the dataset shuffles; Keras would warn that it ignores True
            )
            history.epoch += list(part.epoch)
            for key, values in part.history.items():
                history.history.setdefault(key, []).extend(values)
            history.set_params(part.params)
            history.set_model(model)
            if model.stop_training or nan_guard.stopped_at is not None:
                break
    return history


def _non_finite_error(where: Dict[str, Any], paths: _Paths, chief: bool) -> FloatingPointError:
    """The error for a loss that became NaN or infinite, naming the last good state."""
    good = latest_checkpoint(paths.checkpoints) if chief else None
    kept = read_backup(paths.backup) if chief else None
    return FloatingPointError(
        f"the loss became {where['loss']} at epoch {where['epoch']}, batch {where['batch']} (training step "
        f"{where['step']}), so training stopped and model.keras was not written. The last good state: "
        + (f"the backup of step {kept['step']} in {paths.backup} (running the same command again resumes "
           "from it), " if kept else "")
        + f"checkpoint {good[0] if good else 'none'}. Lower the learning rate or clip gradients "
        "(--lr, --clipnorm)."
    )


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
            :func:`~keras_maskrcnn.optimizers.build_optimizer` defaults are used (warmup of at
            most one epoch, decay at 2/3 and 8/9 of training).
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
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if (val_annotations is None) != (val_images is None):
        raise ValueError("val_annotations and val_images must be given together.")
    root = os.fspath(output_dir)
    paths = _Paths(root, os.path.join(root, "checkpoints"), os.path.join(root, "backup"), os.path.join(root, "logs"))
    strategy = model.distribute_strategy
    # Multi-worker: the chief writes the outputs; every worker restores the chief's backup.
    chief = distribute.is_chief(strategy)

    class_to_category, class_names = training_label_map(dataset, model.num_classes, class_to_category, class_names)
    if validate:
        _check_data(dataset, val_annotations, val_images)
    if chief:
        os.makedirs(paths.checkpoints, exist_ok=True)
        os.makedirs(paths.logs, exist_ok=True)
        save_label_map(os.path.join(root, "classes.json"), class_to_category, class_names)

    with strategy.scope():
        _compile(model, optimizer, dataset, epochs, steps_per_epoch)
        initial_epoch, done_batches, resumed = restore_run(
            model, paths.backup, paths.checkpoints if resume else None, verbose=chief
        )
    if resume and not resumed and chief:
        print(f"Nothing to resume in {root}: starting from scratch.")
    distribute.check_same_on_all_workers(step_count(model), "the training step to start from", strategy)
    phases = _phases(initial_epoch, done_batches, epochs, dataset, steps_per_epoch)
    if initial_epoch >= epochs and chief:
        print(f"Already trained for {initial_epoch} >= {epochs} epochs; only saving the model.")

    nan_guard = StopOnNonFiniteLoss()
    backup, csv_logger, built_in = None, None, [nan_guard]
    if chief:
        backup = TrainingBackup(paths.backup, save_freq=backup_every)
        evaluation = None
        if val_annotations is not None:
            evaluation = CocoEvaluationCallback(
                val_annotations, val_images, every_n_epochs=eval_every, batch_size=eval_batch_size,
                max_images=eval_max_images, log_dir=paths.logs,
            )
        built_in, csv_logger = _built_in_callbacks(paths, nan_guard, backup, resumed, evaluation, keep_checkpoints)
    history = _fit_phases(
        model, _distributed_input(dataset, strategy), phases, built_in + list(callbacks), nan_guard, backup,
        csv_logger, verbose,
    )

    if nan_guard.stopped_at is not None:
        raise _non_finite_error(nan_guard.stopped_at, paths, chief)
    if chief:
        model.save(os.path.join(root, "model.keras"))
        if os.path.isdir(paths.backup):
            shutil.rmtree(paths.backup)  # finished: nothing to resume
    return history


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
