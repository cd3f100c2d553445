"""The executor's Prometheus series (see :mod:`runplane_common.metrics` for the routes), read
from its :class:`~runplane_executor.counts.ExecutorCounts` and its state at scrape time. Needs
the ``server`` extra (prometheus-client, aiohttp): without it the executor has no HTTP port.

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

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from runplane_common.metrics import (
    Probes,
    ProbeServer,
    Readiness,
    Snapshot,
    counter,
    gauge,
    new_registry,
)
from runplane_executor.counts import OUTCOMES, ExecutorCounts


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


def probe_server(counts: ExecutorCounts, state: ExecutorState, ready: Readiness) -> ProbeServer:
    """The executor's HTTP port (/metrics, /healthz, /readyz), its series in a registry of its
    own."""
    registry = new_registry()
    ExecutorMetrics(registry, counts, state)
    return ProbeServer(Probes(registry, ready))


class ExecutorMetrics:
    """One executor's series in ``registry``, read per scrape from ``counts`` (the events) and
    ``state`` (the rest)."""

    def __init__(
        self, registry: CollectorRegistry, counts: ExecutorCounts, state: ExecutorState
    ) -> None:
        self._counts = counts
        self._state_of = state
        registry.register(Snapshot(self._state))

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
            {(): self._counts.assignments},
        )
        yield counter(
            "runplane_executor_attempts_finished",
            "Attempts that ended here, by outcome.",
            ["outcome"],
            {(o,): self._counts.outcomes[o] for o in OUTCOMES},
        )
        yield counter(
            "runplane_executor_stream_errors",
            "Streams to the scheduler that ended in an error.",
            [],
            {(): self._counts.stream_errors},
        )
