"""The job store on SQLite and PostgreSQL: migrations, idempotency, paging, compare-and-set."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
import sqlalchemy as sa

from orchestrator.control.store import (
    MIGRATIONS,
    IdempotencyConflict,
    JobFilter,
    JobStore,
    StoreError,
    migrations_table,
    new_job,
    utcnow,
)


def make_job(number: int, owner: str = "alice", key: str | None = None, **spec: object):
    return new_job(
        job_id=f"00000000-0000-4000-8000-{number:012d}",
        kind="pretrain",
        name=f"job-{number}",
        owner=owner,
        spec={"name": f"job-{number}", **spec},
        num_workers=1,
        num_gpus=0.0,
        idempotency_key=key,
    )


@pytest.fixture
def store(store_url: str) -> JobStore:
    store = JobStore(store_url)
    store.migrate()
    yield store
    store.engine.dispose()


def test_migrations_are_versioned_and_applied_once(store: JobStore) -> None:
    latest = max(version for version, _, _ in MIGRATIONS)
    assert store.schema_version() == latest
    assert store.migrate() == latest  # a second start applies nothing
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(migrations_table.c.version)).all()
    assert [r[0] for r in rows] == [version for version, _, _ in MIGRATIONS]


def test_a_database_newer_than_the_code_is_refused(store: JobStore) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            migrations_table.insert().values(version=999, description="future", applied_at=utcnow())
        )
    with pytest.raises(StoreError, match="newer than this code"):
        store.migrate()


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
