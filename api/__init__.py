"""The REST service, HTTP only: app factory, routes, dependencies, auth, problem responses,
limits, and the local stack launcher (``python -m api.stack``). What jobs are and how they
run lives in :mod:`orchestrator` (the control plane is :mod:`orchestrator.control`)."""
