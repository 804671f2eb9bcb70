"""Alembic migrations of the job store (:mod:`orchestrator.control.store`).

``env.py`` is the Alembic environment and ``versions/`` holds one revision per schema change,
oldest first (``0001`` is the ``jobs`` table as first shipped). The service applies them
itself: :meth:`orchestrator.control.store.JobStore.migrate` runs ``alembic upgrade head`` at
start-up on the store's own connection. ``alembic.ini`` here is only for the ``alembic``
command line in development (new revisions, autogenerate).
"""
