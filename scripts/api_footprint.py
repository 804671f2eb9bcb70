"""Start time and resident memory of the REST service process (``python -m api``).

Starts the API on a free loopback port with a throw-away ``SPARKORCH_HOME``, measures the
time until ``/livez`` answers and the process's resident memory then (and after a spec
validation and a readiness check, which load Ray's and MLflow's clients), and stops it.
Run from a checkout: ``.venv/bin/python scripts/api_footprint.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(python: str) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="sparkorch-footprint-"))
    (home / "data").mkdir()
    port = free_port()
    env = {**os.environ, "SPARKORCH_HOME": str(home), "SPARKORCH_API_PORT": str(port)}
    start = time.perf_counter()
    process = subprocess.Popen([python, "-m", "api"], cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                httpx.get(f"{url}/livez", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.perf_counter() - start > 120:
                    raise RuntimeError("the API did not start") from None
                time.sleep(0.05)
        ready = time.perf_counter() - start
        idle = rss_mib(process.pid)
        # One validation, then readiness (Ray's and MLflow's clients loaded): a service that
        # imports torch lazily would show it here.
        httpx.post(f"{url}/v1/jobs", json={"kind": "pretrain", "spec": {}}, timeout=30)
        readyz_start = time.perf_counter()
        httpx.get(f"{url}/readyz", timeout=120)
        return {
            "start_s": round(ready, 2),
            "rss_mib": round(idle, 1),
            "first_readyz_s": round(time.perf_counter() - readyz_start, 2),
            "rss_after_readyz_mib": round(rss_mib(process.pid), 1),
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = [measure(args.python) for _ in range(args.rounds)]
    best = {key: min(r[key] for r in rounds) for key in rounds[0]}
    print(json.dumps({"rounds": rounds, "best": best}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
