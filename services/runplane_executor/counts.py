"""What the executor counts as it works: assignments, attempt outcomes, failed streams. Plain
Python, so the executor runs without the ``server`` extra; :mod:`runplane_executor.metrics`
exports the counts (and the executor's state) to Prometheus when it is installed."""

from __future__ import annotations

from collections import Counter

from runplane.worker import AttemptResult

OUTCOMES = ("ok", "error", "canceled", "timed_out", "out_of_memory", "lost")


def outcome(result: AttemptResult) -> str:
    """How an attempt ended, one of :data:`OUTCOMES`."""
    for flag in ("canceled", "timed_out", "out_of_memory", "lost"):
        if result.get(flag):
            return flag
    return "ok" if "output" in result else "error"


class ExecutorCounts:
    """Events since the executor started: :meth:`assigned`, :meth:`finished` and
    :meth:`stream_failed` are called where they happen."""

    def __init__(self) -> None:
        self.assignments = 0
        self.stream_errors = 0
        self.outcomes: Counter[str] = Counter()

    def assigned(self) -> None:
        self.assignments += 1

    def finished(self, result: AttemptResult) -> None:
        self.outcomes[outcome(result)] += 1

    def stream_failed(self) -> None:
        self.stream_errors += 1
