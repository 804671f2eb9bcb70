"""/proc helpers: finding, titling and killing process trees."""

from __future__ import annotations

import os
import subprocess
import time

from orchestrator.processes import alive, descendants, kill, kill_tree, titled


def _wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_titled_finds_retitled_children_and_kill_tree_stops_them() -> None:
    # A shell whose child renames itself, as Ray names a trial driver "ray::ImplicitFunc".
    parent = subprocess.Popen(["bash", "-c", "(exec -a ray::FakeTrial sleep 60) & wait"])
    try:
        assert _wait_until(lambda: titled("ray::FakeTrial", below=os.getpid()))
        (child,) = titled("ray::FakeTrial", below=os.getpid())
        assert child in descendants(parent.pid)
        assert parent.pid not in titled("ray::FakeTrial", below=os.getpid())  # bash's title
        assert titled("bash", below=os.getpid()) >= {parent.pid}
        kill_tree(parent.pid)
        parent.wait(timeout=10)
        assert _wait_until(lambda: not alive({parent.pid, child}))
    finally:
        if parent.poll() is None:
            kill_tree(parent.pid)
            parent.wait(timeout=10)


def test_kill_ignores_processes_that_are_gone() -> None:
    finished = subprocess.Popen(["true"])
    finished.wait(timeout=10)
    kill([finished.pid])  # reaped: no such process, and no error
    assert not alive({finished.pid})
