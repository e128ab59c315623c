"""What a finished pass tells /metrics and the DEBUG log: its duration, and
for each event it carried, how long after Docker's own timestamp it was
applied (dockerlb/app/controller.py calls it once per pass)."""

from __future__ import annotations

from loguru import logger

from dockerlb.adapters.metrics import ControllerMetrics
from dockerlb.app.applier import Outcome
from dockerlb.core.ports import Trigger


def observe(
    metrics: ControllerMetrics,
    triggers: list[Trigger] | None,
    outcome: Outcome,
    started: float,
    ended: float,
    now_ns: int,
) -> None:
    kind = "full" if triggers is None else "partial"
    metrics.reconcile_duration.labels(kind).observe(ended - started)
    for t in triggers or ():
        if t.container_id and t.time_nano:
            lag = max(0, now_ns - t.time_nano) / 1e9
            metrics.event_to_applied.observe(lag)
            logger.debug(
                "event {} {} applied {:.1f} ms after it happened", t.reason, t.container_id[:12], lag * 1e3
            )
    logger.debug(
        "{} pass: {} op(s), {} failed, {:.0f} ms",
        kind,
        len(outcome.ops),
        outcome.failed,
        (ended - started) * 1e3,
    )
