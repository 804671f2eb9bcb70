"""Specs, runs and the control plane of the SparK service.

:mod:`.specs` (what a job computes), :mod:`.kinds` (the job-kind registry), :mod:`.pretrain`
and :mod:`.sweeps` (Ray Train runs and Ray Tune sweeps), :mod:`.tracking` (MLflow),
:mod:`.control` (job store, job service, scheduler), :mod:`.cli` (``sparkctl``).
"""
