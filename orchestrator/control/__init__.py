"""The control plane: the job store, the job service and the Ray Jobs scheduler.

Everything here is free of HTTP (``api/`` translates it) and of torch (the API process
imports it): :mod:`.store` keeps jobs, :mod:`.service` admits, cancels and inspects them,
:mod:`.scheduler` submits them to Ray and keeps the store in step with Ray.
"""
