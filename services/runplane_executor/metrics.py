"""The executor's Prometheus series (see :mod:`runplane_common.metrics` for the routes):

runplane_executor_connected                      1 while registered with the scheduler
runplane_executor_slots                          its capacity (concurrent attempts)
runplane_executor_free_slots                     capacity not running an attempt (0 while
                                                 draining or disconnected)
runplane_executor_running_attempts               attempts in its task processes
runplane_executor_task_processes                 warm task processes
runplane_executor_assignments_total              attempts the scheduler assigned to it
runplane_executor_attempts_finished_total{outcome}   ok, error, canceled, timed_out,
                                                 out_of_memory, lost
runplane_executor_stream_errors_total            scheduler streams that ended in an error
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from runplane.worker import AttemptResult
from runplane_common.metrics import Snapshot, counter, gauge

OUTCOMES = ("ok", "error", "canceled", "timed_out", "out_of_memory", "lost")


def outcome(result: AttemptResult) -> str:
    """How an attempt ended, one of :data:`OUTCOMES`."""
    for flag in ("canceled", "timed_out", "out_of_memory", "lost"):
        if result.get(flag):
            return flag
    return "ok" if "output" in result else "error"


class ExecutorState(Protocol):
    """What the series read from the executor."""

    @property
    def connected(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def capacity(self) -> int: ...
    @property
    def running_attempts(self) -> int: ...
    @property
    def task_processes(self) -> int: ...


class ExecutorMetrics:
    """One executor's series in ``registry``; :meth:`assigned`, :meth:`finished` and
    :meth:`stream_failed` count events, the rest is read from ``state`` per scrape."""

    def __init__(self, registry: CollectorRegistry, state: ExecutorState) -> None:
        self._state_of = state
        self.assignments = 0
        self.stream_errors = 0
        self.outcomes: Counter[str] = Counter()
        registry.register(Snapshot(self._state))

    def assigned(self) -> None:
        self.assignments += 1

    def finished(self, result: AttemptResult) -> None:
        self.outcomes[outcome(result)] += 1

    def stream_failed(self) -> None:
        self.stream_errors += 1

    def _state(self) -> Iterator[Metric]:
        s = self._state_of
        connected = s.connected
        free = max(s.capacity - s.running_attempts, 0) if connected and not s.draining else 0
        for name, doc, value in (
            ("connected", "1 while registered with the scheduler.", 1.0 if connected else 0.0),
            ("slots", "Concurrent attempts this executor takes (its capacity).", s.capacity),
            ("free_slots", "Slots not running an attempt (0 draining or disconnected).", free),
            ("running_attempts", "Attempts in the task processes.", s.running_attempts),
            ("task_processes", "Warm task processes.", s.task_processes),
        ):
            yield gauge(f"runplane_executor_{name}", doc, [], {(): value})
        yield counter(
            "runplane_executor_assignments",
            "Attempts the scheduler assigned to this executor.",
            [],
            {(): self.assignments},
        )
        yield counter(
            "runplane_executor_attempts_finished",
            "Attempts that ended here, by outcome.",
            ["outcome"],
            {(o,): self.outcomes[o] for o in OUTCOMES},
        )
        yield counter(
            "runplane_executor_stream_errors",
            "Streams to the scheduler that ended in an error.",
            [],
            {(): self.stream_errors},
        )
