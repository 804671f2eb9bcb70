"""``python -m api.stack`` (``make run``): the whole embedded stack on localhost.

Starts a local Ray cluster (every Ray process on 127.0.0.1, GCS on a free port, never
Redis's 6379; dashboard with the Job Submission API on ``$SPARKORCH_RAY_DASHBOARD_URL``), the
MLflow UI over the same SQLite store on 127.0.0.1:``$SPARKORCH_MLFLOW_UI_PORT``, and the
REST service on 127.0.0.1:``$SPARKORCH_API_PORT``; writes a ready API token to
``$SPARKORCH_HOME/api-token``; submits ``examples/pretrain-smoke.yaml`` through the API; stays
up until Ctrl-C, then stops everything it started (and nothing else).

A port that is already taken stops it before it starts anything, with the setting to change.
A watchdog process stops everything the stack started when the stack dies in any other way
(``kill -9`` included).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import uvicorn

from api.app import create_app
from api.auth import TokenRegistry, issue_token
from orchestrator.cluster import LOOPBACK, init_local_cluster
from orchestrator.control.scheduler import driver_env
from orchestrator.processes import (
    descendants,
    describe,
    die_with_parent,
    listening,
    port_holders,
    start_watchdog,
)
from orchestrator.settings import OrchestratorSettings
from orchestrator.specs import read_spec_file

logger = logging.getLogger("api.stack")
SMOKE = Path(__file__).resolve().parent.parent / "examples" / "pretrain-smoke.yaml"
OWNER = "local"
# Set, with a value new for each stack, in the environment of everything the stack starts.
STACK_MARKER = "SPARKORCH_STACK_ID"
MLFLOW_START_S = 180.0


class StackError(RuntimeError):
    """The stack cannot start as configured; the message says what to change."""


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


def dashboard_port(settings: OrchestratorSettings) -> int:
    """The port of ``SPARKORCH_RAY_DASHBOARD_URL``, where the stack's Ray dashboard listens."""
    return int(settings.ray_dashboard_url.rsplit(":", 1)[-1].rstrip("/"))


def mlflow_server_url(settings: OrchestratorSettings) -> str:
    """The stack's MLflow server: the UI, and the tracking URI of its jobs."""
    return f"http://{LOOPBACK}:{settings.mlflow_ui_port}"


def start_ray(settings: OrchestratorSettings) -> str:
    """A local Ray head owned by this process, whose processes carry what job drivers need
    (:func:`~orchestrator.control.scheduler.driver_env`); returns its dashboard URL.

    Jobs track through the stack's MLflow server, as the compose deployment's do, rather
    than each opening the SQLite store: the driver and rank 0 then skip the store's set-up
    (SQLAlchemy, the schema check: 0.8 s on a 2-core VM, on rank 0 while rank 1 waits),
    and the server does the SQL in a process of its own. Artifacts are written straight
    to ``$SPARKORCH_HOME/mlartifacts`` (``start_mlflow_ui``).
    """
    port = dashboard_port(settings)
    jobs = settings.model_copy(update={"mlflow_tracking_uri": mlflow_server_url(settings)})
    try:
        return init_local_cluster(settings, dashboard_port=port, node_env=driver_env(jobs))
    except ValueError as error:  # Ray's "Failed to bind ... already occupied"
        taken = bind_error(LOOPBACK, port)
        if taken is None:
            raise
        setting = "SPARKORCH_RAY_DASHBOARD_URL"
        raise StackError(port_problem("Ray dashboard", LOOPBACK, port, setting, taken)) from error


def stack_ports(settings: OrchestratorSettings) -> list[tuple[str, str, int, str]]:
    """``(what, host, port, setting)`` for each port the stack listens on."""
    return [
        ("MLflow UI", LOOPBACK, settings.mlflow_ui_port, "SPARKORCH_MLFLOW_UI_PORT"),
        ("API", settings.api_host, settings.api_port, "SPARKORCH_API_PORT"),
        ("Ray dashboard", LOOPBACK, dashboard_port(settings), "SPARKORCH_RAY_DASHBOARD_URL"),
    ]


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on ``host:port`` now, or None when it could."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As uvicorn and Ray set it: only a listener, not a closing connection, blocks.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            return error
    return None


