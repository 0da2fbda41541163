"""Loading ``.keras`` files of earlier releases.

keras_maskrcnn 0.1.x kept the RPN head and the mask head as direct sub-layers of the model; since
0.2.0 they live in the stages (``model.rpn.head``, ``model.roi_heads.mask_head``: torchvision's
layout), so Keras' loader does not find their weights in an old file and the model refuses it with
:func:`legacy_format_error`. :func:`load_model` loads both: for an old file it builds the model from
the file's config, writes a weights file in the current layout, fills it from the old file's
weights by path, and loads that. The original file is not touched; ``model.save(path)`` then
writes the current format. The optimizer state of an old file is not restored.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import keras

_WEIGHTS = "model.weights.h5"
_CONFIG = "config.json"
# Current weight path prefix -> the 0.1.x path of the same weights.
_RENAMED = {
    "layers/region_proposal_network/head/": "layers/rpn_head/",
    "layers/ro_i_heads/mask_head/": "layers/mask_head/",
}


def legacy_format_error() -> ValueError:
    return ValueError(
        "This .keras file was saved by keras_maskrcnn 0.1.x, whose weight layout differs (the heads moved "
        "into model.rpn and model.roi_heads). Load it with keras_maskrcnn.saving.load_model(path); "
        "model.save(new_path) then writes the current format."
    )


def _read_config(path: str) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read(_CONFIG))


def is_legacy_file(path: str) -> bool:
    """Whether the ``.keras`` file at ``path`` holds a MaskRCNN saved by 0.1.x."""
    config = _read_config(path)
    build_config = config.get("build_config") or {}
    return config.get("class_name") == "MaskRCNN" and build_config.get("format_version") is None


def _old_path(path: str) -> str:
    for new, old in _RENAMED.items():
        if path.startswith(new):
            return old + path[len(new):]
    return path


def _copy_weights(old_file: str, new_file: str) -> None:
    """Fill every weight of ``new_file`` (current layout) from ``old_file`` (0.1.x layout)."""
    import h5py

    missing = []
    with h5py.File(old_file, "r") as old, h5py.File(new_file, "r+") as new:

        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):
                source = _old_path(name)
                if source not in old or old[source].shape != obj.shape:
                    missing.append(name)
                else:
                    obj[...] = old[source][...]

        new.visititems(copy)
    if missing:
        raise ValueError(f"{old_file}: {len(missing)} weights not found in the 0.1.x file, e.g. {missing[:3]}.")


def load_model(path: str, **kwargs) -> keras.Model:
    """``keras.saving.load_model(path, **kwargs)``, also for MaskRCNN files saved by 0.1.x."""
    if not is_legacy_file(path):
        return keras.saving.load_model(path, **kwargs)
    config = _read_config(path)
    model = keras.saving.deserialize_keras_object({k: v for k, v in config.items() if k != "build_config"})
    model.build()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(path) as archive:
            archive.extract(_WEIGHTS, tmp)
        template = os.path.join(tmp, "current.weights.h5")
        model.save_weights(template)
        _copy_weights(os.path.join(tmp, _WEIGHTS), template)
        model.load_weights(template)
    return model
