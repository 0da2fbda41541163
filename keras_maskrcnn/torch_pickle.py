"""Reading ``torch.save`` files without PyTorch, with a restricted unpickler.

A ``.pth`` / ``.pt`` written by ``torch.save`` (PyTorch >= 1.6, the default zip format) is a zip
archive ``<archive>/data.pkl`` (a pickle of the saved object), ``<archive>/data/<key>`` (the raw
bytes of each storage), ``<archive>/byteorder`` (``little`` / ``big``) and ``<archive>/version``.
:func:`load_torch_file` reads it into the same structure ``torch.load(path, weights_only=True)``
returns, with every tensor a numpy array (a copy; dtype kept, except ``bfloat16``, which numpy
lacks, becomes ``float32`` exactly: every bfloat16 value is a float32 value).

**What the pickle may contain.** Unpickling runs the callables a file names, so this reader refuses
every global except these, in :meth:`_Unpickler.find_class`, before anything is called:

* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor_v3`` / ``_rebuild_parameter``: replaced
  by our own functions that check their arguments and build numpy arrays;
* storage type tags ``torch.{Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,Bool}Storage``,
  ``torch.UntypedStorage`` / ``torch.storage.UntypedStorage`` and the matching ``torch.<dtype>``
  names (float32, float64, float16, bfloat16, int64, int32, int16, int8, uint8, bool): inert
  markers, not callable;
* ``collections.OrderedDict`` (state dicts and the empty hook dicts).

Plain pickle values (dict, list, tuple, str, bytes, int, float, bool, None, set) need no global and
pass through, so training checkpoints (``{"model": ..., "epoch": 3}``) load too. Anything else
(``os.system``, ``builtins.eval``, ``numpy`` arrays pickled inside a checkpoint, ``argparse.Namespace``,
TorchScript's ``__torch__`` classes, quantized tensors) raises :class:`TorchFileError` naming the
global and the file; nothing has run by then.

**Why this is safe.** Pickle can only call what ``find_class`` returns (REDUCE, NEWOBJ, INST/OBJ,
extension codes all go through it), and what it returns here is a frozen wrapper of one of our
functions or of ``OrderedDict``, or an inert tag; none of them can be mutated through BUILD (which
otherwise only sets attributes such as ``_metadata`` on the ``OrderedDict`` instances it made).
Storages are read only from ``<archive>/data/<key>`` entries of the same zip (keys are checked to be
plain names), their size must equal what the pickle declares, and every tensor's offset, shape and
strides are checked to lie inside its storage before ``numpy.lib.stride_tricks.as_strided`` views
it (an out-of-range view would read foreign memory), and the view is copied (a zero-stride
``expand`` view is materialised; a ``neg`` view bit is applied).

Files in the legacy (pre-1.6, or ``_use_new_zipfile_serialization=False``) format are not read:
re-save them with a current PyTorch or convert them to ``.safetensors``.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile
from typing import Any

import numpy as np

__all__ = ["TorchFileError", "load_torch_file"]


class TorchFileError(pickle.UnpicklingError, ValueError):
    """A torch file that is refused (an unsafe global) or cannot be read (format, bad tensor)."""


# torch dtype name -> numpy dtype name; bfloat16 is read as its 16 raw bits ("uint16" + flag).
_DTYPES = {
    "float32": "float32", "float64": "float64", "float16": "float16", "bfloat16": "uint16",
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
}
_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64",
                  "int": "int32", "short": "int16"}
_KEY = re.compile(r"^[A-Za-z0-9_]+$")


class _Frozen:
    """Base of the objects ``find_class`` hands out: slots, no ``__dict__``, no attribute setting
    (so the pickle BUILD opcode cannot change them)."""

    __slots__ = ()

    def __init__(self, **values):
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise TorchFileError(f"refused: setting attribute {name!r} on {self!r}")

    __delattr__ = __setattr__


class _Tag(_Frozen):
    """An inert marker for a storage type (``kind="storage"``, ``dtype=None`` for untyped) or a dtype."""

    __slots__ = ("kind", "dtype", "name")

    def __repr__(self):
        return self.name


class _Callable(_Frozen):
    __slots__ = ("name", "fn")

    def __call__(self, *args):
        try:
            return self.fn(*args)
        except TypeError as e:
            raise TorchFileError(f"bad arguments to {self.name}: {e}") from None

    def __repr__(self):
        return self.name


class _Storage:
    """The bytes of one ``data/<key>`` entry, viewed as elements of a dtype on demand."""

    def __init__(self, raw: np.ndarray, dtype: str | None, key: str, big_endian: bool):
        self.raw, self.dtype, self.key, self.big_endian = raw, dtype, key, big_endian
        self._views: dict[str, np.ndarray] = {}

    def elements(self, dtype: str) -> np.ndarray:
        if self.dtype is not None and dtype != self.dtype:
            raise TorchFileError(f"storage {self.key} holds {self.dtype}, a tensor reads it as {dtype}")
        if dtype not in self._views:
            np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder(">" if self.big_endian else "<")
            usable = len(self.raw) - len(self.raw) % np_dtype.itemsize
            self._views[dtype] = self.raw[:usable].view(np_dtype).astype(np_dtype.newbyteorder("="), copy=False)
        return self._views[dtype]


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise TorchFileError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return value


def _rebuild(storage, offset, size, stride, dtype, hooks, metadata) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"a tensor's storage must be a persistent storage record, got {type(storage).__name__}")
    if type(offset) is not int or offset < 0:
        raise TorchFileError(f"tensor storage offset must be a non-negative int, got {offset!r}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise TorchFileError(f"tensor size {size} and stride {stride} differ in length")
    if hooks:  # torch never saves hooks (always an empty OrderedDict)
        raise TorchFileError("refused: a tensor with backward hooks")
    metadata = dict(metadata or {})
    neg = metadata.pop("neg", False)
    if any(metadata.values()):
        raise TorchFileError(f"unsupported tensor metadata {metadata!r}")
    elements = storage.elements(dtype)
    if 0 in size:
        out = np.empty(size, elements.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= len(elements):
            raise TorchFileError(
                f"tensor (offset {offset}, size {size}, stride {stride}) reaches element {last} of storage "
                f"{storage.key}, which has {len(elements)}"
            )
        view = np.lib.stride_tricks.as_strided(
            elements[offset:], shape=size, strides=tuple(s * elements.itemsize for s in stride), writeable=False
        )
        out = np.array(view, copy=True)
    if dtype == "bfloat16":  # the upper 16 bits of a float32
        out = (out.astype(np.uint32) << 16).view(np.float32)
    if neg:
        if dtype == "bool":
            raise TorchFileError("a negated bool tensor")
        out = np.negative(out)
    return out


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    dtype = storage.dtype if isinstance(storage, _Storage) else None
    if dtype is None:
        raise TorchFileError("_rebuild_tensor_v2 needs a typed storage")
    return _rebuild(storage, offset, size, stride, dtype, hooks, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not (isinstance(dtype, _Tag) and dtype.kind == "dtype"):
        raise TorchFileError(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r}")
    return _rebuild(storage, offset, size, stride, dtype.dtype, hooks, metadata)


def _rebuild_parameter(data, requires_grad, hooks):
    if not isinstance(data, np.ndarray):
        raise TorchFileError(f"_rebuild_parameter needs a tensor, got {type(data).__name__}")
    if hooks:
        raise TorchFileError("refused: a parameter with backward hooks")
    return data


def _allowed_globals() -> dict[tuple[str, str], _Frozen]:
    allowed: dict[tuple[str, str], _Frozen] = {}
    for fn in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter):
        allowed[("torch._utils", fn.__name__)] = _Callable(name=f"torch._utils.{fn.__name__}", fn=fn)
    allowed[("collections", "OrderedDict")] = _Callable(name="collections.OrderedDict", fn=collections.OrderedDict)
    for name, dtype in _STORAGES.items():
        allowed[("torch", name)] = _Tag(kind="storage", dtype=dtype, name=f"torch.{name}")
    for module in ("torch", "torch.storage"):
        allowed[(module, "UntypedStorage")] = _Tag(kind="storage", dtype=None, name=f"{module}.UntypedStorage")
    for name in [*_DTYPES, *_DTYPE_ALIASES]:
        allowed[("torch", name)] = _Tag(kind="dtype", dtype=_DTYPE_ALIASES.get(name, name), name=f"torch.{name}")
    return allowed


_ALLOWED = _allowed_globals()


class _Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`_ALLOWED` globals and reads storages from the zip."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, big_endian: bool, path: str):
        super().__init__(file)
        self.archive, self.prefix, self.big_endian, self.path = archive, prefix, big_endian, path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise TorchFileError(
                f"{self.path}: refused to load global '{module}.{name}': only tensors, storages, "
                "OrderedDict and plain Python values are read from PyTorch files (nothing was executed)"
            )
        return allowed

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFileError(f"{self.path}: refused persistent id {pid!r} (expected a storage record)")
        _, tag, key, _location, numel = pid
        if not (isinstance(tag, _Tag) and tag.kind == "storage"):
            raise TorchFileError(f"{self.path}: storage type {tag!r} is not a supported storage type")
        if not (isinstance(key, str) and _KEY.match(key)) or type(numel) is not int or numel < 0:
            raise TorchFileError(f"{self.path}: malformed storage record {pid!r}")
        if key in self.storages:
            return self.storages[key]
        entry = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(entry)
        except KeyError:
            raise TorchFileError(f"{self.path}: storage {entry!r} is missing from the archive") from None
        nbytes = numel * (np.dtype(_DTYPES[tag.dtype]).itemsize if tag.dtype else 1)
        if info.file_size != nbytes:
            raise TorchFileError(f"{self.path}: storage {entry!r} has {info.file_size} bytes, expected {nbytes}")
        raw = np.frombuffer(self.archive.read(entry), dtype=np.uint8)
        storage = self.storages[key] = _Storage(raw, tag.dtype, key, self.big_endian)
        return storage


def _legacy_error(path: str) -> TorchFileError:
    return TorchFileError(
        f"{path}: not a zip-format torch.save file (the legacy format of PyTorch < 1.6 or "
        "_use_new_zipfile_serialization=False, or not a PyTorch file), which is read only by PyTorch "
        "itself. Re-save it with a current PyTorch (torch.save(torch.load(path, weights_only=True), "
        "new_path)) or convert it to .safetensors (safetensors.torch.save_file)."
    )


def load_torch_file(path: str | os.PathLike) -> Any:
    """The object saved in a zip-format ``torch.save`` file, with tensors as numpy arrays.

    What ``torch.load(path, weights_only=True)`` returns, with each tensor (and ``nn.Parameter``)
    replaced by a numpy copy of it (bfloat16 as float32) and ``OrderedDict`` kept. No PyTorch is
    needed or imported. Raises :class:`TorchFileError` (a ``ValueError`` and a
    ``pickle.UnpicklingError``) for a refused global, naming it and the file, for a legacy-format
    file and for a malformed one. See the module docstring for what is accepted.
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise _legacy_error(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        prefix = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
        if f"{prefix}data.pkl" not in names:
            pickles = [n for n in names if n.endswith("data.pkl")]
            if len(pickles) != 1:
                raise TorchFileError(f"{path}: a zip file without one <archive>/data.pkl is not a torch.save file")
            prefix = pickles[0][: -len("data.pkl")]
        order = archive.read(f"{prefix}byteorder") if f"{prefix}byteorder" in names else b"little"
        if order not in (b"little", b"big"):
            raise TorchFileError(f"{path}: unknown byteorder {order!r}")
        unpickler = _Unpickler(io.BytesIO(archive.read(f"{prefix}data.pkl")), archive, prefix, order == b"big", path)
        try:
            return unpickler.load()
        except TorchFileError as e:
            if str(e).startswith(f"{path}: "):
                raise
            raise TorchFileError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError) as e:
            raise TorchFileError(f"{path}: not a readable torch.save pickle ({type(e).__name__}: {e})") from None
