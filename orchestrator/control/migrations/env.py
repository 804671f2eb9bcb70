"""The job store's Alembic environment.

At run time :meth:`orchestrator.control.store.JobStore.migrate` passes its open connection
(inside its transaction and its migration lock) as ``config.attributes["connection"]``; this
file then only runs the revisions on it, and the caller commits. From the ``alembic``
command line (development) there is no such connection: the database comes from
``-x url=...`` (or ``sqlalchemy.url``) and this file opens and commits its own.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from orchestrator.control.store import LEGACY_VERSION_TABLE, create_store_engine, metadata


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Leave the pre-Alembic version table out of autogenerate: adopted databases keep it
    (older code reads it), so a new revision must not propose dropping it."""
    return not (type_ == "table" and name == LEGACY_VERSION_TABLE)


def _configure(**kwargs: Any) -> None:
    # render_as_batch: autogenerate writes ALTERs as batch operations, which SQLite needs
    # (it copies the table) and PostgreSQL runs as plain ALTER TABLE.
    context.configure(
        target_metadata=metadata, include_object=include_object, render_as_batch=True, **kwargs
    )


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("name the database: alembic -x url=sqlite:///path/jobs.db ...")
    return url


def run_on(connection: Connection, **kwargs: Any) -> None:
    """Run the revisions on ``connection``, inside whatever transaction it is in."""
    _configure(connection=connection, **kwargs)
    with context.begin_transaction():
        context.run_migrations()


def run_from_command_line() -> None:
    """``alembic ... upgrade|revision``: open the database named on the command line."""
    if context.is_offline_mode():
        _configure(url=_url(), literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_store_engine(_url())
    try:
        with engine.begin() as connection:
            run_on(connection)
    finally:
        engine.dispose()


def main() -> None:
    """Alembic executes this module for every command."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        # migrate() opened a real transaction, also on SQLite (BEGIN IMMEDIATE).
        run_on(connection, transactional_ddl=True)
    else:
        run_from_command_line()


main()