def port_problem(what: str, host: str, port: int, setting: str, error: OSError) -> str:
    """The message for a port the stack cannot listen on: which port, who holds it, the fix."""
    if error.errno != errno.EADDRINUSE:
        return f"the {what} cannot listen on {host}:{port} ({error.strerror}): set {setting}"
    holders = "; ".join(describe(proc) for proc in port_holders(port))
    held = f" by {holders}" if holders else ""
    return (
        f"the {what} port {port} ({host}:{port}) is already in use{held}. The stack never "
        f"uses a server it did not start: stop that process (a stack from an earlier run?) "
        f"or set {setting} to a free port"
    )


def check_ports(settings: OrchestratorSettings) -> None:
    """Raise StackError, naming the port and its setting, when one of them is taken."""
    for what, host, port, setting in stack_ports(settings):
        error = bind_error(host, port)
        if error is not None:
            raise StackError(port_problem(what, host, port, setting, error))


def start_mlflow_ui(settings: OrchestratorSettings) -> subprocess.Popen:
    """The MLflow server over the stack's store (its UI, and its jobs' tracking server); it
    gets SIGTERM if this process dies. An experiment created through it keeps its artifacts
    in ``$SPARKORCH_HOME/mlartifacts``, which its clients write and read directly (on this
    machine), as those of an experiment created on the SQLite store."""
    log = (settings.home / "mlflow-ui.log").open("ab")
    settings.artifact_root.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            settings.tracking_uri,
            "--host",
            LOOPBACK,
            "--port",
            str(settings.mlflow_ui_port),
            "--workers",
            "1",
            "--default-artifact-root",
            settings.artifact_root.as_uri(),
            "--no-serve-artifacts",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # Started from the main thread (see die_with_parent), before any other thread.
        preexec_fn=die_with_parent(),
    )


def wait_for_mlflow(process: subprocess.Popen, settings: OrchestratorSettings) -> None:
    """Until the MLflow server *we* started listens on its port (never another one there)."""
    port = settings.mlflow_ui_port
    deadline = time.monotonic() + MLFLOW_START_S
    while not any(p == port for _, p, _ in listening({process.pid, *descendants(process.pid)})):
        if process.poll() is not None:
            error = bind_error(LOOPBACK, port)
            if error is not None:
                raise StackError(
                    port_problem("MLflow UI", LOOPBACK, port, "SPARKORCH_MLFLOW_UI_PORT", error)
                )
            log = settings.home / "mlflow-ui.log"
            raise StackError(f"the MLflow UI exited with {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            logger.warning(
                "the MLflow UI did not listen on port %d within %.0f s", port, MLFLOW_START_S
            )
            return
        time.sleep(0.5)


def serve_api(settings: OrchestratorSettings) -> uvicorn.Server:
    """The REST service in a thread of this process, once it listens."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    # In a thread uvicorn leaves the signal handlers alone: this process owns Ctrl-C.
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise api_start_error(settings)
        time.sleep(0.1)
    return server


def api_start_error(settings: OrchestratorSettings) -> StackError:
    """Why the API did not start: its port taken (the usual cause), else see uvicorn's log."""
    host, port = settings.api_host, settings.api_port
    error = bind_error(host, port)
    if error is not None:
        return StackError(port_problem("API", host, port, "SPARKORCH_API_PORT", error))
    return StackError(f"the API did not start on {host}:{port} (its log is above)")


