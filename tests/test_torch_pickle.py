"""keras_maskrcnn.torch_pickle: torch.save files read without PyTorch, and unsafe pickles refused.

Files written by real PyTorch (in the reference environment, ``tests/tvref.py``) are compared with
``torch.load(path, weights_only=True)`` there. Hand-written files (no torch anywhere) cover byte
order, ``_rebuild_tensor_v3`` and malformed records; malicious pickles (``os.system``,
``builtins.eval``) must be refused with their side effect not having happened.
"""
import collections
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

import tvref
from keras_maskrcnn.state_dicts import read_state_dict
from keras_maskrcnn.torch_pickle import TorchFileError, load_torch_file

# ---------------------------------------------------------------- files made by real PyTorch

_REFERENCE = """
import collections
path = {path!r}

def out(prefix, mapping):
    for k, v in mapping.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().resolve_neg()
            outputs[prefix + k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        else:
            outputs[prefix + k] = np.asarray(v)

g = torch.Generator().manual_seed(0)
t = {{
    "float32": torch.randn(3, 4, generator=g),
    "float64": torch.randn(5, generator=g, dtype=torch.float64),
    "float16": torch.randn(2, 3, generator=g).half(),
    "bfloat16": torch.cat([torch.randn(7, generator=g),
                           torch.tensor([float("inf"), -0.0, float("nan"), 1e-40, -3e38])]).bfloat16(),
    "int64": torch.randint(-2**62, 2**62, (6,), generator=g, dtype=torch.int64),
    "int32": torch.randint(-2**31, 2**31 - 1, (2, 3), generator=g, dtype=torch.int32),
    "int16": torch.randint(-2**15, 2**15 - 1, (4,), generator=g, dtype=torch.int16),
    "int8": torch.randint(-128, 127, (4,), generator=g, dtype=torch.int8),
    "uint8": torch.randint(0, 255, (3, 2), generator=g, dtype=torch.uint8),
    "bool": torch.rand(9, generator=g) > 0.5,
    "param": torch.nn.Parameter(torch.randn(3, generator=g)),
    "scalar": torch.tensor(3.5),
    "scalar_int": torch.tensor(-7),
    "empty": torch.empty(0),
    "empty_2d": torch.empty(2, 0, 3),
    "empty_bool": torch.empty(0, 4, dtype=torch.bool),
}}
base = torch.arange(48, dtype=torch.float32).reshape(6, 8) * 0.5 - 3
b3 = torch.randn(2, 3, 4, generator=g)
ints = torch.arange(20, dtype=torch.int64).reshape(4, 5)
bf = torch.randn(4, 6, generator=g).bfloat16()
# views sharing one storage each: offsets, strides, transposes, overlaps, zero strides, a neg bit
t.update({{
    "base": base, "t": base.t(), "slice": base[1:5:2, 3:], "column": base[:, 2], "row": base[4],
    "overlap": torch.as_strided(base, (3, 3), (1, 1), 5), "expand": base[2:3].expand(4, 8),
    "permuted": b3.permute(2, 0, 1), "b3_tail": b3[1, 1:, ::3],
    "ints_t": ints.t(), "ints_slice": ints[1:, ::2], "bf_t": bf.t(), "bf_slice": bf[1:3, 2::2],
    "bool_view": t["bool"][1::3], "neg": torch._neg_view(base[1]),
}})
torch.save(t, path + "/tensors.pth")
out("tensors|", torch.load(path + "/tensors.pth", weights_only=True))

fpn = torchvision.ops.FeaturePyramidNetwork([8, 16, 32], 8)
resnet = torchvision.models.resnet18(weights=None)
sd = collections.OrderedDict((f"fpn.{{k}}", v) for k, v in fpn.state_dict().items())
sd.update((f"body.{{k}}", v) for k, v in resnet.state_dict().items())
sd["body.bn1.running_mean"].uniform_(-1, 1, generator=g)
sd._metadata = resnet.state_dict()._metadata  # as a module's state_dict() has (pickle BUILD)
torch.save(sd, path + "/sd.pth")
loaded = torch.load(path + "/sd.pth", weights_only=True)
assert isinstance(loaded, collections.OrderedDict)
out("sd|", loaded)
torch.save({{"model": sd, "epoch": 3, "optimizer": {{"lr": 0.02, "momentum": [0.9]}}}}, path + "/ckpt.pth")
ckpt = torch.load(path + "/ckpt.pth", weights_only=True)
out("ckpt|model|", ckpt["model"])
outputs["ckpt|epoch"] = np.asarray(ckpt["epoch"])
torch.save(sd, path + "/legacy.pth", _use_new_zipfile_serialization=False)
"""


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    if not tvref.available():
        return None  # the tests using it are skipped, or failed by requires_torchvision
    folder = tmp_path_factory.mktemp("torch_files")
    reference = tvref.run(_REFERENCE.format(path=str(folder)))
    return folder, reference


