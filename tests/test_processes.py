"""Process helpers: finding, titling and killing process trees; the watchdog that stops what
a killed owner started."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

from orchestrator.processes import (
    alive,
    descendants,
    kill,
    kill_tree,
    listening,
    marked,
    port_holders,
    titled,
)


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


MARKER = "SPARKORCH_TEST_OWNER"

# An owner as the stack is one: it marks its environment, starts the watchdog, then a plain
# child, an orphan (its shell exits at once) and a child that retitles itself as Ray's workers
# do, which wipes its environment block (marker included). Prints their pids, then waits.
OWNER = """
import json, os, subprocess, sys, time
from orchestrator.processes import start_watchdog
os.environ[sys.argv[1]] = sys.argv[2]
watchdog = start_watchdog(sys.argv[1], sys.argv[2])
plain = subprocess.Popen(["sleep", "60"])
orphan = subprocess.run(
    ["bash", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True
).stdout
retitle = "import ray._raylet, time; ray._raylet.setproctitle('ray::FakeWorker'); time.sleep(60)"
env = {"PATH": os.environ["PATH"], sys.argv[1]: sys.argv[2]}
titled = subprocess.Popen([sys.executable, "-c", retitle], env=env)
print(json.dumps([watchdog.pid, plain.pid, int(orphan), titled.pid]), flush=True)
time.sleep(60)
"""

# An owner whose child gets SIGTERM when the owner dies (PR_SET_PDEATHSIG), without a watchdog.
PDEATHSIG_OWNER = """
import subprocess, time
from orchestrator.processes import die_with_parent
child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent())
print(child.pid, flush=True)
time.sleep(60)
"""


def _sleeper(marker: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(MARKER, None)
    if marker is not None:
        env[MARKER] = marker
    return subprocess.Popen(["sleep", "60"], env=env)


def test_the_watchdog_stops_what_a_killed_owner_started_and_nothing_else() -> None:
    value = uuid.uuid4().hex
    # Unrelated processes: one without a marker, one with another owner's.
    others = [_sleeper(None), _sleeper(uuid.uuid4().hex)]
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, MARKER, value], stdout=subprocess.PIPE, text=True
    )
    started: set[int] = set()
    try:
        watchdog, plain, orphan, titled_pid = json.loads(owner.stdout.readline())
        started = {watchdog, plain, orphan, titled_pid}
        assert _wait_until(lambda: bool(titled("ray::FakeWorker", below=owner.pid)), 30)
        # The retitled child lost its marker: only the watchdog's view of the tree finds it.
        assert titled_pid not in {p.pid for p in marked(MARKER, value)}
        assert {plain, orphan} <= {p.pid for p in marked(MARKER, value)}
        time.sleep(1.5)  # the watchdog looks at the owner's tree every half second
        kill([owner.pid])
        owner.wait(timeout=10)
        assert _wait_until(lambda: not alive(started), 15), alive(started)
        assert alive(p.pid for p in others) == {p.pid for p in others}
    finally:
        kill([owner.pid, *started, *(p.pid for p in others)])
        for process in [owner, *others]:
            process.wait(timeout=10)


def test_die_with_parent_stops_the_child_when_its_parent_is_killed() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", PDEATHSIG_OWNER], stdout=subprocess.PIPE, text=True
    )
    child = int(owner.stdout.readline())
    try:
        assert alive({child})
        kill([owner.pid])
        owner.wait(timeout=10)
        assert _wait_until(lambda: not alive({child}), 10)
    finally:
        kill([owner.pid, child])


def test_listening_and_port_holders_name_this_process() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert ("127.0.0.1", port, os.getpid()) in listening({os.getpid()})
        assert [proc.pid for proc in port_holders(port)] == [os.getpid()]
    assert not any(p == port for _, p, _ in listening({os.getpid()}))
