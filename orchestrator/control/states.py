"""The states of a job, in one place (the store, the REST enums and ``sparkctl`` use them).

[HELD ->] QUEUED -> SUBMITTING -> PENDING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED
"""

from __future__ import annotations

ACTIVE_STATES = ("HELD", "QUEUED", "SUBMITTING", "PENDING", "RUNNING")
ON_RAY_STATES = ("SUBMITTING", "PENDING", "RUNNING")
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
JOB_STATES = ACTIVE_STATES + TERMINAL_STATES

# GET /v1/jobs's page size (the route's bounds, and sparkctl's).
JOBS_PAGE_MAX = 100
JOBS_PAGE_DEFAULT = 20
