"""The job store on SQLite and PostgreSQL: Alembic migrations (from nothing and from the
pre-Alembic schema), idempotency, paging, compare-and-set."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from orchestrator.control import store as store_module
from orchestrator.control.store import (
    MIGRATIONS_DIR,
    IdempotencyConflict,
    Job,
    JobFilter,
    JobStore,
    StoreError,
    alembic_config,
    metadata,
    new_job,
    request_hash,
    utcnow,
)

# The schema the store created before Alembic (schema_migrations version 1), frozen here so
# that the upgrade tests do not depend on the code under test.
LEGACY = sa.MetaData()
sa.Table(
    "schema_migrations",
    LEGACY,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)
sa.Table(
    "jobs",
    LEGACY,
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
    sa.Column("submissions", sa.Integer, nullable=False),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
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
LEGACY_JOB_ID = "00000000-0000-4000-8000-00000000abcd"
WRITES = ("CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE")


def make_job(
    number: int, owner: str = "alice", key: str | None = None, hold: bool = False, **spec: object
) -> Job:
    return new_job(
        job_id=f"00000000-0000-4000-8000-{number:012d}",
        kind="pretrain",
        name=f"job-{number}",
        owner=owner,
        spec={"name": f"job-{number}", **spec},
        num_workers=1,
        num_gpus=0.0,
        idempotency_key=key,
        hold=hold,
    )


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    store = JobStore(store_url)
    store.migrate()
    yield store
    store.engine.dispose()


@pytest.fixture
def bare(store_url: str) -> Iterator[JobStore]:
    """A store on an empty database, not migrated."""
    store = JobStore(store_url)
    yield store
    store.engine.dispose()


def head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def make_legacy_database(engine: sa.Engine, version: int = 1) -> None:
    """What the pre-Alembic store left behind: its tables, a job, its version row."""
    started = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    with engine.begin() as conn:
        LEGACY.create_all(conn)
        conn.execute(
            LEGACY.tables["schema_migrations"].insert(),
            [{"version": version, "description": "jobs table", "applied_at": started}],
        )
        conn.execute(
            LEGACY.tables["jobs"].insert(),
            [
                {
                    "id": LEGACY_JOB_ID,
                    "kind": "pretrain",
                    "name": "old-run",
                    "owner": "alice",
                    "state": "RUNNING",
                    "spec": '{"name": "old-run"}',
                    "request_hash": "ab" * 32,
                    "idempotency_key": "old-key",
                    "num_workers": 2,
                    "num_gpus": 0.5,
                    "submissions": 1,
                    "cancel_requested": False,
                    "mlflow_run_id": "run-1",
                    "created_at": started,
                    "updated_at": started,
                    "started_at": started,
                }
            ],
        )


def schema_differences(engine: sa.Engine) -> list[Any]:
    """What autogenerate would change to make the database match ``jobs_table``."""
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "include_object": lambda obj, name, type_, *_: name != "schema_migrations",
            },
        )
        return compare_metadata(context, metadata)


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


# ----------------------------------------------------------------------------- migrations


def test_an_empty_database_is_upgraded_to_the_jobs_table(bare: JobStore) -> None:
    assert bare.schema_revision() is None
    assert bare.migrate() == head()
    assert bare.schema_revision() == head()
    assert table_names(bare.engine) == {"alembic_version", "jobs"}
    assert schema_differences(bare.engine) == []


def test_a_database_made_before_alembic_keeps_its_jobs(bare: JobStore) -> None:
    make_legacy_database(bare.engine)
    assert bare.migrate() == head()
    assert bare.schema_revision() == head()
    # The old version table stays (older code still reads it); the schema is the head's.
    assert table_names(bare.engine) == {"alembic_version", "jobs", "schema_migrations"}
    assert schema_differences(bare.engine) == []
    old = bare.get(LEGACY_JOB_ID)
    assert old is not None
    assert (old.name, old.state, old.idempotency_key, old.num_gpus) == (
        "old-run",
        "RUNNING",
        "old-key",
        0.5,
    )
    assert old.started_at == dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    assert old.spec == {"name": "old-run"} and old.mlflow_run_id == "run-1"
    _, created = bare.create(make_job(1))
    assert created and len(bare.active_jobs()) == 2


LATER_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "0002_test"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default="5"))
"""


FAILING_REVISION = (
    LATER_REVISION
    + """
    raise RuntimeError("revision 0002_test breaks half-way")
"""
)


def with_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """Point the store at a copy of its revisions plus ``0002_test``."""
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "0002_test.py").write_text(text)
    monkeypatch.setattr(store_module, "MIGRATIONS_DIR", scripts)


