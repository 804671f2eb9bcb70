"""Joining a Ray cluster (``RAY_ADDRESS``) or starting a local one, always with token auth.

Ray 2.60 turns token authentication on for local clusters; we set it explicitly so that the
mode never depends on what happens to lie in ``~/.ray``: ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH`` pointing at the settings' token file (created, mode 0600, for a
local cluster). Every Ray process started from here inherits both. Where ``RAY_AUTH_TOKEN``
holds the token itself (containers), no file is needed.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from orchestrator.settings import OrchestratorSettings

# Ray Train V2's switch for its per-run preemption watcher actor (ray.train.v2 constants).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

logger = logging.getLogger(__name__)

# A sweep trial's driver (which only waits on its Ray Train workers) holds one unit of this
# custom resource instead of a CPU, so it never takes a CPU its own workers need. Every
# head node advertises it (``ray start --resources='{"sparkorch_trial_driver": 1000}'``).
TRIAL_DRIVER_RESOURCE = "sparkorch_trial_driver"
TRIAL_DRIVER_SLOTS = 1000
LOOPBACK = "127.0.0.1"
# Where Ray looks for "the" cluster of a temp dir (ray._common.utils.get_ray_address_file).
RAY_ADDRESS_FILE = "ray_current_cluster"


def ensure_token_file(path: Path) -> Path:
    """Create a random Ray token at ``path`` (owner read/write only) unless one exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    logger.info("created Ray auth token %s", path)
    return path


def configure_ray_auth(settings: OrchestratorSettings) -> Path:
    """Token auth for this process and the Ray processes it starts; returns the token file."""
    path = settings.token_path
    if os.environ.get("RAY_AUTH_TOKEN"):
        # The token itself is in the environment (a container's secret); Ray reads it there.
        os.environ["RAY_AUTH_MODE"] = "token"
        refresh_ray_auth_config()
        return path
    if settings.ray_address is None:
        ensure_token_file(path)
    elif not path.is_file():
        raise FileNotFoundError(
            f"Ray token file {path} not found: copy the cluster's token there or point "
            "RAY_AUTH_TOKEN_PATH at it (the cluster runs with RAY_AUTH_MODE=token)"
        )
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    refresh_ray_auth_config()
    return path


def refresh_ray_auth_config() -> None:
    """Make an already imported Ray re-read the auth settings from the environment.

    Ray caches its config (and the token) when first imported; Ray's own ``ray.init`` does
    the same refresh when it turns token auth on by default.
    """
    import sys

    if "ray" not in sys.modules:
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def init_local_cluster(
    settings: OrchestratorSettings,
    dashboard_port: int | None = None,
    node_env: Mapping[str, str] | None = None,
) -> str:
    """Start a Ray cluster owned by this process, reachable from this machine only.

    Returns its dashboard URL. The dashboard hosts the state API that Ray Train's clean-up
    actor queries. ``address="local"``: a new cluster even when ``ray start`` left one on
    this machine (a bare ``ray.init()`` would join that one). Every Ray process listens on
    127.0.0.1 only (see ``loopback_node_ip``), and the metrics agent's Prometheus exporter,
    which answers without a token, is off. Its session (logs, sockets) is in a new
    ``/tmp/sparkorch-ray-*`` folder (mode 0700) instead of the shared ``/tmp/ray``.

    Ray Train's preemption watcher is off (unless the environment says otherwise): one
    machine has no node that could be drained, and on 2 cores the watcher's extra process
    starts just when the workers import their code, delaying a job's first step. This
    process and every Ray process it starts (Ray Jobs drivers included) inherit the setting.

    ``node_env`` is set in the environment of the cluster's processes, and so of every
    worker and Ray Jobs driver they start (this process's environment is left as it was):
    the way a cluster's nodes carry the service's settings without a per-job
    ``runtime_env``, whose every worker process starts twice (Ray's ``setup_worker`` imports
    Ray, then execs the worker, which imports it again).
    """
    import ray

    configure_ray_auth(settings)
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    port = {} if dashboard_port is None else {"dashboard_port": dashboard_port}
    temp_dir = tempfile.mkdtemp(prefix="sparkorch-ray-")
    with loopback_node_ip(), environment_set(node_env or {}), process_logging_kept():
        context = ray.init(
            address="local",
            num_cpus=settings.ray_num_cpus,
            resources={TRIAL_DRIVER_RESOURCE: TRIAL_DRIVER_SLOTS},
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,
            _system_config={"enable_metrics_collection": False},
            _temp_dir=temp_dir,
            logging_config=ray.LoggingConfig(log_level="WARNING"),
            **port,
        )
    # Ray Jobs start each driver on the cluster named in <temp dir>/ray_current_cluster,
    # which only `ray start` writes; without it, on *any* Ray cluster running on this machine
    # (another user's, on a shared one). Hence a temp dir of its own that names this one.
    Path(temp_dir, RAY_ADDRESS_FILE).write_text(context.address_info["gcs_address"])
    return f"http://{context.dashboard_url}"


@contextmanager
def process_logging_kept() -> Iterator[None]:
    """This process's root logger as it was, after a ``ray.init`` in the block.

    ``ray.init``'s ``logging_config`` (WARNING: Ray's own INFO lines stay out of the job's
    logs) sets the root logger of every process of the job, this one included: a driver's
    INFO lines (its MLflow run, a resume) vanished once it had connected, and each of its
    warnings was printed twice (a second handler). Ray's own logger keeps the quiet level.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


@contextmanager
def environment_set(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in this process's environment for the block (processes started in it
    inherit them), then the environment as it was."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def loopback_node_ip() -> Iterator[None]:
    """Make the Ray node started in this block use 127.0.0.1 as its address.

    Ray 2.60 replaces a loopback ``_node_ip_address`` by the machine's routable address
    (``services.resolve_ip_for_localhost``) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is
    false: the setting with which Ray runs single-node clusters on macOS and Windows. With a
    127.0.0.1 node address the GCS, the raylet, the workers and the agents listen on
    127.0.0.1 instead of every interface. Ray reads the variable once, at import, into
    ``ray_constants.ENABLE_RAY_CLUSTER``: both are set for the block and restored after, so
    that this process can still start a multi-node cluster later (``ray start --address``
    refuses to with the variable false). Ray's processes started in the block inherit it.
    """
    from ray._private import ray_constants

    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with environment_set({ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag


@contextmanager
def ray_session(settings: OrchestratorSettings) -> Iterator[None]:
    """Connect to Ray for the duration of the block (reuses an existing connection)."""
    import ray

    if ray.is_initialized():
        yield
        return
    configure_ray_auth(settings)
    quiet = ray.LoggingConfig(log_level="WARNING")
    # ray.init replaces the SIGTERM handler with sys.exit; keep the caller's (which turns
    # ``ray job stop`` into a clean cancellation).
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    if settings.ray_address:
        with process_logging_kept():
            ray.init(address=settings.ray_address, logging_config=quiet)
    else:
        init_local_cluster(settings)
    if threading.current_thread() is threading.main_thread() and sigterm_handler is not None:
        signal.signal(signal.SIGTERM, sigterm_handler)
    try:
        yield
    finally:
        ray.shutdown()
