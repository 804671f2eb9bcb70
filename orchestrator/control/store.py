"""The job store: the source of truth for every job the REST service accepted.

SQLAlchemy 2 Core over SQLite (embedded default, ``$SPARKORCH_HOME/jobs.db``) or PostgreSQL
(``SPARKORCH_DATABASE_URL``). The schema is versioned with Alembic: the revisions are in
:mod:`orchestrator.control.migrations` and :meth:`JobStore.migrate` upgrades a database to
this code's head at start-up. A database made before Alembic (``schema_migrations`` at
version 1) is adopted as revision ``0001`` with its jobs untouched; a database newer than
this code is refused.

Job states::

    [HELD ->] QUEUED -> SUBMITTING -> PENDING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED

``HELD``: accepted with ``hold``, not scheduled until released. ``QUEUED``: accepted,
waiting for the owner's quota. ``SUBMITTING``: written before the Ray
submission, so a crash between the two is recovered by asking Ray for the submission id
(never by submitting twice). The reconciler moves jobs on from what Ray reports.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from orchestrator.control.states import ACTIVE_STATES, JOB_STATES, ON_RAY_STATES, TERMINAL_STATES

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The hand-written version table the store used before Alembic, and the last version it
# recorded; such a database has exactly the schema of revision FIRST_REVISION.
LEGACY_VERSION_TABLE = "schema_migrations"
LEGACY_VERSION = 1
FIRST_REVISION = "0001"
# pg_advisory_xact_lock key (any fixed bigint): serialises migrate() across processes.
MIGRATION_LOCK_KEY = 0x5350_4B4A_4F42_5301
# Alembic's ``context`` and ``op`` are process-wide proxies: two threads must not run
# revisions at once, even on different databases.
_ALEMBIC_LOCK = threading.Lock()

# The schema at the head revision, for queries; revisions never import it (see 0001).
metadata = sa.MetaData()

jobs_table = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("idempotency_key", sa.String(200)),
    sa.Column("num_workers", sa.Integer, nullable=False),
    sa.Column("num_gpus", sa.Float, nullable=False),
    sa.Column("submissions", sa.Integer, nullable=False, default=0),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("message", sa.Text),
    sa.Column("mlflow_run_id", sa.String(64)),
    sa.Column("mlflow_experiment_id", sa.String(64)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
    sa.Index("ix_jobs_owner_created", "owner", "created_at"),
    sa.Index("ix_jobs_state", "state"),
)


class StoreError(Exception):
    """The store cannot serve the request (schema too new, conflicting idempotency key)."""


class IdempotencyConflict(StoreError):
    """The Idempotency-Key was used before with a different request body."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands back naive datetimes; every stored time is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    name: str
    owner: str
    state: str
    spec: dict[str, Any]
    request_hash: str
    num_workers: int
    num_gpus: float
    created_at: dt.datetime
    updated_at: dt.datetime
    idempotency_key: str | None = None
    submissions: int = 0
    cancel_requested: bool = False
    message: str | None = None
    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @classmethod
    def from_row(cls, row: Any) -> Job:
        data = dict(row._mapping)
        data["spec"] = json.loads(data["spec"])
        for key in ("created_at", "updated_at", "started_at", "finished_at"):
            data[key] = _aware(data[key])
        return cls(**data)


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None = None


@dataclass(frozen=True)
class JobFilter:
    owner: str
    states: Sequence[str] = ()
    kind: str | None = None
    name: str | None = None


