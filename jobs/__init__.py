"""Ray Jobs entrypoints, one module per job kind (``python -m jobs.<kind> --job-id <uuid>``),
all running :func:`jobs.entrypoint.main` for the kind of :mod:`orchestrator.kinds`."""
