"""``make run``'s stack (``python -m api.stack``) as a user runs it: it prints its URLs and a
working token, submits the smoke job through the API, and Ctrl-C stops every process it
started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

from orchestrator.processes import alive, descendants

pytestmark = pytest.mark.slow


def test_make_run_stack_starts_submits_and_stops_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    api_port, ui_port, dashboard_port = free_port(), free_port(), free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SPARKORCH_", "MLFLOW_"))
    }
    env.update(
        SPARKORCH_HOME=str(home),
        SPARKORCH_API_PORT=str(api_port),
        SPARKORCH_MLFLOW_UI_PORT=str(ui_port),
        SPARKORCH_RAY_DASHBOARD_URL=f"http://127.0.0.1:{dashboard_port}",
        SPARKORCH_RAY_NUM_CPUS="2",
    )
    out = tmp_path / "stack.out"
    stack = subprocess.Popen(
        [sys.executable, "-m", "api.stack"],
        env=env,
        stdout=out.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops the stack" not in out.read_text():
            assert stack.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.5)
        text = out.read_text()
        token = (home / "api-token").read_text().strip()
        assert token in text and oct((home / "api-token").stat().st_mode & 0o777) == "0o600"
        assert f"http://127.0.0.1:{api_port}" in text and f":{ui_port}" in text
        job_id = re.search(r"job ([0-9a-f-]{36})", text).group(1)

        api = f"http://127.0.0.1:{api_port}"
        headers = {"Authorization": f"Bearer {token}"}
        job = httpx.get(f"{api}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
        assert job["name"] == "pretrain-smoke" and job["submissions"] >= 0
        deadline = time.monotonic() + 60
        while httpx.get(f"{api}/readyz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the stack never became ready"
            time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{ui_port}/", timeout=30).status_code == 200
        children = descendants(stack.pid)
        assert children, "the stack started no processes?"
    finally:
        stack.send_signal(signal.SIGINT)
        try:
            stack.wait(timeout=90)
        except subprocess.TimeoutExpired:
            stack.kill()
            raise
    assert stack.returncode == 0, out.read_text()[-3000:]
    assert "stopped." in out.read_text()
    time.sleep(2)
    left = alive(children)
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left]
