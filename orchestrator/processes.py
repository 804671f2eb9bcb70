"""Process trees and marked processes, on psutil: what the stack, its watchdog, the
rehearsal and their tests find and stop.

A *marker* is an environment variable (``NAME=VALUE``, the value unique to one owner) that
the owner sets in its own environment before it starts anything: every process started
below it inherits the variable, including the ones that leave its process tree (a process
whose parent dies is re-parented). ``marked`` finds them again. The watchdog (``python -m
orchestrator.processes watch``, see ``start_watchdog``) stops them when the owner dies,
whatever killed it, together with every process it saw below the owner: a process that
retitles itself (Ray's agents and workers, ``ray::IDLE``) may wipe its environment block,
marker included, and is found that way instead.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import suppress

import psutil

logger = logging.getLogger(__name__)

# <linux/prctl.h>: deliver a signal to this process when its parent (thread) exits.
PR_SET_PDEATHSIG = 1
WATCH_POLL_S = 0.5


def _running(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs (a zombie has finished; only its exit status is left)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def descendants(pid: int) -> set[int]:
    """Every live (not zombie) process below ``pid``."""
    proc = _process(pid)
    if proc is None:
        return set()
    try:
        children = proc.children(recursive=True)
    except psutil.Error:
        return set()
    return {child.pid for child in children if _running(child)}


def alive(pids: Iterable[int]) -> set[int]:
    """The processes of ``pids`` that still run (zombies count as gone)."""
    return {pid for pid in pids if (proc := _process(pid)) is not None and _running(proc)}


def _command_line(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def titled(prefix: str, below: int) -> set[int]:
    """Processes below ``below`` whose command line starts with ``prefix``.

    Ray retitles its workers, e.g. ``ray::ImplicitFunc`` for a Tune trial's driver.
    """
    return {
        pid
        for pid in descendants(below)
        if (proc := _process(pid)) is not None and _command_line(proc).startswith(prefix)
    }


def kill(pids: Iterable[int]) -> None:
    """SIGKILL each of ``pids`` that still exists."""
    for pid in pids:
        proc = _process(pid)
        if proc is not None:
            with suppress(psutil.Error):  # gone meanwhile: nothing left to kill
                proc.kill()


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it (what losing a machine looks like)."""
    kill([pid, *descendants(pid)])


def _environ_has(pid: int, entry: bytes) -> bool:
    """Whether ``entry`` (``NAME=VALUE``) is in the environment ``pid`` was started with.

    Read from /proc rather than with psutil's ``environ()``: setproctitle (Ray's agents and
    workers) zeroes the environment block from its start to make room for the new title (all
    of a short block), and psutil's parser stops at the first empty entry, so it would miss
    the entries that survive after it.
    """
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return entry in handle.read().split(b"\0")
    except OSError:
        return False  # gone, or another user's: not ours either way


def marked(name: str, value: str, exclude: Iterable[int] = ()) -> list[psutil.Process]:
    """Live processes started with ``name=value`` in their environment (this user's only)."""
    skip = {os.getpid(), *exclude}
    entry = f"{name}={value}".encode()
    return [
        proc
        for proc in psutil.process_iter()
        if proc.pid not in skip and _environ_has(proc.pid, entry) and _running(proc)
    ]


def _with_descendants(procs: Iterable[psutil.Process]) -> dict[int, psutil.Process]:
    """``procs`` that still run and every live process below them, by pid."""
    found = {}
    for proc in procs:
        if not _running(proc):
            continue  # psutil compares start times: a reused pid is not ``proc``
        found[proc.pid] = proc
        with suppress(psutil.Error):
            found.update((child.pid, child) for child in proc.children(recursive=True))
    return found


def stop(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM ``procs``, then SIGKILL those still running after ``grace`` seconds."""
    for proc in procs:
        with suppress(psutil.Error):
            proc.terminate()
    _, survivors = psutil.wait_procs(procs, timeout=grace)
    for proc in survivors:
        with suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(survivors, timeout=grace)


def reap(
    name: str,
    value: str,
    known: Iterable[psutil.Process] = (),
    grace: float = 5.0,
    timeout: float = 30.0,
    exclude: Iterable[int] = (),
) -> int:
    """Stop every process marked ``name=value``, and ``known`` with their descendants.

    Returns how many were stopped. Sweeps until a sweep finds none: a process may start
    another while it is stopped (a raylet starting a worker), and the next sweep catches it.
    """
    skip = {os.getpid(), *exclude}
    deadline = time.monotonic() + timeout
    known = list(known)
    count = 0
    while targets := _targets(name, value, known, skip):
        for proc in targets:
            logger.info("stopping %s", describe(proc))
        # Later sweeps only find latecomers, started while the first ones were stopping.
        stop(targets, grace if count == 0 else min(grace, 0.5))
        count += len(targets)
        if time.monotonic() > deadline:
            left = [proc.pid for proc in _targets(name, value, known, skip)]
            if left:
                logger.error("%d processes survived: %s", len(left), left)
            break
    return count


def _targets(
    name: str, value: str, known: list[psutil.Process], skip: set[int]
) -> list[psutil.Process]:
    found = _with_descendants(known)
    found.update((proc.pid, proc) for proc in marked(name, value, skip))
    return [proc for pid, proc in found.items() if pid not in skip]


def listening(pids: Iterable[int]) -> set[tuple[str, int, int]]:
    """``(address, port, pid)`` of every listening TCP socket of ``pids``."""
    found = set()
    for pid in pids:
        proc = _process(pid)
        if proc is None:
            continue
        try:
            connections = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        found |= {
            (conn.laddr.ip, conn.laddr.port, pid)
            for conn in connections
            if conn.status == psutil.CONN_LISTEN
        }
    return found


def port_holders(port: int) -> list[psutil.Process]:
    """This user's processes listening on TCP ``port`` (other users' cannot be named)."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return []
    pids = {
        conn.pid
        for conn in connections
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid
    }
    return [proc for pid in sorted(pids) if (proc := _process(pid)) is not None]


