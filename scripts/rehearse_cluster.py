"""Rehearse the docker-compose topology without Docker, on this machine.

    python scripts/rehearse_cluster.py [--keep-logs DIR]

Starts, as separate processes: a Ray head (``ray start --head --block``, GCS fault tolerance
on the Redis at 127.0.0.1:6379 under a namespace of its own) and a second Ray node
(``ray start --address=...``), an MLflow server on PostgreSQL (127.0.0.1:5432), and the REST
API on PostgreSQL. Then, over HTTP:

1. submits a small sweep (two trials, each two Ray Train workers, checkpoint every epoch);
   both nodes run trial workers;
2. kills the second node (its whole process tree) during the trials, starts a replacement
   node, and checks the interrupted trial was restored from its checkpoint (its run records
   ``train/resumed_at_step`` > 0) and the sweep finishes with its table in MLflow;
3. submits a pre-training job, kills the Ray head's whole process tree while the job runs
   and starts the head again on the same ports and Redis namespace: the worker node stays
   in the cluster, and the service resubmits the job whose driver died with the head; it
   resumes from its checkpoint and succeeds.

Prints a JSON report; exits 1 (with the reason) when a check fails. Stops and removes
everything it started (processes, databases, its Redis keys) on the way out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from api.auth import issue_token
from orchestrator.cluster import TRIAL_DRIVER_RESOURCE, TRIAL_DRIVER_SLOTS
from orchestrator.processes import alive, descendants, kill
from orchestrator.processes import kill_tree as kill_process_tree

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("rehearsal")
POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS = ("127.0.0.1", 6379)

TRIAL_BASE: dict[str, Any] = {
    "name": "rehearsal-trial",
    "model": {"backbone": "resnet18", "input_size": 64},
    "spark": {"decoder_width": 64},
    "data": {"train": {"kind": "synthetic", "count": 64, "size": 64, "classes": 4}},
    "optim": {"global_batch_size": 16, "epochs": 4, "warmup_epochs": 0},
    "resources": {"num_workers": 2, "cpus_per_worker": 1},
    "checkpoint": {"every_epochs": 1},
    "failures": {"max_failures": 3},
    "evaluation": {"method": "knn"},
    "tracking": {"reconstruction_every": 0},
}
SWEEP: dict[str, Any] = {
    "name": "rehearsal-sweep",
    "base": TRIAL_BASE,
    "search": {"spark.decoder_depth": {"grid": [1, 2]}},
    "metric": "knn_top1",
    "max_concurrent_trials": 2,
    "max_failures_per_trial": 2,
}


class CheckFailed(AssertionError):
    pass


def check(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def wait_for(probe: Callable[[], Any], timeout: float, what: str, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with suppress(httpx.HTTPError):
            value = probe()
            if value:
                return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and everything below it (what losing a machine looks like)."""
    kill_process_tree(process.pid)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


def redis_command(*parts: str) -> Any:
    """One RESP command to the local Redis (no client library needed)."""
    import socket

    payload = f"*{len(parts)}\r\n" + "".join(f"${len(p)}\r\n{p}\r\n" for p in parts)
    with socket.create_connection(REDIS, timeout=10) as sock:
        sock.sendall(payload.encode())
        return sock.recv(1 << 20)


