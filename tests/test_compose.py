"""The deployment files keep their promises: nothing internal published, published ports on
127.0.0.1, images pinned, health checks and healthy-ordering everywhere, secrets only from
.env (no defaults), and Debian's docker-compose accepts the file (when installed: .ci/run
installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
INTERNAL = {"ray-head", "ray-worker", "postgres", "minio", "minio-init", "redis"}
ONE_SHOT = {"minio-init"}
# The only published services, each with the one container port it publishes.
PUBLISHED = {"api": 8000, "mlflow": 5000}
# An S3 access key id is a user name (AWS_ACCESS_KEY_ID); its secret key is the secret.
SECRET = re.compile(r"PASSWORD|TOKEN|SECRET|SHA256")
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_the_stack_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "api",
        "ray-head",
        "ray-worker",
        "mlflow",
        "postgres",
        "minio",
        "minio-init",
        "redis",
    }


def test_only_api_and_mlflow_are_published_and_only_on_loopback(compose: dict) -> None:
    """Each of PUBLISHED publishes its one port on 127.0.0.1; nothing else reaches the
    host (``expose`` stays on the compose network, host networking would publish all)."""
    published = {}
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", f"{name} shares the host's network"
        ports = service.get("ports", [])
        if name in INTERNAL:
            assert not ports, f"{name} must not publish ports"
            continue
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        published[name] = [int(str(port).rpartition(":")[2]) for port in ports]
    assert published == {name: [port] for name, port in PUBLISHED.items()}


def test_every_image_is_pinned(compose: dict) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {image} is not pinned"
        assert re.search(r"\d", tag), f"{name}: {image} has no version in its tag"
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", dockerfile).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base


def test_health_checks_and_ordering(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
            continue
        assert "healthcheck" in service, f"{name} has no health check"
        for dependency, rule in service.get("depends_on", {}).items():
            expected = (
                "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            )
            assert rule == {"condition": expected}, f"{name} -> {dependency}: {rule}"
    assert "ray-head" in services["ray-worker"]["depends_on"]
    assert {"postgres", "ray-head", "mlflow"} <= set(services["api"]["depends_on"])


def test_secrets_come_from_env_without_defaults(compose: dict) -> None:
    text = COMPOSE.read_text()
    example = (ROOT / ".env.example").read_text()
    secrets = set()
    for variable, rest in VARIABLE.findall(text):
        if SECRET.search(variable) or variable.startswith(("MINIO_ROOT", "POSTGRES")):
            assert rest.startswith(":?"), f"${{{variable}{rest}}} must have no default"
            secrets.add(variable)
        assert f"\n{variable}=" in example, f"{variable} is missing from .env.example"
    assert {"POSTGRES_PASSWORD", "RAY_AUTH_TOKEN", "MINIO_ROOT_PASSWORD"} <= secrets
    for name, service in compose["services"].items():
        values = list((service.get("environment") or {}).items())
        values += [("command", arg) for arg in service.get("command") or [] if "@" in arg]
        for key, value in values:
            if SECRET.search(key) or "@" in str(value):
                references = VARIABLE.findall(str(value))
                if SECRET.search(key) and not str(value).startswith("$$"):
                    assert references, f"{name}: {key} is a literal, not from .env"
                assert all(rest.startswith(":?") for _, rest in references), (name, key)


def test_ray_token_auth_and_storage_on_every_ray_client(compose: dict) -> None:
    for name in ("ray-head", "ray-worker", "api"):
        env = compose["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${")
        assert env["SPARKORCH_RAY_STORAGE"].startswith("s3://")
    for name in ("ray-head", "ray-worker"):
        assert compose["services"][name]["shm_size"]
    assert "RAY_REDIS_ADDRESS" in compose["services"]["ray-head"]["environment"]
    mlflow = " ".join(compose["services"]["mlflow"]["command"])
    assert "--serve-artifacts" in mlflow and "--allowed-hosts" in mlflow
    assert "basic-auth" in mlflow


def test_ray_gives_a_cancelled_driver_time_to_end_its_run(compose: dict) -> None:
    """The nodes' job supervisors wait as long as the embedded stack's (longer than the
    driver's own clean-up) before SIGKILL; drivers get no forwarded environment there."""
    from orchestrator.control.scheduler import JOB_STOP_WAIT_S
    from orchestrator.driver_guard import CLEANUP_TIMEOUT_S

    assert JOB_STOP_WAIT_S > CLEANUP_TIMEOUT_S
    for name in ("ray-head", "ray-worker"):
        env = compose["services"][name]["environment"]
        assert env["RAY_JOB_STOP_WAIT_TIME_S"] == str(JOB_STOP_WAIT_S)


def test_minio_root_credentials_stay_in_minio_and_each_user_gets_one_bucket(
    compose: dict,
) -> None:
    services = compose["services"]
    for name, service in services.items():
        if name not in ("minio", "minio-init"):
            assert "MINIO_ROOT" not in str(service), f"{name} sees MinIO's root credentials"
    users = {
        name: services[name]["environment"]["AWS_ACCESS_KEY_ID"]
        for name in ("api", "ray-head", "ray-worker", "mlflow")
    }
    assert users == {
        "api": "ray-storage",
        "ray-head": "ray-storage",
        "ray-worker": "ray-storage",
        "mlflow": "mlflow-artifacts",
    }
    init = services["minio-init"]["entrypoint"][-1]
    assert "grant sparkorch ray-storage" in init and "grant mlflow mlflow-artifacts" in init
    assert '"arn:aws:s3:::%s","arn:aws:s3:::%s/*"' in init  # the policy names one bucket
    # Objects only: no bucket policy, no deleting the bucket.
    assert "s3:*" not in init and '"s3:PutObject"' in init and "BucketPolicy" not in init


def test_gpu_override_requests_gpus() -> None:
    override = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    devices = override["services"]["ray-worker"]["deploy"]["resources"]["reservations"]
    assert devices["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_accepts_the_file_and_refuses_missing_secrets(
    tmp_path: Path,
) -> None:
    for name in ("docker-compose.yml", "docker-compose.gpu.yml", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    ok = subprocess.run(
        ["docker-compose", "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout)
    published = [p for s in resolved["services"].values() for p in s.get("ports", [])]
    assert published and all(
        (p["host_ip"] if isinstance(p, dict) else str(p).split(":")[0]) == "127.0.0.1"
        for p in published
    )
    (tmp_path / ".env").write_text(
        "\n".join(
            line
            for line in (ROOT / ".env.example").read_text().splitlines()
            if not line.startswith("RAY_AUTH_TOKEN=")
        )
    )
    missing = subprocess.run(
        ["docker-compose", "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode != 0 and "RAY_AUTH_TOKEN" in missing.stderr
