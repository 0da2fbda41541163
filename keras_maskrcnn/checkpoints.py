"""What a training run keeps on disk: epoch checkpoints and the backup of an unfinished run.

* Checkpoints: ``epoch-NNN.keras`` (the full model with its optimizer state, after epoch ``NNN``)
  in one folder; :func:`find_checkpoints` is the one place that recognises them (the newest:
  :func:`latest_checkpoint`; pruning the oldest: :func:`prune_checkpoints`).
* The backup (:class:`TrainingBackup`, read back by :func:`read_backup` and
  :func:`restore_backup`): weights, optimizer state, epoch and position in the epoch, written
  every few steps so that a killed run resumes where it stopped.
* Resuming (:func:`restore_run`): from the backup, else from the newest checkpoint.

States whose loss is not finite (:func:`finite_loss`) are never saved, so the newest backup and
checkpoint always hold the last good weights.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import keras

from keras_maskrcnn import distribute

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
CHECKPOINT_PATTERN = "epoch-{epoch:03d}.keras"
_CHECKPOINT_RE = re.compile(r"^epoch-(\d+)\.keras$")
BACKUP_STATE = "state.json"


# --------------------------------------------------------------------------------------------
# Epoch checkpoints
# --------------------------------------------------------------------------------------------


def find_checkpoints(directory: PathLike) -> List[Tuple[int, str]]:
    """``(epoch, path)`` of every ``epoch-NNN.keras`` in ``directory``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(os.fspath(directory), "epoch-*.keras")):
        match = _CHECKPOINT_RE.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: PathLike) -> Optional[Tuple[str, int]]:
    """``(path, epoch)`` of the newest ``epoch-NNN.keras`` in ``directory``, or None."""
    found = find_checkpoints(directory)
    if not found:
        return None
    epoch, path = found[-1]
    return path, epoch


def prune_checkpoints(directory: PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` ``epoch-NNN.keras`` files of ``directory``."""
    found = find_checkpoints(directory)
    for _, path in found[: max(len(found) - keep, 0)]:
        os.remove(path)


# --------------------------------------------------------------------------------------------
# Backups
# --------------------------------------------------------------------------------------------


def step_count(model: keras.Model) -> Optional[int]:
    """The optimizer's step counter (works for distributed variables too); None without one."""
    if model.optimizer is None:
        return None
    return int(model.optimizer.iterations.numpy())


def finite_loss(logs: Optional[Mapping[str, Any]]) -> bool:
    """False when ``logs["loss"]`` exists and is NaN or infinite."""
    value = (logs or {}).get("loss")
    if value is None:
        return True
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


class TrainingBackup(keras.callbacks.Callback):
    """Backs up the training state every ``save_freq`` training steps and after every epoch, so
    that a run killed at any moment (even ``SIGKILL``) resumes from the last backup.

    The folder holds ``state-<step>.weights.h5`` (model and optimizer variables, step counter
    included) and ``state.json`` (``{"weights": ..., "epoch": E, "batch": B, "step": S}``: ``B``
    batches of the 0-based epoch ``E`` were done). ``state.json`` is replaced atomically after the
    weights file is complete, and older weights files are deleted only then, so the folder always
    holds one complete state. States whose loss is not finite are not saved.
    :func:`read_backup` and :func:`restore_backup` read it back;
    :func:`keras_maskrcnn.train.train` uses them.

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
        if not self.save_freq or not finite_loss(logs):
            return
        step = step_count(self.model)
        if step % self.save_freq == 0:
            self.save(self._epoch, self.batch_offset + batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        offset, self.batch_offset = self.batch_offset, 0
        if not finite_loss(logs):
            return
        planned = (self.params or {}).get("steps")
        if planned and self._batches < planned:  # stopped early (a callback): the epoch is not done
            self.save(epoch, offset + self._batches)
        else:
            self.save(epoch + 1, 0)

    def save(self, epoch: int, batch: int) -> str:
        """Write the current state as ``batch`` batches done in epoch ``epoch``; returns its path."""
        os.makedirs(self.backup_dir, exist_ok=True)
        step = step_count(self.model)
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


def restore_run(
    model: keras.Model, backup_dir: PathLike, checkpoint_dir: Optional[PathLike] = None, verbose: bool = True
) -> Tuple[int, int, bool]:
    """Restore an earlier run into ``model`` (built, with a built optimizer; inside the strategy's
    scope): the backup of an interrupted run in ``backup_dir``, else, when ``checkpoint_dir`` is
    given, the newest checkpoint there (weights and optimizer; the epoch from its name).
    ``verbose``: print what was restored.

    Returns:
        ``(epoch, batch, resumed)``: ``epoch`` epochs and then ``batch`` batches of the next were
        done; ``(0, 0, False)`` when there was nothing to restore.
    """
    backup_dir = os.fspath(backup_dir)
    # Loading creates variables, which multi-worker strategies broadcast: all workers or none.
    has_backup = os.path.isfile(os.path.join(backup_dir, BACKUP_STATE))
    distribute.check_same_on_all_workers(
        int(has_backup), "whether there is a backup to resume from", model.distribute_strategy
    )
    state = restore_backup(model, backup_dir)
    if state is not None:
        logger.info("Resuming from the backup in %s.", backup_dir)
        if verbose:
            print(
                f"Resuming the interrupted run from {backup_dir}: epoch {state['epoch'] + 1}, after batch "
                f"{state['batch']} (training step {state['step']})"
            )
        return state["epoch"], state["batch"], True
    checkpoint = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint is None:
        return 0, 0, False
    path, epoch = checkpoint
    model.load_weights(path)
    if verbose:
        print(f"Resuming from {path} (epoch {epoch}, training step {step_count(model)})")
    return epoch, 0, True


__all__ = [
    "BACKUP_STATE",
    "CHECKPOINT_PATTERN",
    "TrainingBackup",
    "find_checkpoints",
    "finite_loss",
    "latest_checkpoint",
    "prune_checkpoints",
    "read_backup",
    "restore_backup",
    "restore_run",
    "step_count",
]
