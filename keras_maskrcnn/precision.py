"""Compute precision: chosen from the hardware (``"auto"``), or set by the user.

Weights are always stored in float32; a Keras dtype policy only sets the compute dtype. So a model
trained in ``mixed_bfloat16`` can be served in float32 and the other way round, and a
``mixed_float16`` copy runs on a GPU, with exactly the same weights.

``"auto"`` picks the policy that is fastest without losing accuracy on the machine it runs on:

=====================================================  ==================  ============================
hardware                                               policy              why
=====================================================  ==================  ============================
NVIDIA GPU, compute capability >= 7.0 (tensor cores)   ``mixed_float16``   float16 tensor cores
other GPU (older NVIDIA, ROCm)                         ``float32``         no fast float16 path known
CPU with AMX or AVX512_BF16, confirmed by measurement  ``mixed_bfloat16``  native bfloat16 (AMX: ~8x)
any other CPU (AVX2-only x86, Apple, other ARM)        ``float32``         bfloat16 is emulated there:
                                                                           about 10x *slower*
=====================================================  ==================  ============================

The CPU flags come from ``/proc/cpuinfo`` (Linux; elsewhere none are read and the CPU gets
float32). Flags can say more than the machine delivers (a hypervisor that passes the flag but
not the state, a kernel without AMX support), so a CPU whose flags promise bfloat16 must also
run a small bfloat16 convolution at least :data:`MIN_BFLOAT16_SPEEDUP` times faster than in
float32 before ``"auto"`` picks it. On GPUs of compute capability >= 8.0 bfloat16 would also be
possible; it has not been measured here, so ``"auto"`` keeps float16 (with loss scaling) there.

An explicit policy always wins: ``"auto"`` is resolved only where it is asked for.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Optional, Tuple

import keras

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
AUTO = "auto"
# Emulated bfloat16 runs the check's convolution at about 0.1x float32; native at 1.7-2.0x
# (AVX512_BF16, Zen 4, idle) to 4-8x (AMX). Under load from two training processes on the 2-core
# Zen 4 the check read 1.3-3.2x (25 runs) with both dtypes alternating, 1.2-3.7x (10 runs) when each
# dtype ran as a block (the former method, against a threshold of 1.5 that it missed now and then).
MIN_BFLOAT16_SPEEDUP = 1.2
# /proc/cpuinfo flags of native bfloat16 arithmetic (Intel AMX since Sapphire Rapids; AVX512_BF16
# on Cooper Lake, Sapphire Rapids and AMD Zen 4+). oneDNN uses either for bfloat16 convolutions.
BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Flags named in the log line so it says what the CPU has.
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")

logger = logging.getLogger("keras_maskrcnn")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What ``"auto"`` decides on: the CPU's model name and flags, the visible GPUs."""

    cpu_model: str = "unknown CPU"
    cpu_flags: frozenset = frozenset()
    # (name, (major, minor)) of each visible GPU; (0, 0) when the capability is unknown (ROCm).
    gpus: Tuple[Tuple[str, Tuple[int, int]], ...] = ()

    def describe_cpu(self) -> str:
        """``"AMD EPYC (avx2)"``: the model name and the vector/matrix extensions present."""
        present = [f for f in REPORTED_CPU_FLAGS if f in self.cpu_flags]
        return f"{self.cpu_model} ({', '.join(present) or 'none of ' + '/'.join(REPORTED_CPU_FLAGS)})"


def native_bfloat16(hardware: "Hardware") -> bool:
    """Whether ``hardware``'s CPU flags promise native bfloat16 (AMX or AVX512_BF16)."""
    return any(f in hardware.cpu_flags for f in BFLOAT16_CPU_FLAGS)


def machine_summary(hardware: Optional["Hardware"] = None) -> str:
    """One line naming the machine for benchmark results: CPU model and extensions, cores, GPUs,
    and whether bfloat16 is native or emulated on the CPU."""
    import os

    hardware = hardware or detect_hardware()
    bf16 = "bfloat16 native" if native_bfloat16(hardware) else "bfloat16 emulated (no AMX/AVX512_BF16)"
    gpus = "; GPUs: " + ", ".join(f"{n} (cc {c[0]}.{c[1]})" for n, c in hardware.gpus) if hardware.gpus else ", no GPU"
    return f"{hardware.describe_cpu()}, {os.cpu_count()} cores, {bf16}{gpus}"


def read_cpuinfo(text: str) -> Tuple[str, frozenset]:
    """Model name and flags of the first processor in a ``/proc/cpuinfo`` text."""
    model, flags = "unknown CPU", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # "Features" on ARM
            flags = frozenset(value.split())
    return model, flags


def detect_hardware() -> Hardware:
    """The CPU (``/proc/cpuinfo`` where it exists) and the GPUs TensorFlow sees."""
    import platform

    import tensorflow as tf

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu_model, cpu_flags = read_cpuinfo(f.read())
    except OSError:
        cpu_model, cpu_flags = platform.processor() or platform.machine() or "unknown CPU", frozenset()
    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = tuple(details.get("compute_capability") or (0, 0))
        gpus.append((details.get("device_name", device.name), capability))
    return Hardware(cpu_model, cpu_flags, tuple(gpus))


