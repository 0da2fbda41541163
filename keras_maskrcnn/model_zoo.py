"""Presets with weights: torchvision's published Mask R-CNN checkpoints, fetched, verified,
converted once and cached (KerasHub's ``from_preset`` style).

    >>> from keras_maskrcnn import MaskRCNN
    >>> model = MaskRCNN.from_preset("maskrcnn_resnet50_fpn_v2_coco")           # COCO, 91 slots
    >>> finetune = MaskRCNN.from_preset("maskrcnn_resnet50_fpn_v2_coco", num_classes=3)

The file is downloaded with Keras' own file cache (``keras.utils.get_file``, under
``~/.keras/keras_maskrcnn`` or ``$KERAS_HOME``) and verified as torchvision verifies it: the hex
digits after the last ``-`` of the file name are a prefix of the file's SHA-256. A file that does
not match is moved aside (``*.bad``) and never used. The converted weights are cached next to it
(``<name>.weights.h5``), so later loads need no network and no conversion. Offline or behind a
proxy, the error names the URL and the exact path to put the file at by hand.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import keras

from keras_maskrcnn import presets

CACHE_SUBDIR = "keras_maskrcnn"

# torchvision's _COCO_CATEGORY_NAMES: the 91 class slots of its COCO models (index = class id);
# "N/A" marks the 10 ids in 1..90 that COCO 2017 does not use; slot 0 is the background.
COCO_CLASS_NAMES: Tuple[str, ...] = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet",
    "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
assert len(COCO_CLASS_NAMES) == 91


@dataclasses.dataclass(frozen=True)
class Preset:
    """One published checkpoint: where it is, what it is, and how it preprocesses.

    ``box_ap`` / ``mask_ap`` are the COCO val2017 numbers torchvision publishes for it (``None``
    for backbones); ``config`` the ``MaskRCNN`` arguments of its architecture (preprocessing:
    ``image_mean``, ``image_std``, ``min_size``, ``max_size`` included).
    """

    name: str
    url: str
    description: str
    config: Dict[str, Any]
    box_ap: Optional[float] = None
    mask_ap: Optional[float] = None
    class_names: Tuple[str, ...] = COCO_CLASS_NAMES
    kind: str = "maskrcnn"  # or "backbone" (ImageNet weights of the ResNet alone)

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> Optional[str]:
        """torchvision's rule: the hex digits between the last ``-`` and the extension."""
        match = re.search(r"-([a-f0-9]+)\.", self.file_name)
        return match.group(1) if match else None


_TV = "https://download.pytorch.org/models/"
PRESETS: Dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "maskrcnn_resnet50_fpn_coco",
            _TV + "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
            "torchvision's maskrcnn_resnet50_fpn (v1), COCO train2017",
            presets.torchvision_maskrcnn_resnet50_fpn_config(),
            box_ap=37.9,
            mask_ap=34.6,
        ),
        Preset(
            "maskrcnn_resnet50_fpn_v2_coco",
            _TV + "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
            "torchvision's maskrcnn_resnet50_fpn_v2 (batch norm in FPN and heads), COCO train2017",
            presets.torchvision_maskrcnn_resnet50_fpn_v2_config(),
            box_ap=47.4,
            mask_ap=41.8,
        ),
        Preset(
            "resnet50_imagenet",
            _TV + "resnet50-0676ba61.pth",
            "torchvision's ResNet-50 (IMAGENET1K_V1) backbone",
            presets.torchvision_maskrcnn_resnet50_fpn_config(backbone="resnet50"),
            kind="backbone",
        ),
        Preset(
            "resnet101_imagenet",
            _TV + "resnet101-63fe2227.pth",
            "torchvision's ResNet-101 (IMAGENET1K_V1) backbone",
            presets.torchvision_maskrcnn_resnet50_fpn_config(backbone="resnet101"),
            kind="backbone",
        ),
    )
}


