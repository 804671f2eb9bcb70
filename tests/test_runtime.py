"""Process-level speed settings set what they say and put things back."""

from __future__ import annotations

import pytest
import torch

from spark_core.runtime import cudnn_autotuning, keep_freed_memory_in_process


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