def test_a_later_revision_runs_after_the_pre_alembic_schema_is_adopted(
    bare: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stamped at 0001, then upgraded: the next revision alters the table, rows kept."""
    with_revision(tmp_path, monkeypatch, LATER_REVISION)
    make_legacy_database(bare.engine)
    assert bare.migrate() == "0002_test"
    assert bare.schema_revision() == "0002_test"
    with bare.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT name, state, priority FROM jobs")).one()
    assert tuple(row) == ("old-run", "RUNNING", 5)


def test_a_failing_revision_leaves_the_database_as_it_was(
    bare: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stamp and upgrade are one transaction, on SQLite too."""
    with_revision(tmp_path, monkeypatch, FAILING_REVISION)
    make_legacy_database(bare.engine)
    with pytest.raises(RuntimeError, match="half-way"):
        bare.migrate()
    assert bare.schema_revision() is None
    assert table_names(bare.engine) == {"jobs", "schema_migrations"}
    columns = {column["name"] for column in sa.inspect(bare.engine).get_columns("jobs")}
    assert "priority" not in columns
    assert bare.get(LEGACY_JOB_ID) is not None


def test_migrating_again_changes_nothing(store: JobStore) -> None:
    store.create(make_job(1))
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", record)
    try:
        assert store.migrate() == head()
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", record)
    assert statements, "the listener saw nothing: the test proves nothing"
    writes = [s for s in statements if s.lstrip().upper().startswith(WRITES)]
    assert writes == []
    assert [job.name for job in store.active_jobs()] == ["job-1"]


def _make_future_alembic(store: JobStore) -> None:
    store.migrate()
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))


@pytest.mark.parametrize(
    "make_newer",
    [_make_future_alembic, lambda store: make_legacy_database(store.engine, version=2)],
    ids=["alembic", "pre-alembic"],
)
def test_a_database_newer_than_the_code_is_refused(bare: JobStore, make_newer: Any) -> None:
    make_newer(bare)
    before = table_names(bare.engine)
    with pytest.raises(StoreError, match=r"newer than this code .*: upgrade the service"):
        bare.migrate()
    assert table_names(bare.engine) == before  # refused before writing anything


