"""Process-level settings for training speed: glibc's allocator (CPU), cuDNN autotuning (CUDA)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper bound on 64-bit


def keep_freed_memory_in_process() -> bool:
    """Stop glibc from returning activation-sized blocks to the OS after every step.

    By default blocks above a (dynamic) threshold are ``mmap``-ed and unmapped on free,
    so each training step faults in and zeroes its activations again: measured here,
    10-30 % of a CPU step. Returns False where glibc is not available (other platforms).
    """
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        libc = ctypes.CDLL(path)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    logger.debug("glibc mallopt applied: %s", ok)
    return bool(ok)


@contextlib.contextmanager
def cudnn_autotuning(enabled: bool = True) -> Iterator[None]:
    """Let cuDNN time its convolution algorithms per input shape and keep the fastest.

    SparK trains at one fixed input size, so the one-off search on the first step pays
    back on every later one (the reference sets it too). The choice may differ between
    processes, so it stays off when the process asked for determinism
    (``torch.use_deterministic_algorithms`` or ``cudnn.deterministic``): use that for
    bitwise-reproducible GPU runs. Restores the previous setting.
    """
    previous = torch.backends.cudnn.benchmark
    deterministic = (
        torch.are_deterministic_algorithms_enabled() or torch.backends.cudnn.deterministic
    )
    torch.backends.cudnn.benchmark = enabled and not deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