def request_hash(kind: str, spec: dict[str, Any], hold: bool = False) -> str:
    """Stable hash of a submission (what an Idempotency-Key is checked against)."""
    request: dict[str, Any] = {"kind": kind, "spec": spec}
    # ``hold`` is part of the request, but only hashed when set: a ``hold: false`` request
    # hashes as it did before ``hold`` existed, so stored jobs' keys keep matching.
    if hold:
        request["hold"] = True
    body = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    """Raises ValueError on a cursor this store did not hand out."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split("|", 1)
        return _aware(dt.datetime.fromisoformat(created)), job_id
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError("cursor is not one this service returned") from error


def create_store_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=True
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
            _enable_wal(dbapi_connection)

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def _enable_wal(dbapi_connection: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """Put the SQLite database in WAL mode (a setting of the file: a no-op once done)."""
    # Switching a new database to WAL needs an exclusive lock that SQLite does not wait for
    # (busy_timeout does not apply), so two processes opening it at once (API and migrate)
    # can get "database is locked": retry as long as busy_timeout would have waited.
    deadline = time.monotonic() + timeout_s
    while True:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
        finally:
            cursor.close()
        time.sleep(0.05)


def alembic_config() -> Config:
    """Alembic's configuration for the job store, without an alembic.ini: the revisions in
    :data:`MIGRATIONS_DIR`; the connection goes in ``attributes["connection"]``."""
    config = Config()
    # configparser interpolates ``%``; a path may contain one.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    return config


class JobStore:
    """All reads and writes of jobs. Every method is one transaction."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or create_store_engine(url)

    # ------------------------------------------------------------------ schema

    def migrate(self) -> str:
        """``alembic upgrade head``: bring the schema to this code's revision, which it returns.

        Safe to call on every start and from several processes at once: everything runs in
        one transaction under a lock (a PostgreSQL advisory lock, SQLite's write lock), so a
        second caller waits and then finds nothing to do. A pre-Alembic database is stamped
        at :data:`FIRST_REVISION` first (its rows untouched). Raises :class:`StoreError` when
        the database is newer than this code.
        """
        config = alembic_config()
        script = ScriptDirectory.from_config(config)
        head = script.get_current_head()
        with _ALEMBIC_LOCK, self.engine.connect() as conn:
            self._lock_for_migration(conn)
            config.attributes["connection"] = conn
            revision = self._check_revision(conn, script, head)
            if revision is None and self._is_legacy(conn, head):
                command.stamp(config, FIRST_REVISION)
                logger.info("job store: adopted the pre-Alembic schema as %s", FIRST_REVISION)
            command.upgrade(config, "head")
            conn.commit()
        logger.info("job store %s at schema revision %s", self.safe_url, head)
        return head

    @staticmethod
    def _lock_for_migration(conn: Connection) -> None:
        # Taken first, before anything is read, so that the checks below see what a
        # concurrent migrate() committed.
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
        elif conn.dialect.name == "sqlite":
            # pysqlite runs DDL outside any transaction by default; an explicit immediate
            # transaction makes the whole upgrade atomic and takes the write lock now.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    def _check_revision(
        self, conn: Connection, script: ScriptDirectory, head: str | None
    ) -> str | None:
        """The database's Alembic revision (None before Alembic); refuses unknown ones."""
        current = MigrationContext.configure(conn).get_current_heads()
        known = {revision.revision for revision in script.walk_revisions()}
        unknown = sorted(set(current) - known)
        if unknown:
            raise self._too_new(f"revision {', '.join(unknown)}", head)
        return current[0] if current else None

    def _is_legacy(self, conn: Connection, head: str | None) -> bool:
        """Whether the database was made by the pre-Alembic store (and is not too new)."""
        if not sa.inspect(conn).has_table(LEGACY_VERSION_TABLE):
            return False
        version = conn.scalar(sa.text(f"SELECT max(version) FROM {LEGACY_VERSION_TABLE}"))
        if version is not None and version > LEGACY_VERSION:
            raise self._too_new(f"version {version} in {LEGACY_VERSION_TABLE}", head)
        # An empty table: the old store died before creating ``jobs``; start from nothing.
        return version == LEGACY_VERSION

    def _too_new(self, found: str, head: str | None) -> StoreError:
        return StoreError(
            f"the job store {self.safe_url} has schema {found}, newer than this code "
            f"(revision {head}): upgrade the service"
        )

    def schema_revision(self) -> str | None:
        """The database's Alembic revision; None before :meth:`migrate`."""
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @property
    def safe_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # ------------------------------------------------------------------ writes

    def create(self, job: Job) -> tuple[Job, bool]:
        """Insert ``job``; with an idempotency key already used by the owner, return that
        job instead (``created`` False) or raise :class:`IdempotencyConflict`."""
        if job.idempotency_key:
            existing = self._by_idempotency_key(job.owner, job.idempotency_key)
            if existing is not None:
                return self._same_request(existing, job), False
        values = {**job.__dict__, "spec": json.dumps(job.spec, sort_keys=True)}
        try:
            with self.engine.begin() as conn:
                conn.execute(jobs_table.insert().values(**values))
        except sa.exc.IntegrityError:
            # Lost a race with the same key: the other request's job is the answer.
            existing = self._by_idempotency_key(job.owner, job.idempotency_key or "")
            if existing is None:
                raise
            return self._same_request(existing, job), False
        return job, True

    @staticmethod
    def _same_request(existing: Job, job: Job) -> Job:
        if existing.request_hash != job.request_hash:
            raise IdempotencyConflict(
                "this Idempotency-Key was used with a different request body; "
                "use a new key for a new job"
            )
        return existing

    def update(self, job_id: str, *, expect_states: Iterable[str] = (), **values: Any) -> bool:
        """Set columns of one job; with ``expect_states``, only if it is in one of them.
        Returns whether a row changed (the compare-and-set the reconciler relies on)."""
        statement = jobs_table.update().where(jobs_table.c.id == job_id)
        states = tuple(expect_states)
        if states:
            statement = statement.where(jobs_table.c.state.in_(states))
        state = values.get("state")
        if state in TERMINAL_STATES:
            values.setdefault("finished_at", utcnow())
        if state == "RUNNING":
            values.setdefault("started_at", utcnow())
        with self.engine.begin() as conn:
            result = conn.execute(statement.values(updated_at=utcnow(), **values))
        return result.rowcount == 1

    # ------------------------------------------------------------------ reads

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        query = sa.select(jobs_table).where(jobs_table.c.id == job_id)
        if owner is not None:
            query = query.where(jobs_table.c.owner == owner)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return Job.from_row(row) if row else None

    def _by_idempotency_key(self, owner: str, key: str) -> Job | None:
        query = sa.select(jobs_table).where(
            jobs_table.c.owner == owner, jobs_table.c.idempotency_key == key
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return Job.from_row(row) if row else None

    def list(self, where: JobFilter, *, limit: int, cursor: str | None = None) -> JobPage:
        """Newest first; ``cursor`` continues after the last job of the previous page."""
        c = jobs_table.c
        query = sa.select(jobs_table).where(c.owner == where.owner)
        if where.states:
            query = query.where(c.state.in_(list(where.states)))
        if where.kind:
            query = query.where(c.kind == where.kind)
        if where.name:
            query = query.where(c.name == where.name)
        if cursor:
            created, job_id = decode_cursor(cursor)
            query = query.where(
                sa.or_(c.created_at < created, sa.and_(c.created_at == created, c.id < job_id))
            )
        query = query.order_by(c.created_at.desc(), c.id.desc()).limit(limit + 1)
        with self.engine.connect() as conn:
            jobs = [Job.from_row(row) for row in conn.execute(query)]
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return JobPage(jobs, encode_cursor(jobs[-1]) if more and jobs else None)

    def active_jobs(self) -> list[Job]:
        """Every job the reconciler still has to look after, oldest first."""
        query = (
            sa.select(jobs_table)
            .where(jobs_table.c.state.in_(ACTIVE_STATES))
            .order_by(jobs_table.c.created_at, jobs_table.c.id)
        )
        with self.engine.connect() as conn:
            return [Job.from_row(row) for row in conn.execute(query)]

    def count_active(self, owner: str, states: Sequence[str] = ACTIVE_STATES) -> int:
        query = sa.select(sa.func.count()).where(
            jobs_table.c.owner == owner, jobs_table.c.state.in_(list(states))
        )
        with self.engine.connect() as conn:
            return int(conn.scalar(query) or 0)


def new_job(
    *,
    job_id: str,
    kind: str,
    name: str,
    owner: str,
    spec: dict[str, Any],
    num_workers: int,
    num_gpus: float,
    idempotency_key: str | None = None,
    submitted_document: dict[str, Any] | None = None,
    hold: bool = False,
) -> Job:
    """A QUEUED job (HELD with ``hold``). The idempotency hash covers ``hold`` and
    ``submitted_document`` (what the client sent) when given, else the stored spec."""
    now = utcnow()
    return Job(
        id=job_id,
        kind=kind,
        name=name,
        owner=owner,
        state="HELD" if hold else "QUEUED",
        spec=spec,
        request_hash=request_hash(
            kind, spec if submitted_document is None else submitted_document, hold
        ),
        num_workers=num_workers,
        num_gpus=num_gpus,
        created_at=now,
        updated_at=now,
        idempotency_key=idempotency_key,
    )


__all__ = [
    "ACTIVE_STATES",
    "JOB_STATES",
    "MIGRATIONS_DIR",
    "ON_RAY_STATES",
    "TERMINAL_STATES",
    "IdempotencyConflict",
    "Job",
    "JobFilter",
    "JobPage",
    "JobStore",
    "StoreError",
    "alembic_config",
    "new_job",
    "request_hash",
]
