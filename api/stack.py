"""``python -m api.stack`` (``make run``): the whole embedded stack on localhost.

Starts a local Ray cluster (GCS on a free port, never Redis's 6379; dashboard with the Job
Submission API on 127.0.0.1), the MLflow UI over the same SQLite store, and the REST service
on 127.0.0.1:``$SPARKORCH_API_PORT``; writes a ready API token to ``$SPARKORCH_HOME/api-token``;
submits ``examples/pretrain-smoke.yaml`` through the API; stays up until Ctrl-C, then stops
everything it started (and nothing else).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from api.app import create_app
from api.auth import TokenRegistry, issue_token
from orchestrator.cluster import init_local_cluster
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import read_spec_file

logger = logging.getLogger("api.stack")
SMOKE = Path(__file__).resolve().parent.parent / "examples" / "pretrain-smoke.yaml"
OWNER = "local"


def local_token(settings: OrchestratorSettings) -> str:
    """The token in ``$SPARKORCH_HOME/api-token``, issued again if the registry lost it."""
    path = settings.home / "api-token"
    if path.is_file():
        token = path.read_text().strip()
        if TokenRegistry.load(settings.tokens_file).owner_of(token):
            return token
    token = issue_token(settings.tokens_file, OWNER)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def start_ray(settings: OrchestratorSettings) -> str:
    """A local Ray head owned by this process; returns its dashboard URL."""
    port = int(settings.ray_dashboard_url.rsplit(":", 1)[-1].rstrip("/"))
    return init_local_cluster(settings, dashboard_port=port)


def start_mlflow_ui(settings: OrchestratorSettings) -> subprocess.Popen:
    log = (settings.home / "mlflow-ui.log").open("ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            settings.tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(settings.mlflow_ui_port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_until_up(url: str, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=5)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    logger.warning("%s did not answer on %s within %.0f s", what, url, timeout)


def serve_api(settings: OrchestratorSettings) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    # In a thread uvicorn leaves the signal handlers alone: this process owns Ctrl-C.
    threading.Thread(target=server.run, name="api", daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API did not start on {settings.api_host}:{settings.api_port}")
        time.sleep(0.1)
    return server


def submit_smoke(api_url: str, token: str) -> str:
    response = httpx.post(
        f"{api_url}/v1/jobs",
        json={"kind": "pretrain", "spec": read_spec_file(SMOKE)},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    response.raise_for_status()
    return response.json()["id"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.stack", description=__doc__)
    parser.add_argument("--no-submit", action="store_true", help="do not submit the smoke job")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = OrchestratorSettings()
    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "data").mkdir(exist_ok=True)
    stop = threading.Event()
    mlflow_ui = start_mlflow_ui(settings)
    server = None
    try:
        dashboard = start_ray(settings)
        # After ray.init, which installs its own SIGTERM handler.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        ui_url = f"http://127.0.0.1:{settings.mlflow_ui_port}"
        settings = settings.model_copy(
            update={"ray_dashboard_url": dashboard, "mlflow_ui_url": ui_url}
        )
        token = local_token(settings)
        server = serve_api(settings)
        wait_until_up(ui_url, "the MLflow UI")
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        print(
            f"API            {api_url}  (docs: {api_url}/docs)\n"
            f"API token      {token}\n"
            f"               (also in {settings.home / 'api-token'}; export SPARKORCH_TOKEN)\n"
            f"MLflow UI      {ui_url}\n"
            f"Ray dashboard  {dashboard}\n"
            f"job store      {settings.job_store_url}",
            flush=True,
        )
        if not args.no_submit:
            job_id = submit_smoke(api_url, token)
            print(
                f"submitted {SMOKE.name}: job {job_id}\n"
                f"  follow it:  SPARKORCH_API_URL={api_url} SPARKORCH_TOKEN=$(cat "
                f"{settings.home / 'api-token'}) .venv/bin/sparkctl status {job_id} --wait",
                flush=True,
            )
        print("Ctrl-C stops the stack.", flush=True)
        stop.wait()
    finally:
        print("stopping...", flush=True)
        if server is not None:
            server.should_exit = True
            time.sleep(1)
        mlflow_ui.terminate()
        try:
            mlflow_ui.wait(timeout=20)
        except subprocess.TimeoutExpired:
            mlflow_ui.kill()
        import ray

        ray.shutdown()
        print("stopped.", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