class Topology:
    """The processes of the rehearsal; every one is stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.home = workdir / "home"
        (self.home / "data").mkdir(parents=True)
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.tag = uuid.uuid4().hex[:10]
        self.redis_namespace = f"sparkorch-rehearsal-{self.tag}"
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.mlflow_port, self.api_port = free_port(), free_port()
        self.databases = {
            kind: f"sparkorch_rehearsal_{self.tag}_{kind}" for kind in ("jobs", "mlflow")
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}
        self.temp_dirs: list[str] = []
        self.ray_token = workdir / "ray-token"
        self.ray_token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        self.ray_token.chmod(0o600)
        self.api_token = ""
        # This process queries the cluster's state API too: same token.
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.ray_token))
        from orchestrator.cluster import refresh_ray_auth_config

        refresh_ray_auth_config()

    # ------------------------------------------------------------------ plumbing

    def db_url(self, kind: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.databases[kind]}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RAY_", "SPARKORCH_", "MLFLOW_"))
        }
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.ray_token),
            SPARKORCH_HOME=str(self.home),
            SPARKORCH_DATA_ROOTS=str(self.home / "data"),
            SPARKORCH_RAY_STORAGE=str(self.storage),
            SPARKORCH_DATABASE_URL=self.db_url("jobs"),
            MLFLOW_TRACKING_URI=self.mlflow,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
            PYTHONPATH=str(ROOT),
        )
        return env

    def start(self, name: str, command: list[str], **extra_env: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            command,
            env={**self.env(), **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # ------------------------------------------------------------------ pieces

    def create_databases(self) -> None:
        admin = sa.create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in self.databases.values():
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()

    def ray(self, *args: str) -> list[str]:
        # Every port of its own: Ray's defaults (e.g. the dashboard agent's 52365) would
        # collide with another Ray on this machine (the test suite's), and the Job API
        # would then talk to the other cluster's agent.
        ports = {
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        own_ports = [f"{flag}={port}" for flag, port in ports.items()]
        return [str(Path(sys.executable).with_name("ray")), "start", *args, *own_ports, "--block"]

    def start_head(self) -> None:
        # Each head start gets its own short temp dir: on one machine, `ray start --head`
        # would otherwise see the surviving worker's raylet pointing at this GCS address
        # and refuse to start (separate containers do not share that view).
        temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        self.start(
            "ray-head",
            self.ray(
                "--head",
                f"--temp-dir={temp_dir}",
                f"--ray-client-server-port={free_port()}",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                "--num-cpus=2",
                f"--resources={json.dumps({TRIAL_DRIVER_RESOURCE: TRIAL_DRIVER_SLOTS})}",
                "--disable-usage-stats",
            ),
            RAY_REDIS_ADDRESS=f"{REDIS[0]}:{REDIS[1]}",
            RAY_external_storage_namespace=self.redis_namespace,
        )
        wait_for(self._dashboard_up, 120, "the Ray head's dashboard")
        head = wait_for(
            lambda: [n for n in self.alive_nodes() if n.get("is_head_node")], 120, "the head"
        )
        self.node_ids["ray-head"] = head[0]["node_id"]

    def _dashboard_up(self) -> bool:
        return httpx.get(f"{self.dashboard}/api/version", timeout=5).status_code < 500

    def start_node(self, name: str) -> str:
        """Start a worker node; returns its Ray node id."""
        known = {self.node_ids["ray-head"], *(v for k, v in self.node_ids.items() if k != name)}
        before = wait_for(
            lambda: {n["node_id"] for n in self.alive_nodes()} & known,
            120,
            "the cluster's nodes to be listed",
        )
        self.start(
            name,
            self.ray(
                f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=2", "--disable-usage-stats"
            ),
        )
        joined = wait_for(
            lambda: {n["node_id"] for n in self.alive_nodes()} - before, 120, f"{name} to join"
        )
        self.node_ids[name] = joined.pop()
        return self.node_ids[name]

    def start_mlflow(self) -> None:
        self.start(
            "mlflow",
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                self.db_url("mlflow"),
                "--artifacts-destination",
                str(self.workdir / "mlflow-artifacts"),
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.mlflow_port),
                "--workers",
                "1",
            ],
        )

    def wait_for_mlflow(self) -> None:
        wait_for(
            lambda: httpx.get(f"{self.mlflow}/health", timeout=5).status_code == 200, 180, "MLflow"
        )

    def start_api(self) -> None:
        self.api_token = issue_token(self.home / "api-tokens.json", "rehearsal")
        self.start(
            "api",
            [sys.executable, "-m", "api"],
            SPARKORCH_API_PORT=str(self.api_port),
            SPARKORCH_RAY_DASHBOARD_URL=self.dashboard,
            SPARKORCH_RECONCILE_INTERVAL_S="1",
        )
        wait_for(
            lambda: httpx.get(f"{self.api}/readyz", timeout=10).status_code == 200, 120, "the API"
        )

    @property
    def storage(self) -> Path:
        return self.workdir / "shared-storage"

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api, headers={"Authorization": f"Bearer {self.api_token}"}, timeout=30
        )

    def alive_nodes(self) -> list[dict[str, Any]]:
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.dashboard, raise_on_missing_output=False)
        except Exception as error:  # the head may be restarting
            logger.info("listing nodes failed: %s", error)
            return []
        return [n.__dict__ for n in nodes if n.state == "ALIVE"]

    def worker_nodes_of_trials(self) -> set[str]:
        from ray.util.state import list_actors

        actors = list_actors(
            address=self.dashboard,
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
            limit=10_000,
            raise_on_missing_output=False,
        )
        return {a.node_id for a in actors}

    def jobs_summary(self) -> list[dict[str, Any]]:
        """The service's and Ray's view of every job (for a failure report)."""
        summary: list[dict[str, Any]] = []
        with suppress(Exception), self.client() as client:
            for job in client.get("/v1/jobs").json()["items"]:
                summary.append({k: job.get(k) for k in ("id", "kind", "state", "message")})
        with suppress(Exception):
            from ray.job_submission import JobSubmissionClient

            for info in JobSubmissionClient(self.dashboard).list_jobs():
                summary.append({"ray": info.submission_id, "status": str(info.status)})
        return summary

    def stop_all(self) -> None:
        """SIGTERM everything at once, give it 10 s, then SIGKILL whatever is left."""
        running = [p for p in self.processes.values() if p.poll() is None]
        # The trees are read first: children of an exited parent are no longer below it.
        trees = set().union(*({p.pid} | descendants(p.pid) for p in running)) if running else set()
        for process in running:
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in running:
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        kill(alive(trees))

    def remove_temp_dirs(self) -> None:
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)

    def drop_databases(self) -> None:
        admin = sa.create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in self.databases.values():
                with suppress(Exception):
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    def clear_redis(self) -> None:
        # GCS keeps its tables in one hash per namespace; remove only ours.
        with suppress(OSError):
            reply = redis_command("KEYS", f"*{self.redis_namespace}*").decode(errors="replace")
            for key in [line for line in reply.split("\r\n") if self.redis_namespace in line]:
                redis_command("DEL", key)


@contextmanager
def topology(workdir: Path) -> Iterator[Topology]:
    cluster = Topology(workdir)
    cluster.create_databases()
    try:
        cluster.start_mlflow()  # starts while the Ray head starts
        cluster.start_head()
        cluster.start_node("ray-node-2")
        cluster.wait_for_mlflow()
        cluster.start_api()
        yield cluster
    finally:
        cluster.stop_all()
        cluster.remove_temp_dirs()
        cluster.drop_databases()
        cluster.clear_redis()


# ---------------------------------------------------------------------------- scenarios


def job_state(client: httpx.Client, job_id: str, states: tuple[str, ...]) -> dict | None:
    job = client.get(f"/v1/jobs/{job_id}").json()
    return job if job["state"] in states else None


def sweep_survives_losing_a_node(cluster: Topology) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(cluster.mlflow)
    with cluster.client() as client:
        created = client.post("/v1/jobs", json={"kind": "sweep", "spec": SWEEP})
        check(created.status_code == 202, f"sweep refused: {created.text}")
        sweep_id = created.json()["id"]

        nodes_in_use: set[str] = set()
        second_node = cluster.node_ids["ray-node-2"]

        def second_node_trains_past_a_checkpoint() -> bool:
            nodes = cluster.worker_nodes_of_trials()
            nodes_in_use.update(nodes)
            # Ray Train's snapshot of each trial's registered checkpoints (what it restores).
            snapshots = list(cluster.storage.glob(f"{sweep_id}-*/checkpoint_manager_snapshot.json"))
            registered = [p for p in snapshots if "epoch-0" in p.read_text()]
            return second_node in nodes and len(registered) == 2

        wait_for(
            second_node_trains_past_a_checkpoint,
            600,
            "trials on both nodes past their first checkpoint",
            1,
        )
        check(len(nodes_in_use) == 2, f"trial workers ran on {len(nodes_in_use)} node(s), not 2")
        killed_at_ms = int(time.time() * 1000)
        kill_tree(cluster.processes["ray-node-2"])
        cluster.start_node("ray-node-3")
        done = wait_for(
            lambda: job_state(client, sweep_id, ("SUCCEEDED", "FAILED", "CANCELLED")),
            900,
            "the sweep to end",
            2,
        )
        check(done["state"] == "SUCCEEDED", f"sweep ended {done['state']}: {done['message']}")
        results = client.get(f"/v1/jobs/{sweep_id}/results").json()
    rows = results.get("rows") or []
    check(len(rows) == 2 and all(r["status"] == "FINISHED" for r in rows), f"table: {rows}")
    check("results/table.md" in results["artifacts"], "no results table in MLflow")
    parent = results["mlflow_run_id"]
    children = mlflow.search_runs(
        [mlflow.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    check(len(children) == 2, f"{len(children)} trial runs under the sweep, expected 2")
    resumed = []
    for child in children:
        check(child.info.status == "FINISHED", f"trial run {child.info.run_id} {child.info.status}")
        # Rank 0 logs train/resumed_at_step each time Ray Train restores a checkpoint.
        restores = mlflow.get_metric_history(child.info.run_id, "train/resumed_at_step")
        after = [int(m.value) for m in restores if m.timestamp > killed_at_ms]
        if after:
            resumed.append({"run_id": child.info.run_id, "resumed_at_step": min(after)})
    check(resumed, "no trial was restored from a checkpoint after the node was lost")
    check(
        all(r["resumed_at_step"] > 0 for r in resumed),
        f"a trial restarted from scratch instead of its checkpoint: {resumed}",
    )
    return {
        "sweep_id": sweep_id,
        "nodes_in_use": len(nodes_in_use),
        "resumed": resumed,
        "table": rows,
    }


def head_restart_keeps_the_cluster(cluster: Topology) -> dict[str, Any]:
    spec = {
        **TRIAL_BASE,
        "name": "rehearsal-head-restart",
        "optim": {**TRIAL_BASE["optim"], "epochs": 6},
    }
    spec["resources"] = {"num_workers": 2, "cpus_per_worker": 1}
    with cluster.client() as client:
        job_id = client.post("/v1/jobs", json={"kind": "pretrain", "spec": spec}).json()["id"]
        wait_for(
            lambda: (client.get(f"/v1/jobs/{job_id}/progress").json().get("epoch") or 0) >= 1.5,
            300,
            "the job to pass its first checkpoint",
            2,
        )
        worker_nodes = {n["node_id"] for n in cluster.alive_nodes() if not n.get("is_head_node")}
        kill_tree(cluster.processes["ray-head"])
        restarted_at = time.monotonic()
        cluster.start_head()
        wait_for(
            lambda: worker_nodes <= {n["node_id"] for n in cluster.alive_nodes()},
            120,
            "the worker node to rejoin the restarted head",
        )
        done = wait_for(
            lambda: job_state(client, job_id, ("SUCCEEDED", "FAILED", "CANCELLED")),
            600,
            "the job after the head restart",
            2,
        )
    check(done["state"] == "SUCCEEDED", f"job ended {done['state']}: {done['message']}")
    check(done["submissions"] == 2, f"expected one resubmission, got {done['submissions']}")
    from mlflow.tracking import MlflowClient

    run_id = done["mlflow_run_id"]
    restores = MlflowClient(cluster.mlflow).get_metric_history(run_id, "train/resumed_at_step")
    check(restores and restores[-1].value > 0, f"not resumed from a checkpoint: {restores}")
    return {
        "job_id": job_id,
        "worker_node_survived": True,
        "submissions": done["submissions"],
        "resumed_at_step": int(restores[-1].value),
        "seconds_from_restart_to_success": round(time.monotonic() - restarted_at, 1),
    }


def busiest_processes(count: int = 12) -> list[str]:
    """What else used the CPUs when a check timed out (this machine has two)."""
    ps = subprocess.run(
        ["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True
    )
    return [line[:160] for line in ps.stdout.splitlines()[: count + 1]]


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the clean-up below


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the processes' logs here")
    parser.add_argument("--skip-head-restart", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    report: dict[str, Any] = {}
    workdir = Path(tempfile.mkdtemp(prefix="sparkorch-rehearsal-"))
    started = time.monotonic()
    try:
        with topology(workdir) as cluster:
            logger.info(
                "topology up: API %s, MLflow %s, dashboard %s",
                cluster.api,
                cluster.mlflow,
                cluster.dashboard,
            )
            try:
                report["sweep"] = sweep_survives_losing_a_node(cluster)
                logger.info("sweep survived losing a node: %s", report["sweep"]["resumed"])
                if not args.skip_head_restart:
                    report["head_restart"] = head_restart_keeps_the_cluster(cluster)
                    logger.info("head restart: %s", report["head_restart"])
            except CheckFailed as failure:
                report["failed"] = str(failure)
                report["logs"] = {name: cluster.log_tail(name, 1500) for name in cluster.processes}
                report["busiest_processes"] = busiest_processes()
                report["jobs"] = cluster.jobs_summary()
    finally:
        report["wall_time_s"] = round(time.monotonic() - started, 1)
        if args.keep_logs:
            shutil.copytree(workdir / "logs", args.keep_logs, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2, default=str))
    return 1 if "failed" in report else 0


if __name__ == "__main__":
    raise SystemExit(main())