def test_concurrent_migrations_from_two_threads_both_succeed(store_url: str) -> None:
    """Two stores (two engines) of one process migrating one database at once."""
    stores = [JobStore(store_url) for _ in range(2)]
    barrier = threading.Barrier(len(stores))
    results: dict[int, object] = {}

    def migrate(index: int) -> None:
        barrier.wait()
        try:
            results[index] = stores[index].migrate()
        except Exception as error:  # reported by the assertion below
            results[index] = error

    threads = [threading.Thread(target=migrate, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert results == {0: head(), 1: head()}
        assert stores[0].schema_revision() == head()
    finally:
        for store in stores:
            store.engine.dispose()


MIGRATE_WHEN_TOLD = """
import sys
from orchestrator.control.store import JobStore
store = JobStore(sys.argv[1])
store.ping()
print("ready", flush=True)
sys.stdin.readline()
print(store.migrate(), flush=True)
"""


def test_concurrent_migrations_from_several_processes_all_succeed(store_url: str) -> None:
    """API processes may start at once on a new database: the database lock (an advisory
    lock on PostgreSQL, the write lock on SQLite) lets one migrate while the others wait."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE_WHEN_TOLD, store_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for process in processes:  # all imported and connected before any starts
            assert process.stdout.readline().strip() == "ready", process.stderr.read()
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        outcomes = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (out, err) in zip(processes, outcomes, strict=True):
        assert process.returncode == 0 and out.strip() == head(), err
    store = JobStore(store_url)
    try:
        assert store.schema_revision() == head() and schema_differences(store.engine) == []
    finally:
        store.engine.dispose()


def test_two_databases_migrated_at_once_in_one_process(tmp_path: Path) -> None:
    """Alembic's ``context`` is process-wide: migrate() keeps two threads' runs apart even
    when no database lock would (two databases)."""
    stores = [JobStore(f"sqlite:///{tmp_path / name}.db") for name in ("a", "b")]
    barrier = threading.Barrier(len(stores))
    results: dict[int, object] = {}

    def migrate(index: int) -> None:
        stores[index].ping()
        barrier.wait()
        try:
            results[index] = stores[index].migrate()
        except Exception as error:  # reported by the assertion below
            results[index] = error

    threads = [threading.Thread(target=migrate, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert results == {0: head(), 1: head()}
        assert [store.schema_revision() for store in stores] == [head(), head()]
    finally:
        for store in stores:
            store.engine.dispose()


def test_a_new_sqlite_database_opens_while_another_connection_writes(tmp_path: Path) -> None:
    """Switching a new SQLite file to WAL does not wait on SQLite's busy timeout: the store
    retries instead of failing its first connection."""
    path = tmp_path / "jobs.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE other (x INTEGER)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO other VALUES (1)")
    release = threading.Timer(0.3, writer.execute, args=("COMMIT",))
    release.start()
    store = JobStore(f"sqlite:///{path}")
    try:
        store.ping()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        release.join()
        writer.close()
        store.engine.dispose()


# ----------------------------------------------------------------------------- jobs


def test_create_get_and_owner_isolation(store: JobStore) -> None:
    job, created = store.create(make_job(1, spec_value=3))
    assert created
    loaded = store.get(job.id)
    assert loaded is not None and loaded.spec == {"name": "job-1", "spec_value": 3}
    assert loaded.state == "QUEUED" and loaded.created_at.tzinfo is not None
    assert store.get(job.id, owner="alice") is not None
    assert store.get(job.id, owner="bob") is None


def test_idempotency_key_returns_the_same_job_or_conflicts(store: JobStore) -> None:
    first, created = store.create(make_job(1, key="k1"))
    retry = dataclasses.replace(make_job(1, key="k1"), id="00000000-0000-4000-8000-00000000000f")
    again, created_again = store.create(retry)
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        store.create(make_job(3, key="k1", different=True))
    # Keys are per owner.
    other, created_other = store.create(make_job(4, owner="bob", key="k1"))
    assert created_other and other.id != first.id


def test_list_is_newest_first_with_a_cursor(store: JobStore) -> None:
    base = utcnow()
    for number in range(7):
        job = make_job(number)
        job = dataclasses.replace(job, created_at=base + dt.timedelta(seconds=number))
        store.create(job)
    store.create(make_job(50, owner="bob"))
    seen: list[str] = []
    cursor = None
    while True:
        page = store.list(JobFilter(owner="alice"), limit=3, cursor=cursor)
        seen += [job.name for job in page.jobs]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [f"job-{n}" for n in range(6, -1, -1)]
    only = store.list(JobFilter(owner="alice", name="job-2"), limit=10)
    assert [job.name for job in only.jobs] == ["job-2"]
    with pytest.raises(ValueError, match="cursor"):
        store.list(JobFilter(owner="alice"), limit=3, cursor="not-a-cursor!")


def test_update_is_a_compare_and_set_on_the_state(store: JobStore) -> None:
    job, _ = store.create(make_job(1))
    assert store.update(job.id, expect_states=["QUEUED"], state="SUBMITTING", submissions=1)
    assert not store.update(job.id, expect_states=["QUEUED"], state="SUBMITTING")
    assert store.update(job.id, expect_states=["SUBMITTING"], state="RUNNING")
    running = store.get(job.id)
    assert running.started_at is not None and running.submissions == 1
    assert store.update(job.id, state="SUCCEEDED")
    done = store.get(job.id)
    assert done.finished_at is not None and not done.active
    assert store.count_active("alice") == 0
    assert [j.id for j in store.active_jobs()] == []


# ----------------------------------------------------------------------------- idempotency


def test_hold_is_part_of_the_idempotency_key_check(store: JobStore) -> None:
    held, created = store.create(make_job(1, key="k-held", hold=True))
    assert created and held.state == "HELD"
    retry = dataclasses.replace(make_job(1, key="k-held", hold=True), id=f"{held.id[:-1]}f")
    again, created_again = store.create(retry)
    assert not created_again and again.id == held.id
    with pytest.raises(IdempotencyConflict):
        store.create(make_job(1, key="k-held"))
    queued, _ = store.create(make_job(3, key="k-queued"))
    with pytest.raises(IdempotencyConflict):
        store.create(make_job(3, key="k-queued", hold=True))
    assert store.get(queued.id).state == "QUEUED"


def test_the_hash_of_a_request_without_hold_is_unchanged() -> None:
    """Jobs stored before ``hold`` was hashed keep matching their retries."""
    spec = {"name": "pinned", "optim": {"epochs": 1}, "seed": 7}
    before = "ff4b0ae26fd33d48d2605159fb897f7a777c5b2dde144cc6a3d6777f58ac5c94"
    assert request_hash("pretrain", spec) == before
    assert request_hash("pretrain", spec, hold=False) == before
    assert request_hash("pretrain", spec, hold=True) != before
