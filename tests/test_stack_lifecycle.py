"""``make run``'s stack when things go wrong: killed with SIGKILL, it leaves no process behind
(its watchdog stops them); started with one of its ports taken, it stops at once, names the
port and the setting to change, and starts nothing (it never adopts a stale server)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from test_stack import READY, TEST_MARKER, stack_env, start_stack, started_by

from orchestrator.processes import alive, kill, marked

pytestmark = pytest.mark.slow

# Processes that must run when the stack is killed, for the test to mean anything: the ones
# that outlived it before it had a watchdog (the MLflow server, its uvicorn that holds the
# port, Ray's two agents) and Ray's core.
EXPECTED = (
    "mlflow server",
    "-m uvicorn",
    "gcs_server",
    "raylet",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
)


def command_lines(pids: set[int]) -> dict[int, str]:
    found = {}
    for pid in pids:
        try:
            found[pid] = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
    return found


def wait_for_expected(stack: subprocess.Popen, env: dict[str, str], out: Path) -> set[int]:
    """The stack's processes once every kind in EXPECTED runs."""
    deadline = time.monotonic() + 120
    while True:
        started = started_by(stack, env)
        lines = command_lines(started).values()
        if all(any(kind in line for line in lines) for kind in EXPECTED):
            return started
        assert stack.poll() is None, out.read_text()[-3000:]
        assert time.monotonic() < deadline, sorted(lines)
        time.sleep(0.5)


def test_kill_9_of_the_stack_leaves_no_process_behind(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "home", free_port(), free_port(), free_port())
    out = tmp_path / "stack.out"
    stack = start_stack(env, out, "--no-submit")
    started: set[int] = set()
    try:
        started = wait_for_expected(stack, env, out)
        stack.kill()
        stack.wait(timeout=10)
        deadline = time.monotonic() + 45
        while left := alive(started) | {p.pid for p in marked(TEST_MARKER, env[TEST_MARKER])}:
            assert time.monotonic() < deadline, f"left running: {command_lines(left)}"
            time.sleep(0.5)
    finally:
        # Whatever the outcome, leave nothing running on a machine others share.
        stack.kill()
        kill(alive(started) | {p.pid for p in marked(TEST_MARKER, env[TEST_MARKER])})
    assert "died; stopped the" in out.read_text()  # the watchdog, not luck, stopped them


@pytest.mark.parametrize(
    "taken", ["SPARKORCH_MLFLOW_UI_PORT", "SPARKORCH_API_PORT", "SPARKORCH_RAY_DASHBOARD_URL"]
)
def test_a_taken_port_stops_the_stack_with_the_port_and_setting_named(
    tmp_path: Path, taken: str
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {
            "SPARKORCH_API_PORT": free_port(),
            "SPARKORCH_MLFLOW_UI_PORT": free_port(),
            "SPARKORCH_RAY_DASHBOARD_URL": free_port(),
        }
        ports[taken] = port
        env = stack_env(
            tmp_path / "home",
            ports["SPARKORCH_API_PORT"],
            ports["SPARKORCH_MLFLOW_UI_PORT"],
            ports["SPARKORCH_RAY_DASHBOARD_URL"],
        )
        try:
            result = subprocess.run(
                [sys.executable, "-m", "api.stack", "--no-submit"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            left = marked(TEST_MARKER, env[TEST_MARKER])
            kill(proc.pid for proc in left)
    assert result.returncode != 0, result.stdout + result.stderr
    message = result.stderr
    assert f"port {port} " in message and "already in use" in message, message
    assert taken in message and f"pid {psutil.Process().pid}" in message, message
    assert READY not in result.stdout
    assert not left, [proc.cmdline() for proc in left]
