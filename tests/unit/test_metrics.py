"""The metrics helpers without I/O: probes, per-instance registries, the scheduler's series from
run changes and the dispatch index, the executor's series."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import create_async_engine

from runplane_common.ids import new_id, timestamp_ms
from runplane_common.metrics import Histograms, Probes, new_registry
from runplane_executor.counts import ExecutorCounts, outcome
from runplane_executor.metrics import ExecutorMetrics
from runplane_scheduler.dispatch import DispatchIndex, ExecutorState
from runplane_scheduler.metrics import SchedulerMetrics
from runplane_scheduler.relay import Relay
from runplane_scheduler.store import RunChange, Store

pytestmark = pytest.mark.timeout(10)

ENV = "env_dev"


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """The value of one sample of ``registry``, as a scrape parses it (None: absent)."""
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def change(
    event_type: str,
    status: str,
    sources: tuple[str, ...] = (),
    *,
    task: str = "send-email",
    queued_at: int | None = 1_000,
    started_at: int | None = None,
    updated_at: int = 1_250,
    duration_ms: int = 0,
    attempt_count: int = 0,
) -> RunChange:
    return RunChange(
        event_type,
        ENV,
        task,
        "emails",
        status,
        sources,
        queued_at,
        started_at,
        updated_at,
        duration_ms,
        attempt_count,
    )


def scheduler_metrics(
    registry: CollectorRegistry, index: DispatchIndex | None = None, now_ms: int = 0
) -> tuple[SchedulerMetrics, Relay]:
    # An engine that is never connected: nothing here does I/O.
    store = Store(create_async_engine("sqlite+aiosqlite://"), on_commit=lambda events: None)
    relay = Relay(store, ("nats://127.0.0.1:1",))
    metrics = SchedulerMetrics(
        registry, index or DispatchIndex(100), relay, store.writer, clock_ms=lambda: now_ms
    )
    return metrics, relay


# -- probes ----------------------------------------------------------------------------------


async def _ready() -> str | None:
    return None


async def test_healthz_and_readyz_answer_with_the_reason() -> None:
    async def nats_down() -> str | None:
        return "not connected to NATS at nats://x:4222"

    registry = new_registry()
    ready, not_ready = Probes(registry, _ready), Probes(registry, nats_down)
    assert await ready.answer("GET", "/healthz") == await not_ready.answer("GET", "/healthz")
    answer = await ready.answer("GET", "/readyz")
    assert answer is not None and (answer.status, answer.body) == (200, b"ready\n")
    answer = await not_ready.answer("GET", "/readyz")
    assert answer is not None
    assert (answer.status, answer.body) == (
        503,
        b"not ready: not connected to NATS at nats://x:4222\n",
    )


async def test_a_slow_or_failing_readiness_check_is_not_ready() -> None:
    async def slow() -> str | None:
        await asyncio.sleep(10)
        return None

    async def broken() -> str | None:
        raise RuntimeError("boom")

    answer = await Probes(new_registry(), slow, timeout=0.01).answer("GET", "/readyz")
    assert answer is not None
    assert (answer.status, answer.body) == (
        503,
        b"not ready: the readiness check took more than 0.01 s\n",
    )
    answer = await Probes(new_registry(), broken).answer("GET", "/readyz")
    assert answer is not None
    assert (answer.status, answer.body) == (503, b"not ready: the readiness check failed: boom\n")


async def test_probes_answer_only_their_paths_and_only_get() -> None:
    probes = Probes(new_registry(), _ready)
    assert await probes.answer("GET", "/api/v1/waitpoints/tokens") is None
    answer = await probes.answer("POST", "/metrics")
    assert answer is not None and answer.status == 405
    answer = await probes.answer("GET", "/metrics")
    assert answer is not None and answer.status == 200
    assert answer.content_type.startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(answer.body.decode())}
    assert "process_cpu_seconds" in names


def test_histograms_count_each_observation_in_its_bucket() -> None:
    histograms = Histograms([0.1, 1.0])
    for amount in (0.05, 0.1, 0.5, 7.0):  # a value on a bound counts in that bucket (le)
        histograms.observe(("emails",), amount)
    family = histograms.family("runplane_test_seconds", "A test.", ["queue"])
    samples = {(s.name, s.labels.get("le", "")): s.value for s in family.samples}
    assert samples == {
        ("runplane_test_seconds_bucket", "0.1"): 2,
        ("runplane_test_seconds_bucket", "1.0"): 3,
        ("runplane_test_seconds_bucket", "+Inf"): 4,
        ("runplane_test_seconds_count", ""): 4,
        ("runplane_test_seconds_sum", ""): 7.65,
    }
    with pytest.raises(ValueError, match="at least one bucket"):
        Histograms([])


# -- registries ------------------------------------------------------------------------------


def test_each_instance_has_its_own_registry_and_the_global_one_stays_clean() -> None:
    first, second = new_registry(), new_registry()
    a, _ = scheduler_metrics(first)
    scheduler_metrics(second)  # a second scheduler in the same process registers fine
    a.observe([change("created", "QUEUED")])
    labels = {"environment": ENV, "task": "send-email"}
    assert sample(first, "runplane_runs_triggered_total", **labels) == 1
    assert sample(second, "runplane_runs_triggered_total", **labels) is None
    assert "runplane_" not in generate_latest(REGISTRY).decode()


# -- the scheduler's series ------------------------------------------------------------------


def test_run_changes_count_each_lifecycle_step_once() -> None:
    registry = new_registry()
    metrics, _ = scheduler_metrics(registry)
    metrics.observe(
        [
            change("created", "QUEUED"),
            # Queued at 1,000 ms, dequeued at 1,250 ms.
            change("dequeued", "DEQUEUED", ("QUEUED",)),
            change("started", "EXECUTING", ("DEQUEUED",), attempt_count=1, started_at=1_300),
            change("retrying", "EXECUTING", ("EXECUTING",), started_at=1_300),
            change("queued", "QUEUED", ("EXECUTING",), started_at=1_300),
            change("dequeued", "DEQUEUED", ("QUEUED",), queued_at=2_000, updated_at=2_500),
            change("started", "EXECUTING", ("DEQUEUED",), attempt_count=2, started_at=1_300),
            change("waiting", "WAITING", ("EXECUTING",), started_at=1_300),
            # A waiting run resumed on a new attempt was not queued: no dispatch latency.
            change("dequeued", "DEQUEUED", ("WAITING",), started_at=1_300, updated_at=90_000),
            change(
                "completed",
                "COMPLETED",
                ("EXECUTING",),
                started_at=1_300,
                duration_ms=1_500,
                attempt_count=2,
            ),
            # Metadata on a finished run changes no status: not finished twice.
            change("metadata", "COMPLETED", ("COMPLETED",), started_at=1_300),
        ]
    )
    labels = {"environment": ENV, "task": "send-email"}
    assert sample(registry, "runplane_runs_triggered_total", **labels) == 1
    assert sample(registry, "runplane_runs_started_total", **labels) == 1
    assert sample(registry, "runplane_attempts_started_total", **labels) == 2
    finished = {**labels, "status": "COMPLETED"}
    assert sample(registry, "runplane_runs_finished_total", **finished) == 1
    assert sample(registry, "runplane_run_execution_seconds_count", **finished) == 1
    assert sample(registry, "runplane_run_execution_seconds_sum", **finished) == 1.5
    queue = {"environment": ENV, "queue": "emails"}
    assert sample(registry, "runplane_dispatch_latency_seconds_count", **queue) == 2
    assert sample(registry, "runplane_dispatch_latency_seconds_sum", **queue) == 0.75


def test_a_run_that_never_started_finishes_without_an_execution_time() -> None:
    registry = new_registry()
    metrics, _ = scheduler_metrics(registry)
    metrics.observe(
        [change("created", "QUEUED"), change("expired", "EXPIRED", ("QUEUED", "PENDING_VERSION"))]
    )
    expired = {"environment": ENV, "task": "send-email", "status": "EXPIRED"}
    assert sample(registry, "runplane_runs_finished_total", **expired) == 1
    assert sample(registry, "runplane_run_execution_seconds_count", **expired) is None


async def test_queue_and_executor_gauges_read_the_dispatch_index() -> None:
    index = DispatchIndex(100)
    for i in range(3):
        index.push((ENV, "emails", ""), f"run_{i}", "send-email", 1_000 + i, 0)
    for i in range(3, 5):  # a concurrency key's copy of the same queue
        index.push((ENV, "emails", "tenant-7"), f"run_{i}", "send-email", 1_000 + i, 0)
    index.discard("run_0")  # cancelled while queued
    outbox: asyncio.Queue[object] = asyncio.Queue()

    def executor(name: str, capacity: int, **state: bool) -> ExecutorState:
        ex = ExecutorState(name, ENV, frozenset({"send-email"}), capacity, outbox, 0.0)  # type: ignore[arg-type]
        ex.connected = state.get("connected", True)
        ex.draining = state.get("draining", False)
        index.executors[name] = ex
        return ex

    executor("exec_a", 2)
    registry = new_registry()
    scheduler_metrics(registry, index)
    queue = {"environment": ENV, "queue": "emails"}
    assert sample(registry, "runplane_queue_depth", **queue) == 4
    assert sample(registry, "runplane_queue_running", **queue) == 0
    assert len(index.take()) == 2  # the executor's two slots
    assert sample(registry, "runplane_queue_depth", **queue) == 2
    assert sample(registry, "runplane_queue_running", **queue) == 2
    executor("exec_b", 5, draining=True)
    executor("exec_c", 7, connected=False)
    env = {"environment": ENV}
    assert sample(registry, "runplane_executors_connected", **env) == 2
    assert sample(registry, "runplane_executor_slots", **env) == 7
    assert sample(registry, "runplane_executor_free_slots", **env) == 0


def test_outbox_lag_counts_unpublished_events_and_the_oldest_age() -> None:
    oldest = new_id("evt")
    registry = new_registry()
    _, relay = scheduler_metrics(registry, now_ms=timestamp_ms(oldest) + 1_500)
    assert sample(registry, "runplane_outbox_pending") == 0
    assert sample(registry, "runplane_outbox_oldest_age_seconds") == 0
    event = {"subject": "s", "data": b"", "traceparent": ""}
    relay.committed([{**event, "event_id": oldest}, {**event, "event_id": new_id("evt")}])
    assert sample(registry, "runplane_outbox_pending") == 2
    assert sample(registry, "runplane_outbox_oldest_age_seconds") == 1.5
    # A new relay reads what the database holds first.
    assert sample(registry, "runplane_outbox_catching_up") == 1
    assert sample(registry, "runplane_nats_errors_total", operation="publish") == 0
    assert sample(registry, "runplane_database_errors_total", operation="write") == 0


def test_ids_tell_their_millisecond() -> None:
    before = new_id("run")
    assert timestamp_ms(before) <= timestamp_ms(new_id("evt"))
    with pytest.raises(ValueError, match="'run_short' is not a runplane id"):
        timestamp_ms("run_short")


# -- the executor's series -------------------------------------------------------------------


@dataclass
class FakeExecutor:
    connected: bool = True
    draining: bool = False
    capacity: int = 10
    running_attempts: int = 3
    task_processes: int = 2


def test_executor_slots_and_attempt_outcomes() -> None:
    state = FakeExecutor()
    registry = new_registry()
    counts = ExecutorCounts()
    ExecutorMetrics(registry, counts, state)
    assert sample(registry, "runplane_executor_free_slots") == 7
    state.draining = True
    assert sample(registry, "runplane_executor_free_slots") == 0
    state.draining, state.connected = False, False
    assert sample(registry, "runplane_executor_free_slots") == 0
    assert sample(registry, "runplane_executor_connected") == 0
    assert sample(registry, "runplane_executor_slots") == 10
    counts.assigned()
    counts.finished({"output": "{}"})
    counts.finished({"error": {"type": "E", "message": "m", "stack_trace": ""}})
    counts.finished({"timed_out": True})
    assert sample(registry, "runplane_executor_assignments_total") == 1
    for name, count in (("ok", 1), ("error", 1), ("timed_out", 1), ("canceled", 0)):
        assert sample(registry, "runplane_executor_attempts_finished_total", outcome=name) == count


def test_outcomes_name_why_an_attempt_ended() -> None:
    assert outcome({"output": "1"}) == "ok"
    assert outcome({"canceled": True}) == "canceled"
    assert outcome({"lost": True}) == "lost"
    assert outcome({"out_of_memory": True, "error": {}}) == "out_of_memory"  # type: ignore[typeddict-item]
    assert outcome({}) == "error"
