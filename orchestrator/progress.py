"""A job's progress as read back from its MLflow run (what the CLI and the API show)."""

from __future__ import annotations

import datetime
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from orchestrator.tracking import GLOBAL_BATCH_TAG, TOTAL_STEPS_TAG, RunRef, client_for

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    status: str
    epoch: float | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    images_per_sec: float | None = None
    eta_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for a terminal."""
        if self.step is None:
            return f"{self.status.lower()}: waiting for the first steps"
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [
            f"epoch {self.epoch:.2f}" if self.epoch is not None else "",
            f"step {self.step}{total}",
            f"loss {self.loss:.4f}" if self.loss is not None else "",
            f"{self.images_per_sec:.1f} img/s" if self.images_per_sec else "",
            f"ETA {_eta_text(self.eta_s)}" if self.eta_s is not None else "",
        ]
        return "  ".join(p for p in parts if p)


def _eta_text(seconds: float) -> str:
    # The standard library's h:mm:ss, as the engine's own progress line; '?' before any rate.
    return str(datetime.timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


def read_progress(ref: RunRef) -> Progress:
    """The latest training metrics of the run, with an ETA from the recent throughput."""
    run = client_for(ref.tracking_uri).get_run(ref.run_id)
    metrics, tags = run.data.metrics, run.data.tags
    step = metrics.get("train/step")
    total = int(tags[TOTAL_STEPS_TAG]) if TOTAL_STEPS_TAG in tags else None
    rate = metrics.get("train/images_per_sec")
    batch = int(tags.get(GLOBAL_BATCH_TAG, 0)) or None
    eta = None
    if step is not None and total and rate and batch:
        eta = max(total - step, 0) * batch / rate
    return Progress(
        status=run.info.status,
        epoch=metrics.get("train/epoch"),
        step=int(step) if step is not None else None,
        total_steps=total,
        loss=metrics.get("train/loss"),
        images_per_sec=rate,
        eta_s=eta,
    )


class Poller(Generic[T]):
    """Calls ``callback(read())`` every ``interval`` seconds from a daemon thread (a failed
    read is skipped: a missed refresh must not stop the job being watched)."""

    def __init__(
        self, read: Callable[[], T], callback: Callable[[T], None], interval: float = 2.0
    ) -> None:
        self.read = read
        self.callback = callback
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)

    def start(self) -> Poller[T]:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                value = self.read()
            except Exception:
                logger.debug("poll failed", exc_info=True)
                continue
            self.callback(value)


def read_trials(ref: RunRef, params: list[str]) -> list[dict[str, Any]]:
    """One row per trial run nested under the sweep's parent run: state, values, metrics."""
    from orchestrator.tracking import find_children

    rows = []
    for child in sorted(find_children(ref), key=lambda r: r.info.start_time or 0):
        data = child.data
        row: dict[str, Any] = {
            "trial": data.tags.get("sparkorch.trial_id", child.info.run_id[:8]),
            "state": child.info.status,
            "variant": data.tags.get("sparkorch.variant", ""),
        }
        row.update({path: data.params.get(path, "") for path in params})
        row["epoch"] = round(data.metrics.get("train/epoch", 0.0), 2)
        row["loss"] = round(data.metrics.get("train/loss", float("nan")), 4)
        row.update(
            {
                k.removeprefix("eval/"): round(v, 2)
                for k, v in data.metrics.items()
                if k.startswith("eval/")
            }
        )
        rows.append(row)
    return rows


def progress_line_view(spec: Any, ref: RunRef) -> Callable[[], str]:
    """A pre-training job's live view: its progress line."""
    return lambda: read_progress(ref).line()


def trial_table_view(sweep: Any, ref: RunRef) -> Callable[[], str]:
    """A sweep's live view: one row per trial."""
    return lambda: format_table(read_trials(ref, list(sweep.search)))


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain fixed-width text table of dict rows (columns: union of keys, in order)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    if not columns:
        return "(no trials yet)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