def submit_smoke(api_url: str, token: str) -> str:
    """Submit the smoke pre-training job through the API; returns its job id."""
    response = httpx.post(
        f"{api_url}/v1/jobs",
        json={"kind": "pretrain", "spec": read_spec_file(SMOKE)},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    response.raise_for_status()
    return response.json()["id"]


def start_stack_watchdog() -> subprocess.Popen:
    """Mark this process's environment, then start the watchdog that reaps what carries it.

    Everything the stack starts afterwards (the MLflow UI, every Ray process, the jobs'
    drivers) inherits ``SPARKORCH_STACK_ID``; if the stack dies, even by SIGKILL, the watchdog
    stops them, and nothing else: the value is new for each stack.
    """
    marker = uuid.uuid4().hex
    os.environ[STACK_MARKER] = marker
    return start_watchdog(STACK_MARKER, marker)


def run_stack(settings: OrchestratorSettings, submit: bool, stop: threading.Event) -> int:
    """Start Ray, the MLflow UI and the API; wait for ``stop``; stop all of it."""
    watchdog = start_stack_watchdog()
    mlflow_ui = server = None
    try:
        mlflow_ui = start_mlflow_ui(settings)
        dashboard = start_ray(settings)
        # After ray.init, which installs its own SIGTERM handler.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        ui_url = mlflow_server_url(settings)
        # The cluster's processes carry the drivers' settings (start_ray): jobs go to Ray
        # without a runtime_env.
        settings = settings.model_copy(
            update={
                "ray_dashboard_url": dashboard,
                "mlflow_ui_url": ui_url,
                "forward_driver_env": False,
            }
        )
        token = local_token(settings)
        server = serve_api(settings)
        wait_for_mlflow(mlflow_ui, settings)
        announce(settings, dashboard, token, submit)
        stop.wait()
    except StackError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown(server, mlflow_ui, watchdog)
    return 0


def announce(settings: OrchestratorSettings, dashboard: str, token: str, submit: bool) -> None:
    """Print the URLs and the token; submit the smoke job when asked to."""
    api_url = f"http://{settings.api_host}:{settings.api_port}"
    print(
        f"API            {api_url}  (docs: {api_url}/docs)\n"
        f"API token      {token}\n"
        f"               (also in {settings.home / 'api-token'}; export SPARKORCH_TOKEN)\n"
        f"MLflow UI      {settings.mlflow_ui_url}\n"
        f"Ray dashboard  {dashboard}\n"
        f"job store      {settings.job_store_url}",
        flush=True,
    )
    if submit:
        job_id = submit_smoke(api_url, token)
        print(
            f"submitted {SMOKE.name}: job {job_id}\n"
            f"  follow it:  SPARKORCH_API_URL={api_url} SPARKORCH_TOKEN=$(cat "
            f"{settings.home / 'api-token'}) .venv/bin/sparkctl status {job_id} --wait",
            flush=True,
        )
    print("Ctrl-C stops the stack.", flush=True)


def shutdown(
    server: uvicorn.Server | None, mlflow_ui: subprocess.Popen | None, watchdog: subprocess.Popen
) -> None:
    """Stop the API, the MLflow UI and Ray, then let the watchdog reap any straggler."""
    print("stopping...", flush=True)
    if server is not None:
        server.should_exit = True
        time.sleep(1)
    if mlflow_ui is not None:
        mlflow_ui.terminate()
        try:
            mlflow_ui.wait(timeout=20)
        except subprocess.TimeoutExpired:
            mlflow_ui.kill()
    import ray

    ray.shutdown()
    # End of file on its stdin: the watchdog stops whatever still carries the marker.
    watchdog.stdin.close()
    try:
        watchdog.wait(timeout=60)
    except subprocess.TimeoutExpired:
        logger.warning("the watchdog (pid %d) is still sweeping", watchdog.pid)
    print("stopped.", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.stack", description=__doc__)
    parser.add_argument("--no-submit", action="store_true", help="do not submit the smoke job")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = OrchestratorSettings()
    try:
        # Before anything starts: a stale server on one of these ports is never adopted.
        check_ports(settings)
    except StackError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "data").mkdir(exist_ok=True)
    return run_stack(settings, submit=not args.no_submit, stop=threading.Event())


if __name__ == "__main__":
    raise SystemExit(main())
