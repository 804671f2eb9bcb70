"""How a job process starts and stops: job ids, and cancellation by SIGTERM.

Torch-free: the job entrypoints, ``sparkctl`` and the control plane all use it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

MAX_JOB_ID_LENGTH = 64
JOB_ID_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_JOB_ID_LENGTH - 1}}}$")
# Exit codes of sparkctl and the job entrypoints: done 0, the job failed, bad input, cancelled.
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 1, 2, 130


class JobCancelled(Exception):  # reads as what happened
    """The job was asked to stop (SIGTERM from Ray's job stop, or the user)."""


def new_job_id() -> str:
    return str(uuid.uuid4())


def derived_job_id(parent: str, suffix: str) -> str:
    """``<parent>-<suffix>`` within the 64-character limit, unique per (parent, suffix): when
    too long, the parent is shortened and a hash of the whole id keeps it apart from others
    that share the kept prefix."""
    import hashlib

    full = f"{parent}-{suffix}"
    if len(full) <= MAX_JOB_ID_LENGTH:
        return full
    digest = hashlib.sha1(full.encode()).hexdigest()[:10]
    keep = MAX_JOB_ID_LENGTH - len(digest) - len(suffix) - 2
    return f"{parent[:keep]}-{digest}-{suffix}"


def check_job_id(job_id: str) -> str:
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(
            f"job id {job_id!r}: use 1-64 letters, digits, '-' or '_' (a UUID works), "
            "starting with a letter or digit"
        )
    return job_id


def interrupted_by_cancel(error: BaseException) -> bool:
    """Whether ``error`` came of a :class:`JobCancelled`: a library that catches exceptions
    (MLflow's store does) turns a SIGTERM landing inside it into an error of its own."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, JobCancelled):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def cancel_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (``ray job stop``, ``docker stop``, ``kill``) into :class:`JobCancelled`."""

    def _raise(signum: int, frame: Any) -> None:
        raise JobCancelled(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_after_cancel(code: int = EXIT_CANCELLED) -> NoReturn:
    """Leave the process at once after a cancellation (the MLflow run is already KILLED).

    Ray's fit thread may still sit inside Ray's C++ core worker, which does not survive a
    normal interpreter shutdown; skip it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
