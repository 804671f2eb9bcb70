"""Process trees and marked processes, on psutil: what the stack, its watchdog, the
rehearsal and their tests find and stop.

A *marker* is an environment variable (``NAME=VALUE``, the value unique to one owner) that
the owner sets in its own environment before it starts anything: every process started
below it inherits the variable, including the ones that leave its process tree (Ray's
agents and workers are re-parented when their parent dies). ``marked`` finds them again,
and the watchdog (``python -m orchestrator.processes watch``) stops them when the owner dies,
whatever killed it.
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
WATCH_POLL_S = 1.0


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


def marked(name: str, value: str, exclude: Iterable[int] = ()) -> list[psutil.Process]:
    """Live processes whose environment holds ``name=value`` (other users' are unreadable)."""
    skip = {os.getpid(), *exclude}
    found = []
    for proc in psutil.process_iter():
        if proc.pid in skip:
            continue
        try:
            if proc.environ().get(name) == value and _running(proc):
                found.append(proc)
        except psutil.Error:
            continue  # gone, a zombie, or another user's: not ours either way
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


def reap_marked(
    name: str, value: str, grace: float = 5.0, timeout: float = 30.0, exclude: Iterable[int] = ()
) -> int:
    """Stop every process marked ``name=value``; returns how many were found.

    Sweeps until a sweep finds none: a process may start another while it is stopped (a
    raylet starting a worker), and the second sweep catches it.
    """
    deadline = time.monotonic() + timeout
    count = 0
    while procs := marked(name, value, exclude):
        for proc in procs:
            logger.info("stopping %s (pid %d)", _command_line(proc)[:120], proc.pid)
        # Later sweeps only find latecomers, started while the first ones were stopping.
        stop(procs, grace if count == 0 else min(grace, 0.5))
        count += len(procs)
        if time.monotonic() > deadline:
            left = [proc.pid for proc in marked(name, value, exclude)]
            if left:
                logger.error("%d marked processes survived: %s", len(left), left)
            break
    return count


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
    return f"pid {proc.pid}: {_command_line(proc)[:160] or '?'}"


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies.

    Linux's PR_SET_PDEATHSIG fires when the *thread* that started the child exits: start the
    child from the main thread. libc is loaded here, before the fork, because loading a
    library in a forked child can deadlock.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
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


def _wait_for_parent(parent: psutil.Process) -> None:
    """Until stdin reaches end of file or ``parent`` no longer runs."""
    while _running(parent):
        readable, _, _ = select.select([sys.stdin.buffer], [], [], WATCH_POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            return


def watch(parent_pid: int, name: str, value: str, grace: float) -> int:
    """The watchdog: wait for ``parent_pid`` to die or hang up, then reap its marked processes."""
    parent = _process(parent_pid)
    if parent is not None:
        _wait_for_parent(parent)
    died = parent is None or not _running(parent)
    count = reap_marked(name, value, grace=grace, exclude=[parent_pid])
    if died and count:
        logger.warning(
            "process %d died; stopped the %d processes it had started", parent_pid, count
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.processes")
    commands = parser.add_subparsers(dest="command", required=True)
    watcher = commands.add_parser("watch", help="reap a process's marked processes when it dies")
    watcher.add_argument("--parent", type=int, required=True)
    watcher.add_argument("--marker", required=True, help="NAME=VALUE")
    watcher.add_argument("--grace", type=float, default=5.0, help="seconds from SIGTERM to KILL")
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
