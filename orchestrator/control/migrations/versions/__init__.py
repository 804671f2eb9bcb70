"""The job store's Alembic revisions (Alembic loads them by path; this file makes the folder
a package so the wheel ships it)."""