def _expected(reference, prefix):
    return {k[len(prefix):]: v for k, v in reference.items() if k.startswith(prefix)}


def _assert_same(ours, expected):
    assert list(ours) == list(expected)
    for name, want in expected.items():
        got = ours[name]
        assert isinstance(got, np.ndarray), name
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape, want.dtype, want.shape)
        np.testing.assert_array_equal(got, want, err_msg=name)


@tvref.requires_torchvision
def test_tensors_of_every_dtype_and_views_match_torch_load(torch_files):
    folder, reference = torch_files
    ours = load_torch_file(folder / "tensors.pth")
    _assert_same(ours, _expected(reference, "tensors|"))
    assert ours["bfloat16"].dtype == np.float32 and ours["bool"].dtype == np.bool_
    assert ours["scalar"].shape == () and ours["empty_2d"].shape == (2, 0, 3)
    np.testing.assert_array_equal(ours["t"], ours["base"].T)  # views of one storage, copied apart
    ours["t"][0, 0] = 99.0
    assert ours["base"][0, 0] != 99.0


@tvref.requires_torchvision
def test_torchvision_state_dict_and_checkpoint_match_torch_load(torch_files):
    folder, reference = torch_files
    expected = _expected(reference, "sd|")
    sd = load_torch_file(folder / "sd.pth")
    assert isinstance(sd, collections.OrderedDict) and sd._metadata[""] == {"version": 1}
    _assert_same(sd, expected)
    _assert_same(read_state_dict(folder / "sd.pth"), expected)

    ckpt = load_torch_file(folder / "ckpt.pth")
    assert ckpt["epoch"] == 3 and ckpt["optimizer"] == {"lr": 0.02, "momentum": [0.9]}
    _assert_same(ckpt["model"], _expected(reference, "ckpt|model|"))
    _assert_same(read_state_dict(folder / "ckpt.pth"), expected)  # "model" unwrapped


@tvref.requires_torchvision
def test_legacy_torch_file_says_what_to_do(torch_files):
    folder, _ = torch_files
    with pytest.raises(ValueError, match=r"not a zip-format torch.save file.*\.safetensors"):
        read_state_dict(folder / "legacy.pth")


# ---------------------------------------------------------------- hand-written files (no torch)

def _str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(i):
    return b"J" + struct.pack("<i", i)


def _tuple(items):
    return b"(" + b"".join(_int(i) for i in items) + b"t"


def _global(module, name):
    return f"c{module}\n{name}\n".encode()


def _tensor(storage_cls, key, numel, offset, size, stride, v3_dtype=None):
    """Pickle opcodes of what torch.save writes for a tensor."""
    fn = "_rebuild_tensor_v3" if v3_dtype else "_rebuild_tensor_v2"
    pid = b"(" + _str("storage") + _global("torch", storage_cls) + _str(key) + _str("cpu") + _int(numel) + b"tQ"
    hooks = _global("collections", "OrderedDict") + b")R"
    dtype = _global("torch", v3_dtype) if v3_dtype else b""
    args = pid + _int(offset) + _tuple(size) + _tuple(stride) + b"\x89" + hooks + dtype  # \x89: requires_grad False
    return _global("torch._utils", fn) + b"(" + args + b"tR"


def _state_dict_pickle(entries):
    body = b"".join(_str(name) + tensor for name, tensor in entries.items())
    return b"\x80\x02" + _global("collections", "OrderedDict") + b")R(" + body + b"u."


