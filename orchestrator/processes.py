"""Process trees from Linux's /proc: what the stack, the rehearsal and their tests stop."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path


def _state_and_parent(pid_dir: Path) -> tuple[str, int] | None:
    try:
        # The command name (field 2) may hold spaces and parentheses: split after the last ")".
        fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def descendants(pid: int) -> set[int]:
    """Every live (not zombie) process below ``pid``."""
    parents: dict[int, int] = {}
    for pid_dir in Path("/proc").glob("[0-9]*"):
        found = _state_and_parent(pid_dir)
        if found is not None and found[0] != "Z":
            parents[int(pid_dir.name)] = found[1]
    tree: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return tree


def alive(pids: set[int]) -> set[int]:
    """The processes of ``pids`` that still run (zombies count as gone)."""
    live = set()
    for pid in pids:
        found = _state_and_parent(Path(f"/proc/{pid}"))
        if found is not None and found[0] != "Z":
            live.add(pid)
    return live


def titled(prefix: str, below: int) -> set[int]:
    """Processes below ``below`` whose command line starts with ``prefix``.

    Ray retitles its workers, e.g. ``ray::ImplicitFunc`` for a Tune trial's driver.
    """
    found = set()
    for pid in descendants(below):
        with suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(prefix.encode()):
                found.add(pid)
    return found


def kill(pids: Iterable[int]) -> None:
    """SIGKILL each of ``pids`` that still exists."""
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it (what losing a machine looks like)."""
    kill([pid, *descendants(pid)])
