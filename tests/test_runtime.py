"""Process-level speed settings set what they say and put things back."""

from __future__ import annotations

import pytest
import torch

from spark_core.runtime import (
    autocast_is_native,
    cudnn_autotuning,
    fastest_precision,
    keep_freed_memory_in_process,
)


@pytest.mark.parametrize("before", [False, True])
def test_cudnn_autotuning_sets_and_restores_the_flag(before: bool) -> None:
    original = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before
    try:
        with cudnn_autotuning():
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is before
        with pytest.raises(RuntimeError), cudnn_autotuning(enabled=False):
            assert torch.backends.cudnn.benchmark is False
            raise RuntimeError("restored on errors too")
        assert torch.backends.cudnn.benchmark is before
    finally:
        torch.backends.cudnn.benchmark = original


def test_cudnn_autotuning_stays_off_when_determinism_was_asked_for() -> None:
    original = torch.backends.cudnn.benchmark
    try:
        with torch.backends.cudnn.flags(enabled=True, deterministic=True), cudnn_autotuning():
            assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = original


def test_malloc_tuning_applies_on_glibc() -> None:
    import platform

    applied = keep_freed_memory_in_process()
    assert applied is (platform.libc_ver()[0] == "glibc")


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_bf16_is_native_exactly_on_cpus_with_avx512_or_amx() -> None:
    import platform

    flags = _cpu_flags()
    if platform.machine() != "x86_64" or flags is None:
        pytest.skip("the CPU flags are read from Linux x86-64's /proc/cpuinfo")
    # oneDNN's bf16 convolutions need AVX-512 (BW, VL, DQ) or AMX; AVX2 alone falls back.
    expected = {"avx512bw", "avx512vl", "avx512dq"} <= flags or "amx_bf16" in flags
    assert autocast_is_native("cpu", torch.bfloat16) is expected
    assert fastest_precision("cpu") == ("bf16" if expected else "fp32")


def test_fp32_is_always_native_and_unknown_devices_never_reduced() -> None:
    assert autocast_is_native("cpu", None) and autocast_is_native("cpu", torch.float32)
    assert autocast_is_native("meta", None)
    assert not autocast_is_native("meta", torch.bfloat16)
    assert not autocast_is_native("cpu", torch.float64)
    if not torch.cuda.is_available():
        assert not autocast_is_native("cuda", torch.bfloat16)
        assert fastest_precision("cuda") == "fp32"
