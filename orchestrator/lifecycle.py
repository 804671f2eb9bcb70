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

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Exit codes of sparkctl and the job entrypoints: done 0, the job failed, bad input, cancelled.
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 1, 2, 130


class JobCancelled(Exception):  # reads as what happened
    """The job was asked to stop (SIGTERM from Ray's job stop, or the user)."""


def new_job_id() -> str:
    return str(uuid.uuid4())


def check_job_id(job_id: str) -> str:
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(
            f"job id {job_id!r}: use 1-64 letters, digits, '-' or '_' (a UUID works), "
            "starting with a letter or digit"
        )
    return job_id


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