def _write(path, data_pkl, storages=None, byteorder=b"little"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", b"3\n")
    return path


@pytest.mark.parametrize("order", ["little", "big"])
def test_hand_written_file_in_either_byte_order(tmp_path, order):
    e = "<" if order == "little" else ">"
    floats = np.arange(12, dtype=np.float32) - 5.5
    ints = np.array([2**40, -3, 7], dtype=np.int64)
    data = _state_dict_pickle({
        "w": _tensor("FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
        "w_t": _tensor("FloatStorage", "0", 12, 1, (3, 2), (1, 4)),
        "n": _tensor("LongStorage", "1", 3, 1, (), ()),
        "i": _tensor("LongStorage", "1", 3, 0, (3,), (1,)),
    })
    path = _write(tmp_path / "w.pth", data, {"0": floats.astype(e + "f4").tobytes(), "1": ints.astype(e + "i8").tobytes()},
                  order.encode())
    sd = read_state_dict(path)
    np.testing.assert_array_equal(sd["w"], floats.reshape(3, 4))
    np.testing.assert_array_equal(sd["w_t"], floats.reshape(3, 4)[:2, 1:4].T)
    assert sd["n"].shape == () and sd["n"] == -3 and sd["i"].dtype == np.int64
    np.testing.assert_array_equal(sd["i"], ints)
    assert all(v.dtype.isnative for v in sd.values())


def test_rebuild_tensor_v3_untyped_bfloat16(tmp_path):
    values = np.array([1.5, -2.0, 1.5 * 2.0**127, 2.0**-130], dtype=np.float32)  # all exact in bfloat16
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    data = _state_dict_pickle({"x": _tensor("UntypedStorage", "0", len(raw), 1, (3,), (1,), v3_dtype="bfloat16")})
    x = load_torch_file(_write(tmp_path / "v3.pt", data, {"0": raw}))["x"]
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, values[1:])


@pytest.mark.parametrize(
    "tensor, storage, match",
    [
        (_tensor("FloatStorage", "0", 4, 0, (100,), (1,)), 16, "reaches element 99 of storage 0, which has 4"),
        (_tensor("FloatStorage", "0", 4, 3, (2, 2), (0, 1)), 16, "reaches element 4"),
        (_tensor("FloatStorage", "0", 4, 0, (2,), (1,)), 12, "has 12 bytes, expected 16"),
        (_tensor("FloatStorage", "../../x", 4, 0, (2,), (1,)), 16, "malformed storage record"),
        (_tensor("FloatStorage", "7", 4, 0, (2,), (1,)), 16, "storage 'archive/data/7' is missing"),
        (_tensor("ComplexFloatStorage", "0", 2, 0, (2,), (1,)), 16, "refused to load global 'torch.ComplexFloatStorage'"),
        (_tensor("UntypedStorage", "0", 16, 0, (2,), (1,), v3_dtype="uint16"), 16, "refused to load global 'torch.uint16'"),
    ],
)
def test_malformed_tensor_records_are_refused(tmp_path, tensor, storage, match):
    path = _write(tmp_path / "bad.pth", _state_dict_pickle({"x": tensor}), {"0": bytes(storage)})
    with pytest.raises(TorchFileError, match=match) as info:
        read_state_dict(path)
    assert str(info.value).startswith(str(path))


# ---------------------------------------------------------------- malicious files

class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


def _payloads(marker):
    return {
        "os.system": _System(f"touch {marker}"),
        "builtins.eval": _Eval(f"open({str(marker)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_malicious_zip_pickle_is_refused_before_it_runs(tmp_path, protocol, kind):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[kind]
    fn = payload.__reduce__()[0]
    # posix.system (nt.system on Windows); builtins.eval, written __builtin__.eval by protocol 2
    name = f"{fn.__module__}.{fn.__name__}".replace("builtins", "__builtin__" if protocol < 3 else "builtins")
    data = pickle.dumps({"model": {"epoch": 3, "hook": payload}}, protocol=protocol)  # inside a checkpoint
    path = _write(tmp_path / "evil.pth", data, {"0": bytes(16)})
    with pytest.raises(TorchFileError, match=rf"refused to load global '{name}'") as info:
        read_state_dict(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, pickle.UnpicklingError)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_malicious_payload_after_a_tensor_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_System(f"touch {marker}"), protocol=2)[2:-1]  # the opcodes, no PROTO/STOP
    data = _state_dict_pickle({"w": _tensor("FloatStorage", "0", 4, 0, (4,), (1,)), "x": evil})
    with pytest.raises(TorchFileError, match=r"refused to load global '(posix|nt)\.system'"):
        load_torch_file(_write(tmp_path / "evil.pth", data, {"0": bytes(16)}))
    assert not marker.exists()


def test_allowed_globals_cannot_be_modified_by_build(tmp_path):
    for state in (b"}" + _str("fn") + b"Ns", b"(N}" + _str("fn") + b"Nst"):  # __dict__ state, slot state
        data = b"\x80\x02" + _global("torch._utils", "_rebuild_parameter") + state + b"b."
        with pytest.raises(TorchFileError):
            load_torch_file(_write(tmp_path / "build.pth", data))
    data = _state_dict_pickle({"w": _tensor("FloatStorage", "0", 4, 0, (4,), (1,))})
    np.testing.assert_array_equal(load_torch_file(_write(tmp_path / "ok.pth", data, {"0": bytes(16)}))["w"], np.zeros(4))


def test_legacy_pickle_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    for i, payload in enumerate([{"w": [1.0]}, _System(f"touch {marker}")]):
        path = tmp_path / f"legacy{i}.pth"
        path.write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(ValueError, match=r"not a zip-format torch.save file.*current PyTorch.*\.safetensors"):
            read_state_dict(path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(TorchFileError, match="not a zip-format"):
        read_state_dict(tmp_path / "empty.pt")
    assert not marker.exists()


def test_payloads_do_run_under_plain_pickle(tmp_path):
    """Control: the payloads above are live (plain ``pickle.loads`` runs them), so the absent
    marker files there mean they were refused, not that they were harmless."""
    for kind, payload in _payloads(tmp_path / "ran").items():
        pickle.loads(pickle.dumps(payload, protocol=2))
        assert (tmp_path / "ran").exists(), kind
        (tmp_path / "ran").unlink()