def measure_bfloat16_speedup(size: int = 56, channels: int = 128, repeats: int = 7) -> float:
    """float32 time / bfloat16 time of a 3x3 convolution on this CPU (best of ``repeats`` each).

    About 0.2 s in all. Above 1 where bfloat16 is native (about 4-8x with AMX, 1.7-2x with
    AVX512_BF16 on Zen 4), below 1 where it is emulated (about 0.1x on AVX2-only CPUs). The two
    dtypes alternate, so that other work on a shared machine slows both alike, and the best time of
    each is kept (the least disturbed run).
    """
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.standard_normal([1, size, size, channels]).astype(np.float32)
    w = rng.standard_normal([3, 3, channels, channels]).astype(np.float32)
    dtypes = (tf.float32, tf.bfloat16)
    times = {dtype: [] for dtype in dtypes}
    with tf.device("/CPU:0"):
        conv = tf.function(lambda a, b: tf.nn.conv2d(a, b, 1, "SAME"))
        inputs = {dtype: (tf.cast(x, dtype), tf.cast(w, dtype)) for dtype in dtypes}
        for dtype in dtypes:
            conv(*inputs[dtype]).numpy()  # trace and warm up
        for _ in range(repeats):
            for dtype in dtypes:
                start = time.perf_counter()
                conv(*inputs[dtype]).numpy()
                times[dtype].append(time.perf_counter() - start)
    return min(times[tf.float32]) / max(min(times[tf.bfloat16]), 1e-9)


def choose_policy(hardware: Hardware, bfloat16_speedup=measure_bfloat16_speedup) -> Tuple[str, str]:
    """The policy ``"auto"`` means on ``hardware``, and why (one sentence).

    ``bfloat16_speedup`` is called (no arguments) only for a CPU whose flags promise native
    bfloat16; tests pass a stub. If it raises (oneDNN limited below the CPU's flags has no
    bfloat16 convolution), the CPU gets float32.
    """
    if hardware.gpus:
        name, capability = hardware.gpus[0]
        if all(c >= (7, 0) for _, c in hardware.gpus):
            return "mixed_float16", f"GPU {name} has compute capability {capability[0]}.{capability[1]} >= 7.0 (float16 tensor cores)"
        return "float32", f"GPU {name} has compute capability {capability[0]}.{capability[1]} < 7.0 (no float16 tensor cores)"
    cpu = hardware.describe_cpu()
    native = [f for f in BFLOAT16_CPU_FLAGS if f in hardware.cpu_flags]
    if not native_bfloat16(hardware):
        return "float32", f"CPU {cpu} has no native bfloat16 (neither AMX nor AVX512_BF16): bfloat16 would be emulated, about 10x slower"
    try:
        speedup = bfloat16_speedup()
    except Exception as error:  # noqa: BLE001 - any failure of the check means: not native here
        # Seen where the flags promise bfloat16 but oneDNN may not use it (ONEDNN_MAX_CPU_ISA=AVX2):
        # oneDNN then has no bfloat16 convolution at all and the op raises.
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        return "float32", (f"CPU {cpu} lists {', '.join(native)}, but a bfloat16 convolution failed on this "
                           f"machine ({type(error).__name__}: {first_line}): treated as emulated")
    if speedup >= MIN_BFLOAT16_SPEEDUP:
        return "mixed_bfloat16", f"CPU {cpu} has native bfloat16 ({', '.join(native)}; a bfloat16 convolution ran {speedup:.1f}x faster than float32)"
    return "float32", (f"CPU {cpu} lists {', '.join(native)}, but a bfloat16 convolution ran only {speedup:.2f}x "
                       f"as fast as float32 (< {MIN_BFLOAT16_SPEEDUP}x): treated as emulated")


@functools.lru_cache(maxsize=None)
def _auto_policy() -> Tuple[str, str]:
    return choose_policy(detect_hardware())


def resolve_policy(policy: Optional[str], log: bool = True) -> str:
    """``policy`` itself, or for ``"auto"`` (and ``None``) the policy this machine should use.

    The decision is made once per process (the micro-benchmark, where needed, runs once) and
    logged at INFO on the ``keras_maskrcnn`` logger, and printed, with its reason.
    """
    if policy is not None and policy != AUTO:
        name = policy.name if isinstance(policy, keras.DTypePolicy) else str(policy)
        if name not in POLICIES:
            raise ValueError(f"precision must be 'auto' or one of {POLICIES}, got {policy!r}.")
        return name
    chosen, reason = _auto_policy()
    if log:
        message = f"keras_maskrcnn precision auto -> {chosen}: {reason}"
        logger.info(message)
        print(message, flush=True)
    return chosen


def set_global_policy(policy: Optional[str] = AUTO) -> str:
    """``keras.mixed_precision.set_global_policy`` that also accepts ``"auto"``; returns the policy set."""
    chosen = resolve_policy(policy)
    keras.mixed_precision.set_global_policy(chosen)
    return chosen


def with_dtype_policy(model, policy: str):
    """A new :class:`~keras_maskrcnn.MaskRCNN` with ``model``'s configuration and weights, computing in ``policy``.

    Args:
        model: a built ``MaskRCNN`` (any policy).
        policy: ``"float32"``, ``"mixed_bfloat16"``, ``"mixed_float16"`` or ``"auto"``.

    Example:

    ```python
    fast = with_dtype_policy(model, "mixed_bfloat16")
    outputs = fast(images)  # same weights, bfloat16 convolutions
    ```
    """
    from keras_maskrcnn.model import MaskRCNN  # the model module imports this one

    if not model.built:
        model.build()
    config = model.get_config()
    config["dtype"] = keras.DTypePolicy(resolve_policy(policy))
    clone = MaskRCNN.from_config(config)
    clone.build()
    clone.set_weights(model.get_weights())
    return clone
