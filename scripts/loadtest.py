"""Latency of the REST service under a steady load, on loopback.

    python scripts/loadtest.py [--rate 50] [--duration 30]
    python scripts/loadtest.py --first-step [--repeat 3]
        # POST -> first training step of the smoke job, with the job's startup/* breakdown;
        # each measured job is cancelled once its first step is seen

Open loop: requests start on a fixed schedule whatever the answers do (so a slow service
shows up as latency, not as a lower rate). Each iteration is ``POST /v1/jobs`` (the smoke
spec with ``hold: true``, so nothing is scheduled on Ray), ``GET /v1/jobs/{id}`` and
``POST /v1/jobs/{id}/cancel`` (held jobs count against the owner's queue). Prints p50, p90,
p99 and max per route and the number of non-2xx answers. URL and token come from
SPARKORCH_API_URL / SPARKORCH_TOKEN (``make run`` prints both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from orchestrator.control.states import TERMINAL_STATES
from orchestrator.specs import read_spec_file

SMOKE = Path(__file__).resolve().parent.parent / "examples" / "pretrain-smoke.yaml"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Recorder:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def call(self, client: httpx.Client, route: str, method: str, path: str, **kw) -> dict:
        start = time.perf_counter()
        response = client.request(method, path, **kw)
        elapsed = time.perf_counter() - start
        with self.lock:
            self.latency[route].append(elapsed * 1000)
            if response.status_code >= 300:
                self.errors[f"{route} {response.status_code}"] += 1
        return response.json() if response.status_code < 300 else {}


def iteration(client: httpx.Client, recorder: Recorder, spec: dict) -> None:
    job = recorder.call(
        client,
        "POST /v1/jobs",
        "POST",
        "/v1/jobs",
        json={"kind": "pretrain", "spec": spec, "hold": True},
    )
    if not job:
        return
    recorder.call(client, "GET /v1/jobs/{id}", "GET", f"/v1/jobs/{job['id']}")
    recorder.call(client, "POST /v1/jobs/{id}/cancel", "POST", f"/v1/jobs/{job['id']}/cancel")


def load(url: str, token: str, rate: float, duration: float) -> dict:
    spec = read_spec_file(SMOKE)
    recorder = Recorder()
    interval = 3 / rate  # three requests per iteration
    client = httpx.Client(
        base_url=url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
    )
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=48) as pool:
        n = 0
        while (due := start + n * interval) < start + duration:
            time.sleep(max(0.0, due - time.perf_counter()))
            pool.submit(iteration, client, recorder, spec)
            n += 1
    wall = time.perf_counter() - start
    client.close()
    routes = {
        route: {
            "count": len(values),
            "p50_ms": round(statistics.median(values), 1),
            "p90_ms": round(percentile(values, 0.90), 1),
            "p99_ms": round(percentile(values, 0.99), 1),
            "max_ms": round(max(values), 1),
        }
        for route, values in recorder.latency.items()
    }
    total = sum(r["count"] for r in routes.values())
    return {
        "target_rate": rate,
        "achieved_rate": round(total / wall, 1),
        "duration_s": round(wall, 1),
        "routes": routes,
        "non_2xx": dict(recorder.errors),
    }


def first_step(url: str, token: str, timeout: float = 900) -> dict:
    """Submit the smoke job and time it to its first logged step. One keep-alive
    connection polls four times a second: a new connection per request (TLS context and
    all) cost this script seconds of CPU that the measured job, on a 2-core VM, missed."""
    spec = read_spec_file(SMOKE)
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        start = time.perf_counter()
        job = client.post("/v1/jobs", json={"kind": "pretrain", "spec": spec}).json()
        seen: dict[str, float] = {}
        try:
            while time.perf_counter() - start < timeout:
                state = client.get(f"/v1/jobs/{job['id']}").json()
                seen.setdefault(state["state"], time.perf_counter() - start)
                progress = client.get(f"/v1/jobs/{job['id']}/progress").json()
                if progress.get("step"):
                    return {
                        "job_id": job["id"],
                        "seconds_to_state": {k: round(v, 1) for k, v in seen.items()},
                        "seconds_to_first_logged_step": round(time.perf_counter() - start, 1),
                        "first_logged_step": progress["step"],
                        "startup_s": startup_breakdown(client, job["id"]),
                    }
                time.sleep(0.25)
            raise TimeoutError("no training step within the timeout")
        finally:
            cancel_and_wait(client, job["id"])


def cancel_and_wait(client: httpx.Client, job_id: str, wait_s: float = 120) -> None:
    """Cancel the measured job and wait until it has ended, so that it neither holds the
    cluster's CPUs nor slows the next measurement down."""
    client.post(f"/v1/jobs/{job_id}/cancel")
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline:
        if client.get(f"/v1/jobs/{job_id}").json()["state"] in TERMINAL_STATES:
            return
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not end within {wait_s:.0f} s of its cancel")


def first_steps(url: str, token: str, repeat: int, settle_s: float = 10) -> dict:
    """``repeat`` measurements one after the other (each job cancelled and ended before the
    next, then ``settle_s`` for its processes to exit): every run, and the median."""
    runs = []
    for index in range(repeat):
        if index:
            time.sleep(settle_s)
        runs.append(first_step(url, token))
    if repeat == 1:
        return runs[0]
    seconds = sorted(run["seconds_to_first_logged_step"] for run in runs)
    return {"median_s": statistics.median(seconds), "seconds": seconds, "runs": runs}


def startup_breakdown(client: httpx.Client, job_id: str, wait_s: float = 30) -> dict:
    """The job's ``startup/*`` metrics (seconds from the POST to each mark; rank 0 logs them
    just after the first step, see orchestrator/startup.py)."""
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline:
        metrics = client.get(f"/v1/jobs/{job_id}/results").json().get("metrics", {})
        marks = {k.removeprefix("startup/").removesuffix("_s"): v for k, v in metrics.items()
                 if k.startswith("startup/")}  # fmt: skip
        if "first_step" in marks:
            return dict(sorted(marks.items(), key=lambda item: item[1]))
        time.sleep(0.5)
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--url", default=os.environ.get("SPARKORCH_API_URL", "http://127.0.0.1:8000")
    )
    parser.add_argument("--token", default=os.environ.get("SPARKORCH_TOKEN"))
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds")
    parser.add_argument("--first-step", action="store_true", help="time POST -> first step")
    parser.add_argument(
        "--repeat", type=int, default=1, help="with --first-step: measurements (median)"
    )
    args = parser.parse_args()
    if not args.token:
        parser.error("set SPARKORCH_TOKEN or pass --token")
    if args.first_step:
        result = first_steps(args.url, args.token, args.repeat)
    else:
        result = load(args.url, args.token, args.rate, args.duration)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
