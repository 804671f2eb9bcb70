"""Does a slow MLflow server slow training down? Mean step time with a fast and a slow one.

Runs the same short CPU pre-training loop (``spark_core`` ``PretrainEngine``, SparK ResNet-18
at 64 px, batch 16, ``log_every`` 1) with the service's ``MetricsLogger`` against

  (a) a local ``mlflow server`` (SQLite store in a temporary folder, one worker), and
  (b) the same server behind a proxy that adds ``--latency-ms`` (200) to every request,

alternating (a) and (b) for ``--rounds`` rounds, and prints each one's mean step time
(steps after the first, which warms up) and the ratio b / a; the requirement is a ratio
within 1.05. With ``--sync-baseline`` it also times (c): a logger that calls ``log_batch``
synchronously on every step through the slow proxy (what rank 0 did before), to show
what the measurement catches. The images are random tensors: the loop, not the data, is
measured. Run from a checkout:

    .venv/bin/python scripts/bench_tracking.py [--steps 36] [--rounds 3] [--sync-baseline]
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """A real ``mlflow server`` on a free loopback port; yields its URL once healthy."""
    port = free_port()
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((folder / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@contextmanager
def slow_proxy(upstream: str, latency_s: float) -> Iterator[str]:
    """A threaded HTTP proxy to ``upstream`` that waits ``latency_s`` before each request."""
    host, port = upstream.removeprefix("http://").split(":")

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            time.sleep(latency_s)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            headers["Host"] = f"{host}:{port}"
            connection = http.client.HTTPConnection(host, int(port), timeout=60)
            try:
                connection.request(self.command, self.path, body or None, headers)
                answer = connection.getresponse()
                payload = answer.read()
            finally:
                connection.close()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class StepClock:
    """Engine callback: the time of every step's metrics (log_every 1: every step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step(self, metrics: Any) -> None:
        self.times.append(time.perf_counter())

    def on_epoch_end(self, engine: Any, metrics: Any) -> None:
        return None

    def mean_step_s(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return statistics.fmean(gaps[1:])  # the first gap still warms up


class SyncLogger:
    """The old way: one synchronous ``log_batch`` per step (for --sync-baseline)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def on_step(self, m: Any) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {"train/loss": m.loss, "train/lr": m.lr, "train/step": m.step + 1}
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, m.step) for k, v in values.items()]
        )

    def on_epoch_end(self, engine: Any, metrics: Any) -> None:
        return None


def train_once(tracking_uri: str, steps: int, mode: str) -> float:
    """Mean step time (s) of one pre-training epoch of ``steps`` steps, logged to
    ``tracking_uri`` by the service's logger ("async") or the synchronous one ("sync")."""
    import torch
    from torch.utils.data import TensorDataset

    from orchestrator.tracking import MetricsLogger, RunRef, client_for
    from spark_core import build_spark
    from spark_core.engine import EngineConfig, PretrainEngine

    client = client_for(tracking_uri)
    experiment = client.get_experiment_by_name("bench") or client.get_experiment(
        client.create_experiment("bench")
    )
    run_id = client.create_run(experiment.experiment_id, run_name=mode).info.run_id
    torch.manual_seed(0)
    model = build_spark("resnet18", 64, decoder_width=64)
    images = TensorDataset(torch.randn(steps * 16, 3, 64, 64))
    clock = StepClock()
    if mode == "sync":
        tracker: Any = SyncLogger(client, run_id)
    else:
        tracker = MetricsLogger(RunRef(tracking_uri, experiment.experiment_id, run_id), log_every=1)
    config = EngineConfig(epochs=1, batch_size=16, warmup_epochs=0, log_every=1, base_lr=1e-3)
    PretrainEngine(model, config, callbacks=[tracker, clock]).fit(images)
    if mode != "sync":
        assert tracker.close(), "metrics were lost"
        logged = client.get_metric_history(run_id, "train/step")
        assert len(logged) == steps, f"{len(logged)} of {steps} steps logged"
    return clock.mean_step_s()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--sync-baseline", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="sparkorch-bench-tracking-"))
    try:
        with mlflow_server(folder) as fast, slow_proxy(fast, args.latency_ms / 1000) as slow:
            train_once(fast, 4, "async")  # warm-up: imports, first requests, allocator
            times: dict[str, list[float]] = {"fast": [], "slow": []}
            for _ in range(args.rounds):
                times["fast"].append(train_once(fast, args.steps, "async"))
                times["slow"].append(train_once(slow, args.steps, "async"))
            if args.sync_baseline:
                times["slow, synchronous"] = [train_once(slow, args.steps, "sync")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    means = {k: statistics.fmean(v) for k, v in times.items()}
    print(
        f"{args.steps} steps x {args.rounds} rounds, SparK ResNet-18 64 px batch 16, "
        f"log_every 1, proxy latency {args.latency_ms:.0f} ms per request"
    )
    for name, value in means.items():
        rounds = ", ".join(f"{1000 * t:.1f}" for t in times[name])
        print(f"  mean step time, {name:<18} {1000 * value:7.1f} ms   (rounds: {rounds})")
    ratio = means["slow"] / means["fast"]
    print(f"  ratio slow / fast: {ratio:.3f}  ({'within' if ratio <= 1.05 else 'OVER'} 5 %)")
    if args.sync_baseline:
        print(f"  ratio synchronous slow / fast: {means['slow, synchronous'] / means['fast']:.3f}")


if __name__ == "__main__":
    main()