def list_presets() -> List[Dict[str, Any]]:
    """One dict per preset: name, description, kind, COCO box/mask AP as published, URL."""
    return [
        {"name": p.name, "description": p.description, "kind": p.kind, "box_ap": p.box_ap, "mask_ap": p.mask_ap,
         "url": p.url}
        for p in PRESETS.values()
    ]


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available: {', '.join(PRESETS)}.")
    return PRESETS[name]


def cache_dir() -> str:
    """Where Keras' file cache keeps this package's downloads."""
    return os.path.join(os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras")), CACHE_SUBDIR)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str, preset: Preset) -> None:
    """Raise (and move the file aside as ``*.bad``) unless its SHA-256 starts with the preset's prefix."""
    prefix = preset.hash_prefix
    if prefix is None:
        return
    found = sha256_of(path)
    if not found.startswith(prefix):
        bad = path + ".bad"
        os.replace(path, bad)
        raise ValueError(
            f"{path}: wrong or truncated download of preset {preset.name!r}: expected a SHA-256 starting with "
            f"{prefix}, found {found}. The file was moved to {bad} and not used; download it again."
        )


def fetch(preset: Preset) -> str:
    """The verified local checkpoint file of ``preset``, downloaded on first use."""
    target = os.path.join(cache_dir(), preset.file_name)
    if not os.path.exists(target):
        os.makedirs(cache_dir(), exist_ok=True)
        try:
            target = keras.utils.get_file(
                preset.file_name, origin=preset.url, cache_subdir="", cache_dir=cache_dir()
            )
        except Exception as e:  # offline, proxy, HTTP error: say where to put the file by hand
            raise OSError(
                f"Could not download preset {preset.name!r} from {preset.url} ({type(e).__name__}: {e}). "
                f"Offline or behind a proxy? Download that URL by hand and put the file at {target}."
            ) from e
    verify(target, preset)
    return target


def converted_path(preset: Preset) -> str:
    return os.path.join(cache_dir(), f"{preset.name}.weights.h5")


def from_preset(name: str, num_classes: Optional[int] = None, **model_kwargs: Any) -> keras.Model:
    """A ``MaskRCNN`` with the preset's weights (see the module docstring); ``num_classes=N`` gives
    new box and mask predictors for fine-tuning to ``N`` classes, everything else kept. For a
    backbone preset, a ``MaskRCNN`` (``num_classes`` required) whose ResNet holds the ImageNet weights."""
    from keras_maskrcnn.convert import from_torchvision, load_torchvision_resnet, reset_predictors
    from keras_maskrcnn.model import MaskRCNN

    preset = get_preset(name)
    if preset.kind == "backbone":
        if num_classes is None:
            raise ValueError(f"Preset {name!r} holds a backbone only: pass num_classes.")
        model = MaskRCNN(num_classes=num_classes, **{**preset.config, **model_kwargs})
        model.build()
        load_torchvision_resnet(model.backbone, fetch(preset))
        return model
    cached = converted_path(preset)
    classes = len(preset.class_names) - 1
    if os.path.exists(cached):
        model = MaskRCNN(num_classes=classes, **{**preset.config, **model_kwargs})
        model.build()
        model.load_weights(cached)
    else:
        model = from_torchvision(fetch(preset), verbose=False, **model_kwargs)
        model.save_weights(cached)  # converted once: later loads need neither network nor conversion
    if num_classes is None or num_classes == classes:
        return model
    finetune = MaskRCNN.from_config({**model.get_config(), "num_classes": num_classes})
    finetune.build()
    _copy_all_but_predictors(model, finetune)
    reset_predictors(finetune)
    return finetune


def _copy_all_but_predictors(source: keras.Model, target: keras.Model) -> None:
    """Copy every variable whose shape matches by path (the class-dependent predictors do not)."""
    by_path = {v.path.split("/", 1)[-1]: v for v in source.weights}
    for variable in target.weights:
        twin = by_path.get(variable.path.split("/", 1)[-1])
        if twin is not None and tuple(twin.shape) == tuple(variable.shape):
            variable.assign(twin)
