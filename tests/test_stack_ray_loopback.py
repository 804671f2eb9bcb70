"""The laptop's local Ray cluster (``init_local_cluster``: ``make run`` and jobs run without
``RAY_ADDRESS``) listens on 127.0.0.1 only, so no Ray process, metrics exporters included, can
be reached from another machine; and its Ray Jobs run their drivers on it even when other
Ray clusters run on the same machine."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from orchestrator.processes import descendants, kill, listening, marked

pytestmark = pytest.mark.slow

MARKER = "SPARKORCH_TEST_CLUSTER"
# Starts the cluster, runs a Ray job that prints the address its driver was given, prints
# what the test needs as JSON, and waits for its stdin to close.
CLUSTER = """
import json, shlex, sys, time
import ray
from ray.job_submission import JobSubmissionClient
from orchestrator.cluster import init_local_cluster
from orchestrator.settings import OrchestratorSettings
dashboard = init_local_cluster(OrchestratorSettings())
client = JobSubmissionClient(dashboard)
show = "import os; print('driver address', os.environ['RAY_ADDRESS'])"
job = client.submit_job(entrypoint=f"{shlex.quote(sys.executable)} -c {shlex.quote(show)}")
while not client.get_job_status(job).is_terminal():
    time.sleep(0.5)
logs = client.get_job_logs(job)
print(json.dumps({
    "node": ray.nodes()[0],
    "gcs": ray.get_runtime_context().gcs_address,
    "driver_address": logs.split("driver address ")[-1].strip(),
}), flush=True)
sys.stdin.read()
"""
# What another Ray cluster on this machine looks like to Ray's "auto" address discovery (a
# raylet's command line with its GCS address): many of them, so that a driver sent to "any
# cluster on this machine" almost never lands on the right one by luck.
DECOYS = " ".join(f"--gcs-address=192.0.2.1:{port}" for port in range(1000, 1100))
# Ray's processes that listen on TCP: the test waits until each one does.
LISTENERS = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::IDLE")


@dataclass(frozen=True)
class LocalCluster:
    driver: subprocess.Popen
    marker: str
    info: dict

    def sockets(self) -> set[tuple[str, int, int]]:
        """Every listening TCP socket of the cluster's processes."""
        pids = descendants(self.driver.pid) | {self.driver.pid}
        return listening(pids | {p.pid for p in marked(MARKER, self.marker)})


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SPARKORCH_"))}
    marker = uuid.uuid4().hex
    home = tmp_path_factory.mktemp("home")
    env.update(SPARKORCH_HOME=str(home), SPARKORCH_RAY_NUM_CPUS="1", **{MARKER: marker})
    decoy = subprocess.Popen(["bash", "-c", f'exec -a "/decoy/raylet {DECOYS}" sleep 300'])
    driver = subprocess.Popen(
        [sys.executable, "-c", CLUSTER],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield LocalCluster(driver, marker, json.loads(driver.stdout.readline()))
    finally:
        kill([decoy.pid])
        driver.stdin.close()
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill([driver.pid])
        kill(p.pid for p in marked(MARKER, marker))
        decoy.wait(timeout=10)


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    # Ray's gRPC servers listen on the IPv4-mapped ::ffff:127.0.0.1 of an IPv6 socket.
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def external_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    return [
        addr.address
        for addrs in psutil.net_if_addrs().values()
        for addr in addrs
        if addr.family == socket.AF_INET and not ipaddress.ip_address(addr.address).is_loopback
    ]


def answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


def titles(sockets: set[tuple[str, int, int]]) -> set[str]:
    found = set()
    for _, _, pid in sockets:
        try:
            found.add(" ".join(psutil.Process(pid).cmdline()))
        except psutil.Error:
            continue
    return found


def test_the_local_cluster_listens_on_loopback_only(local_cluster: LocalCluster) -> None:
    deadline = time.monotonic() + 60
    while not all(any(k in t for t in titles(local_cluster.sockets())) for k in LISTENERS):
        assert time.monotonic() < deadline, titles(local_cluster.sockets())
        time.sleep(0.5)
    time.sleep(2)  # late listeners (the agents' metrics exporters) have opened by now
    sockets = local_cluster.sockets()
    exposed = {s for s in sockets if not is_loopback(s[0])}
    assert not exposed, [(ip, port, titles({(ip, port, pid)})) for ip, port, pid in exposed]
    node = local_cluster.info["node"]
    assert node["NodeManagerAddress"] == "127.0.0.1"
    # The metrics agent's Prometheus exporter (it answers without a token) is off...
    assert node["MetricsExportPort"] <= 0, node
    # ...and nothing of the cluster answers on this machine's other addresses.
    ports = {port for _, port, _ in sockets}
    for host in external_addresses():
        assert not [port for port in ports if answers(host, port)], host


def test_ray_jobs_run_their_driver_on_this_cluster_beside_others(
    local_cluster: LocalCluster,
) -> None:
    info = local_cluster.info
    assert info["gcs"].startswith("127.0.0.1:")
    assert info["driver_address"] == info["gcs"]
