"""keras_maskrcnn.precision: the "auto" decision table on mocked hardware, and the real probes."""
import math

import keras
import pytest

from keras_maskrcnn import precision
from keras_maskrcnn.precision import Hardware, choose_policy, read_cpuinfo

AMD_AVX2 = Hardware("AMD EPYC", frozenset({"sse4_2", "avx", "avx2", "fma"}))
INTEL_AMX = Hardware("Intel(R) Xeon(R) Platinum 8488C",
                     frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))
ZEN4 = Hardware("AMD EPYC 9R14", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SKYLAKE = Hardware("Intel(R) Xeon(R) Gold 6148", frozenset({"avx2", "avx512f"}))
APPLE = Hardware("arm64", frozenset())


def _never(*_):
    raise AssertionError("the micro-benchmark must not run for a CPU without bfloat16 flags")


@pytest.mark.parametrize("hardware", [AMD_AVX2, SKYLAKE, APPLE], ids=["avx2", "avx512-no-bf16", "no-flags"])
def test_cpus_without_native_bfloat16_get_float32_without_measuring(hardware):
    policy, reason = choose_policy(hardware, bfloat16_speedup=_never)
    assert policy == "float32"
    assert "no native bfloat16" in reason and hardware.cpu_model in reason


@pytest.mark.parametrize("hardware", [INTEL_AMX, ZEN4], ids=["amx", "avx512_bf16"])
def test_cpus_with_native_bfloat16_get_it_when_the_measurement_confirms(hardware):
    policy, reason = choose_policy(hardware, bfloat16_speedup=lambda: 6.0)
    assert policy == "mixed_bfloat16"
    assert "6.0x faster" in reason


def test_flags_that_lie_are_caught_by_the_measurement():
    # A hypervisor may pass amx flags without the state: bfloat16 then runs emulated.
    policy, reason = choose_policy(INTEL_AMX, bfloat16_speedup=lambda: 0.1)
    assert policy == "float32"
    assert "treated as emulated" in reason
    # The threshold itself.
    assert choose_policy(INTEL_AMX, lambda: precision.MIN_BFLOAT16_SPEEDUP)[0] == "mixed_bfloat16"
    assert choose_policy(INTEL_AMX, lambda: precision.MIN_BFLOAT16_SPEEDUP - 0.01)[0] == "float32"


def test_a_failing_bfloat16_check_means_float32():
    # oneDNN limited below the CPU's flags (ONEDNN_MAX_CPU_ISA=AVX2 on an AMX CPU) has no bfloat16
    # convolution: the op raises instead of running slowly.
    def fails():
        raise RuntimeError("could not create a primitive descriptor for the convolution\nmore")

    policy, reason = choose_policy(INTEL_AMX, bfloat16_speedup=fails)
    assert policy == "float32"
    assert "failed on this machine (RuntimeError: could not create a primitive descriptor" in reason
    assert "more" not in reason and "treated as emulated" in reason


@pytest.mark.parametrize(
    "capabilities, expected",
    [([(7, 0)], "mixed_float16"), ([(8, 0)], "mixed_float16"), ([(9, 0), (9, 0)], "mixed_float16"),
     ([(6, 1)], "float32"), ([(8, 0), (6, 1)], "float32"), ([(0, 0)], "float32")],
)
def test_gpus_decide_before_the_cpu(capabilities, expected):
    gpus = tuple((f"GPU {i}", c) for i, c in enumerate(capabilities))
    hardware = Hardware(INTEL_AMX.cpu_model, INTEL_AMX.cpu_flags, gpus)
    policy, reason = choose_policy(hardware, bfloat16_speedup=_never)
    assert policy == expected
    assert "compute capability" in reason


def test_read_cpuinfo_takes_the_first_processor():
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
        "flags\t\t: fpu sse2 avx avx2 fma\n\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: amx_bf16\n"
    )
    model, flags = read_cpuinfo(text)
    assert model == "AMD EPYC 7B13"
    assert flags == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert read_cpuinfo("") == ("unknown CPU", frozenset())
    # ARM kernels call the flags "Features".
    assert "bf16" in read_cpuinfo("Features\t: fp asimd bf16\n")[1]


def test_describe_cpu_names_the_extensions():
    assert INTEL_AMX.describe_cpu() == "Intel(R) Xeon(R) Platinum 8488C (avx2, avx512f, avx512_bf16, amx_tile, amx_bf16)"
    assert AMD_AVX2.describe_cpu() == "AMD EPYC (avx2)"


def test_explicit_policies_win_and_bad_ones_are_named():
    for name in precision.POLICIES:
        assert precision.resolve_policy(name) == name
    assert precision.resolve_policy(keras.DTypePolicy("mixed_bfloat16")) == "mixed_bfloat16"
    with pytest.raises(ValueError, match="'bfloat16'"):
        precision.resolve_policy("bfloat16")


def test_auto_and_none_are_resolved_and_logged(monkeypatch, capsys):
    monkeypatch.setattr(precision, "_auto_policy", lambda: ("mixed_bfloat16", "a reason"))
    assert precision.resolve_policy("auto") == "mixed_bfloat16"
    assert precision.resolve_policy(None) == "mixed_bfloat16"
    assert "precision auto -> mixed_bfloat16: a reason" in capsys.readouterr().out


def test_model_accepts_auto(monkeypatch):
    from keras_maskrcnn import MaskRCNN

    monkeypatch.setattr(precision, "_auto_policy", lambda: ("mixed_bfloat16", "test"))
    model = MaskRCNN(num_classes=2, backbone="resnet18", fpn_channels=16, representation_size=16, dtype="auto")
    assert model.dtype_policy.name == "mixed_bfloat16"
    assert model.fpn.dtype_policy.name == "mixed_bfloat16"
    assert model.get_config()["dtype"]["config"]["name"] == "mixed_bfloat16"


def test_real_hardware_probe_and_measurement():
    hardware = precision.detect_hardware()
    assert hardware.cpu_model
    speedup = precision.measure_bfloat16_speedup(size=16, channels=16, repeats=2)
    assert math.isfinite(speedup) and speedup > 0
    policy, reason = choose_policy(hardware)
    assert policy in precision.POLICIES and reason


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE"])
def test_auto_on_this_cpu_with_onednn_limited_below_its_flags(isa):
    """The real check where the flags lie: oneDNN capped below this CPU's bfloat16 extensions
    (what an AVX2-only CPU runs). On a CPU whose flags promise bfloat16, AVX512_CORE runs bfloat16
    emulated (measured 0.29x float32 on an AMX Xeon) and AVX2 has no bfloat16 convolution (it
    raises); on any other CPU the flags decide. Either way "auto" must give float32, not crash."""
    import os
    import subprocess
    import sys

    code = ("from keras_maskrcnn import precision; import sys; "
            "sys.stdout.write('POLICY=' + precision.resolve_policy('auto', log=False))")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, TF_ENABLE_ONEDNN_OPTS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "POLICY=float32" in result.stdout, result.stdout + result.stderr[-3000:]
