"""The scheduler's Prometheus series (see :mod:`runplane_common.metrics` for the routes).

Run lifecycle counters and histograms follow the run events the writer commits
(:class:`~runplane_scheduler.store.RunChange`), so they count what the database holds, once:

    runplane_runs_triggered_total{environment,task}           runs created
    runplane_runs_started_total{environment,task}             first attempts started
    runplane_attempts_started_total{environment,task}         attempts started (retries too)
    runplane_runs_finished_total{environment,task,status}     runs reaching a final status
    runplane_dispatch_latency_seconds{environment,queue}      QUEUED to assigned (DEQUEUED)
    runplane_run_execution_seconds{environment,task,status}   execution time of finished runs

State is read from memory at scrape time (the dispatch index, the relay, the writer):

    runplane_queue_depth{environment,queue}                   runs waiting in the queue
    runplane_queue_running{environment,queue}                 runs holding one of its slots
    runplane_executors_connected{environment}                 executors with a live stream
    runplane_executor_slots{environment}                      their capacity
    runplane_executor_free_slots{environment}                 capacity not leased or reserved
    runplane_outbox_pending                                   committed events not yet published
    runplane_outbox_oldest_age_seconds                        age of the oldest of them
    runplane_outbox_catching_up                               1 while the relay reads the database
    runplane_outbox_published_total                           events published to JetStream
    runplane_nats_errors_total{operation}                     connect and publish failures
    runplane_database_errors_total{operation}                 failed writes and outbox reads

A queue's concurrency-key copies are summed into the queue: keys are unbounded, queues are not.
Labels never carry run ids.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from runplane_common.ids import timestamp_ms
from runplane_common.metrics import Histograms, Labels, Snapshot, counter, gauge
from runplane_scheduler.dispatch import DispatchIndex
from runplane_scheduler.relay import Relay
from runplane_scheduler.states import FINAL
from runplane_scheduler.store import RunChange, Writer

_FINAL = frozenset(s.value for s in FINAL)
QUEUED = "QUEUED"


class SchedulerMetrics:
    """One scheduler's series in ``registry``. Feed it the writer's committed run changes
    (:meth:`observe`); the rest is read from ``index``, ``relay`` and ``writer`` per scrape."""

    def __init__(
        self,
        registry: CollectorRegistry,
        index: DispatchIndex,
        relay: Relay,
        writer: Writer,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._index = index
        self._relay = relay
        self._writer = writer
        self._clock_ms = clock_ms
        self._leading: Callable[[], bool] = lambda: True
        # By (environment, task); finished by (environment, task, status).
        self.triggered: defaultdict[Labels, int] = defaultdict(int)
        self.started: defaultdict[Labels, int] = defaultdict(int)
        self.attempts_started: defaultdict[Labels, int] = defaultdict(int)
        self.finished: defaultdict[Labels, int] = defaultdict(int)
        # By (environment, queue), and (environment, task, status).
        self.dispatch_latency = Histograms()
        self.execution = Histograms()
        registry.register(Snapshot(self._runs))
        registry.register(Snapshot(self._state))

    def leading(self, leading: Callable[[], bool]) -> None:
        """Where ``runplane_scheduler_leader`` reads whether this replica leads."""
        self._leading = leading

    def observe(self, changes: list[RunChange]) -> None:
        """Count committed run events (the writer's ``on_changes`` hook; it runs for every
        commit, so it only adds to dictionaries)."""
        for c in changes:
            key = (c.environment_id, c.task_id)
            if c.event_type == "created":
                self.triggered[key] += 1
            elif c.event_type == "started":
                self.attempts_started[key] += 1
                if c.attempt_count <= 1:
                    self.started[key] += 1
            elif (
                c.event_type == "dequeued"
                and (not c.sources or QUEUED in c.sources)
                and c.queued_at is not None
            ):
                # Not a waiting run resumed on a new attempt: that one was not queued again.
                latency = max(c.updated_at - c.queued_at, 0) / 1000
                self.dispatch_latency.observe((c.environment_id, c.queue), latency)
            if c.status in _FINAL and c.status not in c.sources:
                final = (*key, c.status)
                self.finished[final] += 1
                if c.started_at is not None:
                    self.execution.observe(final, c.duration_ms / 1000)

    def _runs(self) -> Iterator[Metric]:
        by_task = ["environment", "task"]
        yield counter("runplane_runs_triggered", "Runs created, by task.", by_task, self.triggered)
        yield counter(
            "runplane_runs_started",
            "Runs whose first attempt started, by task.",
            by_task,
            self.started,
        )
        yield counter(
            "runplane_attempts_started",
            "Attempts started (retries included), by task.",
            by_task,
            self.attempts_started,
        )
        yield counter(
            "runplane_runs_finished",
            "Runs that reached a final status, by task and status.",
            [*by_task, "status"],
            self.finished,
        )
        yield self.dispatch_latency.family(
            "runplane_dispatch_latency_seconds",
            "Time from QUEUED to assigned to an executor (DEQUEUED), by queue.",
            ["environment", "queue"],
        )
        yield self.execution.family(
            "runplane_run_execution_seconds",
            "Execution time of finished runs that started (waits excluded), by task and status.",
            [*by_task, "status"],
        )

    def _state(self) -> Iterator[Metric]:
        yield gauge(
            "runplane_scheduler_leader",
            "1 while this scheduler replica holds the lease and runs the engine; 0 while it "
            "stands by and forwards calls to the one that does.",
            [],
            {(): 1.0 if self._leading() else 0.0},
        )
        yield from queue_families(self._index)
        yield from executor_families(self._index)
        count, oldest = self._relay.backlog()
        age = max(self._clock_ms() - timestamp_ms(oldest), 0) / 1000 if oldest else 0.0
        yield gauge(
            "runplane_outbox_pending",
            "Committed run events the relay has not yet published to JetStream.",
            [],
            {(): count},
        )
        yield gauge(
            "runplane_outbox_oldest_age_seconds",
            "Age of the oldest run event not yet published (0 when none).",
            [],
            {(): age},
        )
        yield gauge(
            "runplane_outbox_catching_up",
            "1 while the relay reads unpublished events from the database (after a restart "
            "or an overflow): more may wait there than runplane_outbox_pending counts.",
            [],
            {(): 1.0 if self._relay.catching_up else 0.0},
        )
        yield counter(
            "runplane_outbox_published",
            "Run events published to JetStream.",
            [],
            {(): self._relay.published},
        )
        errors = self._relay.errors
        yield counter(
            "runplane_nats_errors",
            "NATS failures: connecting, publishing.",
            ["operation"],
            {("connect",): errors["nats_connect"], ("publish",): errors["nats_publish"]},
        )
        yield counter(
            "runplane_database_errors",
            "Database failures: write batches refused, outbox reads failed.",
            ["operation"],
            {("write",): self._writer.failures, ("outbox_read",): errors["database_read"]},
        )


def queue_families(index: DispatchIndex) -> Iterator[Metric]:
    """Depth and running per queue (its concurrency-key copies summed)."""
    depth: dict[Labels, float] = defaultdict(float)
    running: dict[Labels, float] = defaultdict(float)
    removed = index.removed
    for (env, name, _key), q in list(index.queues.items()):
        depth[env, name] += sum(1 for r in q.heap if r.run_id not in removed)
        running[env, name] += q.running
    yield gauge(
        "runplane_queue_depth", "Runs waiting in the queue.", ["environment", "queue"], depth
    )
    yield gauge(
        "runplane_queue_running",
        "Runs holding one of the queue's slots (assigned or executing).",
        ["environment", "queue"],
        running,
    )


def executor_families(index: DispatchIndex) -> Iterator[Metric]:
    """Connected executors, their slots and free slots, per environment."""
    connected: dict[Labels, float] = defaultdict(float)
    slots: dict[Labels, float] = defaultdict(float)
    free: dict[Labels, float] = defaultdict(float)
    for ex in list(index.executors.values()):
        if not ex.connected:
            continue
        env = (ex.environment_id,)
        connected[env] += 1
        slots[env] += ex.capacity
        free[env] += ex.free()
    yield gauge(
        "runplane_executors_connected",
        "Executors with a live stream to this scheduler.",
        ["environment"],
        connected,
    )
    yield gauge(
        "runplane_executor_slots",
        "Capacity (concurrent attempts) of the connected executors.",
        ["environment"],
        slots,
    )
    yield gauge(
        "runplane_executor_free_slots",
        "Slots of the connected executors neither leased nor reserved (0 while draining).",
        ["environment"],
        free,
    )