def describe(proc: psutil.Process) -> str:
    """``pid 123: <command line>``, for messages."""
    line = " ".join(_command_line(proc).split())  # one line, even for ``python -c "..."``
    return f"pid {proc.pid}: {line[:160] or '?'}"


def set_parent_death_signal(sig: int, libc: ctypes.CDLL | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux's
    ``PR_SET_PDEATHSIG``); False when the call failed. ``libc`` already loaded, for use in a
    forked child (loading a library there can deadlock)."""
    libc = libc or ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies.

    Linux's PR_SET_PDEATHSIG fires when the *thread* that started the child exits: start the
    child from the main thread. libc is loaded here, before the fork, because loading a
    library in a forked child can deadlock.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        if not set_parent_death_signal(sig, libc):
            os._exit(126)
        # The parent may have died before prctl: then no signal would ever come.
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def start_watchdog(name: str, value: str) -> subprocess.Popen:
    """Start a watchdog that stops every process marked ``name=value`` once this one dies.

    It learns of the death from its stdin, a pipe only this process holds: the kernel
    closes it however this process ends (SIGKILL included). Closing ``.stdin`` ends it too,
    after the same sweep. It runs in a session of its own, so the terminal's Ctrl-C (which
    signals the whole foreground process group) leaves it alive to do its sweep, and it does
    not carry the marker itself.
    """
    env = {key: val for key, val in os.environ.items() if key != name}
    command = [sys.executable, "-m", "orchestrator.processes", "watch"]
    return subprocess.Popen(
        [*command, "--parent", str(os.getpid()), "--marker", f"{name}={value}"],
        stdin=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )


def _wait_for_parent(parent: psutil.Process) -> list[psutil.Process]:
    """Until stdin reaches end of file or ``parent`` no longer runs.

    Returns every process seen below ``parent`` meanwhile (looked at each poll): the ones
    that lose the marker from their environment are still found this way.
    """
    seen: dict[int, psutil.Process] = {}
    while _running(parent):
        # Forget the ones that ended (a long-lived owner starts many short-lived workers).
        seen = {pid: proc for pid, proc in seen.items() if _running(proc)}
        seen.update(_with_descendants([parent]))
        readable, _, _ = select.select([sys.stdin.buffer], [], [], WATCH_POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break
    seen.pop(parent.pid, None)
    return list(seen.values())


def watch(parent_pid: int, name: str, value: str, grace: float) -> int:
    """The watchdog: wait for ``parent_pid`` to die or hang up, then reap what it started."""
    parent = _process(parent_pid)
    known = _wait_for_parent(parent) if parent is not None else []
    died = parent is None or not _running(parent)
    count = reap(name, value, known, grace=grace, exclude=[parent_pid])
    if died and count:
        logger.warning(
            "process %d died; stopped the %d processes it had started", parent_pid, count
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.processes watch ...``: the watchdog ``start_watchdog`` starts."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.processes")
    commands = parser.add_subparsers(dest="command", required=True)
    watcher = commands.add_parser("watch", help="reap a process's marked processes when it dies")
    watcher.add_argument("--parent", type=int, required=True)
    watcher.add_argument("--marker", required=True, help="NAME=VALUE")
    watcher.add_argument("--grace", type=float, default=3.0, help="seconds from SIGTERM to SIGKILL")
    args = parser.parse_args(argv)
    name, sep, value = args.marker.partition("=")
    if not (name and sep and value):
        parser.error("--marker must be NAME=VALUE")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s watchdog: %(message)s")
    # A Ctrl-C meant for the owner must not cut the sweep short (the watchdog has a session
    # of its own, so only a Ctrl-C sent to its process group on purpose arrives here).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return watch(args.parent, name, value, args.grace)


if __name__ == "__main__":
    raise SystemExit(main())
