"""Reading PyTorch state dicts: files of several formats into plain ``{name: array}`` dicts, and
the renaming of the published torchvision checkpoints' legacy key names to current ones."""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from keras_maskrcnn.torch_pickle import load_torch_file


def to_numpy(value: Any) -> np.ndarray:
    """A numpy copy of a numpy array or torch tensor (on any device, with or without grad)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    return np.asarray(value)



_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_state_dict(source: Any) -> dict[str, Any]:
    """A state dict as a plain ``dict``, from a mapping, a ``torch.nn.Module`` or a file.

    Files: ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` (zip-format ``torch.save`` files) are read
    without PyTorch by :func:`keras_maskrcnn.torch_pickle.load_torch_file`, a restricted unpickler
    that accepts only tensors, storages, ``OrderedDict`` and plain values and refuses any other
    pickled global before it runs (the same arrays as ``torch.load(path, weights_only=True)``;
    bfloat16 becomes float32); ``.safetensors`` with ``safetensors.numpy.load_file``; ``.npz`` with
    numpy (no pickle).
    A training checkpoint holding the weights under ``"model"`` or ``"state_dict"`` is unwrapped,
    and a ``"module."`` prefix on every key (``DataParallel``) is removed.
    """
    if hasattr(source, "state_dict") and callable(source.state_dict):
        source = source.state_dict()
    elif isinstance(source, (str, os.PathLike)):
        source = _read_file(os.fspath(source))
    if not isinstance(source, Mapping):
        raise TypeError(
            f"Expected a state dict (mapping of names to arrays) or a file path, got {type(source).__name__}."
        )
    for wrapper in ("model", "state_dict"):
        inner = source.get(wrapper)
        if isinstance(inner, Mapping) and not hasattr(inner, "shape"):
            source = inner
            break
    state = dict(source)
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _read_file(path: str) -> Mapping[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such state dict file: {path!r}")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError(f"Reading {path!r} needs the 'safetensors' package (pip install safetensors).") from e
        return load_file(path)
    if lower.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if lower.endswith(_TORCH_SUFFIXES):
        return load_torch_file(path)  # restricted unpickler, no PyTorch needed
    raise ValueError(
        f"Unknown state dict file type {path!r}: expected .pth / .pt (PyTorch), .safetensors or .npz."
    )



# Key names of the published torchvision checkpoints (before its modules became nn.Sequential)
# and the current ones; torchvision renames them the same way in `_load_from_state_dict`.
_LEGACY_KEYS = (
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), lambda m: f"{m[1]}.0.{m[2]}"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), lambda m: f"rpn.head.conv.0.0.{m[1]}"),
    (
        re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}",
    ),
)

def canonical_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Rename the published checkpoints' legacy keys to current torchvision names.

    ``rpn.head.conv.weight`` -> ``rpn.head.conv.0.0.weight``, ``backbone.fpn.inner_blocks.0.weight``
    -> ``backbone.fpn.inner_blocks.0.0.weight`` (and ``layer_blocks``),
    ``roi_heads.mask_head.mask_fcn1.weight`` -> ``roi_heads.mask_head.0.0.weight``. Returns the
    renamed dict and ``{new name: original name}`` for the renamed keys. A legacy key whose new
    name is also present is kept as is (and so reported as unexpected).
    """
    renamed: dict[str, Any] = {}
    original: dict[str, str] = {}
    for key in state_dict:
        for pattern, replace in _LEGACY_KEYS:
            match = pattern.match(key)
            if match:
                new = replace(match)
                if new not in state_dict:
                    renamed[new] = state_dict[key]
                    original[new] = key
                    break
        else:
            renamed[key] = state_dict[key]
    return renamed, original
