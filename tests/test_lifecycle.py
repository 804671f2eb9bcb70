"""Job ids and cancellation: the pieces every driver shares."""

from __future__ import annotations

from orchestrator.lifecycle import JobCancelled, interrupted_by_cancel


def _raise_inside_a_library() -> None:
    """A SIGTERM landing in code that wraps errors, as MLflow's store does."""
    try:
        raise JobCancelled("received signal 15")
    except JobCancelled as error:
        raise RuntimeError("store failed") from error


def test_an_error_that_a_cancel_caused_is_a_cancel() -> None:
    try:
        _raise_inside_a_library()
    except RuntimeError as error:
        assert interrupted_by_cancel(error)
    try:
        try:
            raise JobCancelled("first")
        except JobCancelled:
            raise OSError("the clean-up failed meanwhile")  # noqa: B904 (the implicit context)
    except OSError as error:
        assert interrupted_by_cancel(error)
    assert not interrupted_by_cancel(RuntimeError("a plain failure"))
    looped = ValueError("loop")
    looped.__context__ = looped  # a cycle ends the walk
    assert not interrupted_by_cancel(looped)
