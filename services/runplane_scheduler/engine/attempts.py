"""Attempts: the lease of a dequeued run's attempt to an executor, its start and its result
(complete, fail and retry after back-off, or requeue when lost), and the leases that lapse
when an executor falls silent."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson
from opentelemetry import trace

from runplane_common import telemetry
from runplane_scheduler import json_depth
from runplane_scheduler.dispatch import ExecutorState, Lease, QueueKey
from runplane_scheduler.engine.resources import Coalesce, EngineResources
from runplane_scheduler.engine.timers import TimerKind, Timers
from runplane_scheduler.retry import RetryPolicy, retry_delay, should_retry
from runplane_scheduler.states import Status
from runplane_scheduler.store import (
    Store,
    Tx,
    hot,
)
from runplane_scheduler.store import runs as stored_runs
from runplane_scheduler.store.hot import Completed, Started
from runplane_scheduler.worker_messages import Assignment, AttemptResult

log = logging.getLogger("runplane.scheduler")


def attempt_row(
    attempt_id: str, run_id: str, number: int, ex: ExecutorState, ts: int
) -> dict[str, Any]:
    """A new attempt's row (PENDING until it starts)."""
    return {
        "id": attempt_id,
        "run_id": run_id,
        "number": number,
        "status": "PENDING",
        "executor_id": ex.executor_id,
        "created_at": ts,
        "started_at": None,
        "finished_at": None,
        "error": None,
    }


class Attempts:
    def __init__(self, resources: EngineResources, timers: Timers) -> None:
        self.resources = resources
        self.timers = timers

    # -- leases ----------------------------------------------------------------------------------

    def assign(
        self,
        m: Mapping[Any, Any],
        attempt_id: str,
        key: QueueKey,
        ex: ExecutorState,
        queued_at: int | None = None,
    ) -> None:
        """Lease the dequeued run's attempt to ``ex`` and send it the assignment. ``queued_at``:
        when it joined the queue, if not its stored ``queued_at`` (a resumed run's)."""
        run_id = m["id"]
        lease = Lease(attempt_id, run_id, key, ex.executor_id, self.resources.clock.monotonic())
        self.resources.index.lease(lease, ex)
        if not ex.connected:  # gone between pick and commit
            self.lapse(lease)
            return
        self.queue_span(m, attempt_id, ex, queued_at)
        with telemetry.tracer().start_as_current_span(
            "dispatch",
            context=telemetry.context_from_traceparent(m["traceparent"]),
            kind=trace.SpanKind.PRODUCER,
            attributes={"runplane.run_id": run_id, "runplane.executor_id": ex.executor_id},
        ):
            traceparent = telemetry.current_traceparent()
        ex.outbox.put_nowait(
            Assignment(
                run=m,
                attempt_id=attempt_id,
                attempt_number=m["attempt_count"] + 1,
                traceparent=traceparent,
                environment_slug=ex.environment_id.removeprefix("env_"),
                environment_id=ex.environment_id,
            )
        )

    @staticmethod
    def queue_span(
        m: Mapping[Any, Any], attempt_id: str, ex: ExecutorState, queued_at: int | None
    ) -> None:
        """The run's time in its queue, from enqueue (or the delay's or back-off's end: the
        stored ``queued_at``) to now, in the run's trace; emitted at its end. Span times are
        wall-clock nanoseconds, whatever clock the engine runs on."""
        end = time.time_ns()
        start = min((queued_at or m["queued_at"] or m["created_at"]) * 1_000_000, end)
        span = telemetry.tracer().start_span(
            "queue",
            context=telemetry.context_from_traceparent(m["traceparent"]),
            start_time=start,
            attributes={
                "runplane.run_id": m["id"],
                "runplane.queue": m["queue"],
                "runplane.attempt": m["attempt_count"] + 1,
                "runplane.attempt_id": attempt_id,
                "runplane.executor_id": ex.executor_id,
            },
        )
        span.end(end_time=end)

    def adopt(self, m: Mapping[Any, Any], now: float) -> None:
        """An active run's attempt found after a restart: its executor has lease_timeout to
        reconnect and claim it."""
        self.resources.index.adopt(
            Lease(
                attempt_id=m["current_attempt_id"],
                run_id=m["id"],
                queue=(m["environment_id"], m["queue"], m["concurrency_key"]),
                executor_id=m["executor_id"] or "",
                assigned_at=now,
                started=m["status"] == Status.EXECUTING.value,
                acked=True,
            )
        )

    def ack(self, attempt_id: str) -> None:
        lease = self.resources.index.leases.get(attempt_id)
        if lease is not None:
            lease.acked = True

    async def lease_loop(self) -> None:
        """Lapse leases of silent executors and of assignments never acknowledged."""
        settings, index = self.resources.settings, self.resources.index
        while True:
            await self.resources.clock.sleep(min(0.5, settings.lease_timeout / 4))
            now = self.resources.clock.monotonic()
            timeout = settings.lease_timeout
            for lease in list(index.leases.values()):
                if lease.lapsing:
                    continue
                ex = index.executors.get(lease.executor_id)
                if ex is None:  # adopted after a restart: its executor has `timeout` to claim it
                    lapsed = now - lease.assigned_at > timeout
                else:
                    lapsed = (
                        now - ex.last_seen > timeout
                        or (ex.connected and lease.attempt_id not in ex.attempts)
                        or (not lease.acked and now - lease.assigned_at > settings.ack_timeout)
                    )
                if lapsed:
                    self.lapse(lease)
            for ex in list(index.executors.values()):
                if now - ex.last_seen > timeout:
                    ex.connected = False
                    if not ex.attempts:
                        del index.executors[ex.executor_id]

    def lapse(self, lease: Lease) -> None:
        """The attempt's executor is gone: a started attempt failed, an unstarted one goes back."""
        log.warning("lease of attempt %s (run %s) lapsed", lease.attempt_id, lease.run_id)
        lease.lapsing = True
        ex = self.resources.index.executors.get(lease.executor_id)
        if ex is not None:
            ex.attempts.discard(lease.attempt_id)
        if lease.started:
            error = {
                "type": "ExecutorLost",
                "message": "the executor running this attempt stopped responding",
                "stack_trace": "",
            }
            self.fail(lease, error, False, final_status=Status.SYSTEM_FAILURE)
        else:
            self.requeue_lost(lease)

    # -- reports ---------------------------------------------------------------------------------

    def started(self, attempt_id: str, started_at: int = 0) -> None:
        """The attempt began (at ``started_at`` by the executor's clock; 0: now). Starts
        reported one after another are written together (``store/hot.py``)."""
        lease = self.resources.index.leases.get(attempt_id)
        if lease is None:
            return
        lease.acked = lease.started = True
        self.resources.background.submit(
            Coalesce(self.start_all, Started(lease.run_id, attempt_id, started_at))
        )

    async def start_all(self, tx: Tx, items: list[Started]) -> None:
        ts = self.resources.clock.now_ms()
        done = await hot.start_many(tx, items, ts)
        await Store.start_attempts(
            tx, [(i.attempt_id, hot.start_of(i, ts)) for i in items if i.attempt_id in done]
        )

    def result(self, result: AttemptResult) -> bool:
        """The attempt's end, as its executor reported it. False when the attempt holds no
        lease (stale: its run was cancelled or its lease lapsed; or a WAITING run's attempt)."""
        attempt_id = result.attempt_id
        lease = self.resources.index.leases.get(attempt_id)
        if lease is None:
            return False
        output = result.output
        limits = self.resources.settings.limits
        too_large = output is not None and (
            len(output) > limits.output_bytes or json_depth.too_deep(output, limits.json_depth)
        )
        if not lease.started and not result.lost and not result.canceled:
            started_at = result.started_at
            if started_at and output is not None and not too_large:
                # It ended at once, so its executor held back its start: one write for both.
                lease.started = True
                self.complete(lease, output, started_at)
                self.resources.dispatch_wake.set()
                return True
            # Its start was held back, or its "started" report was lost (sent to a scheduler
            # that died before committing it): record the start first, in order.
            self.started(attempt_id, started_at)
        if result.lost:
            self.requeue_lost(lease)
        elif output is not None and too_large:
            error = {
                "type": "OutputTooLargeError",
                "message": f"the output is over the output limit of {limits.output_bytes} bytes"
                if len(output) > limits.output_bytes
                else f"the output nests deeper than the JSON depth limit of {limits.json_depth}",
                "stack_trace": "",
            }
            self.fail(lease, error, True)
        elif output is not None:
            self.complete(lease, output)
        elif result.canceled:
            self.resources.index.release(attempt_id)
        else:
            error = {
                "type": result.error.type,
                "message": result.error.message,
                "stack_trace": result.error.stack_trace,
            }
            if result.timed_out:  # never retried
                self.fail(lease, error, True, final_status=Status.TIMED_OUT)
            elif result.out_of_memory:  # retried only on a named bigger machine
                self.fail(
                    lease,
                    error,
                    not result.retry_machine,
                    final_status=Status.CRASHED,
                    retry_machine=result.retry_machine,
                )
            else:
                self.fail(
                    lease,
                    error,
                    result.skip_retrying,
                    retry_at=result.retry_at,
                    retry_delay_ms=result.retry_delay_ms,
                )
        self.resources.dispatch_wake.set()
        return True

    def complete(self, lease: Lease, output: str, started_at: int = 0) -> None:
        """The attempt returned ``output``; with ``started_at`` its start is recorded with it.
        Completions reported one after another are written together (``store/hot.py``)."""
        self.resources.background.submit(
            Coalesce(
                self.complete_all, Completed(lease.run_id, lease.attempt_id, output, started_at)
            )
        )

    async def complete_all(self, tx: Tx, items: list[Completed]) -> None:
        ts = self.resources.clock.now_ms()
        release = self.resources.release
        for item in items:
            tx.after_commit.append(functools.partial(release, item.attempt_id))
        done = await hot.complete_many(tx, items, ts)
        await Store.finish_attempts(
            tx,
            [
                (i.attempt_id, min(i.started_at, ts) if i.started_at else 0)
                for i in items
                if i.attempt_id in done
            ],
            "COMPLETED",
            ts,
        )

    def fail(
        self,
        lease: Lease,
        error: dict[str, str],
        skip_retrying: bool,
        final_status: Status = Status.FAILED,
        retry_at: int | None = None,
        retry_delay_ms: int | None = None,
        retry_machine: str = "",
    ) -> None:
        """An attempt failed: retry after back-off if allowed, else end the run.

        ``retry_delay_ms`` or ``retry_at`` (ms since the epoch), from the task's catch_error,
        replace the policy's back-off; ``retry_machine`` is the machine the retry runs on."""
        attempt_id = lease.attempt_id
        error_text = orjson.dumps(error).decode()
        release = self.resources.release
        definition = self.resources.definition

        async def op(tx: Tx) -> None:
            ts = self.resources.clock.now_ms()
            current = await stored_runs.get_with_attempt(tx, lease.run_id, attempt_id)
            tx.after_commit.append(lambda: release(attempt_id))
            if current is None:
                return
            m = current._mapping
            status = Status(m["status"])
            if status not in (Status.EXECUTING, Status.DEQUEUED):
                return
            attempt = m["attempt_count"] if status is Status.EXECUTING else m["attempt_count"] + 1
            td = definition(m["environment_id"], m["task_id"], m["worker_version"])
            policy = td.retry if td else RetryPolicy()
            await Store.finish_attempt(tx, attempt_id, "FAILED", error_text)
            elapsed = ts - m["started_at"] if m["started_at"] else 0
            if should_retry(m["max_attempts"], attempt, skip_retrying):
                if retry_delay_ms is not None:
                    delay_ms = max(0, retry_delay_ms)
                elif retry_at is not None:
                    delay_ms = max(0, retry_at - ts)
                else:
                    delay_ms = int(retry_delay(policy, attempt) * 1000)
                machine: dict[str, Any] = {"machine": retry_machine} if retry_machine else {}
                # Back-off counts as EXECUTING (reference §3.1); the slot is released meanwhile.
                await tx.transition(
                    lease.run_id,
                    [status],
                    Status.EXECUTING,
                    "retrying",
                    error=error_text,
                    current_attempt_id=None,
                    executor_id=None,
                    duration_ms=m["duration_ms"] + elapsed,
                    updated_at=ts,
                    **machine,
                )
                await self.timers.schedule(tx, ts + delay_ms, TimerKind.RETRY, lease.run_id)
            else:
                # A run that never started did not fail through its own code.
                final = Status.SYSTEM_FAILURE if status is Status.DEQUEUED else final_status
                await tx.transition(
                    lease.run_id,
                    [status],
                    final,
                    final.value.lower(),
                    error=error_text,
                    current_attempt_id=None,
                    finished_at=ts,
                    duration_ms=m["duration_ms"] + elapsed,
                    updated_at=ts,
                )

        self.resources.background.submit(op)

    def requeue_lost(self, lease: Lease) -> None:
        """The attempt never ran to an end through no fault of its own: queue the run again."""
        attempt_id = lease.attempt_id
        release, enqueue = self.resources.release, self.resources.enqueue

        async def op(tx: Tx) -> None:
            ts = self.resources.clock.now_ms()
            row = await tx.transition(
                lease.run_id,
                [Status.DEQUEUED, Status.EXECUTING],
                Status.QUEUED,
                "requeued",
                stored_runs.attempt_is(attempt_id),
                current_attempt_id=None,
                executor_id=None,
                queued_at=ts,
                updated_at=ts,
                # A started attempt that was lost does not count against the retries.
                attempt_count=stored_runs.attempt_count_minus(int(lease.started)),
            )
            await Store.finish_attempt(tx, attempt_id, "LOST")
            tx.after_commit.append(lambda: release(attempt_id))
            if row is not None:
                m = row._mapping
                tx.after_commit.append(lambda: enqueue(m, ts))

        self.resources.background.submit(op)

    async def retry_due(self, tx: Tx, run_id: str, ts: int) -> None:
        """A retry's back-off ended: the run queues for its next attempt."""
        row = await tx.transition(
            run_id,
            [Status.EXECUTING],
            Status.QUEUED,
            "queued",
            stored_runs.NO_ATTEMPT,
            queued_at=ts,
            updated_at=ts,
        )
        if row is not None:
            m = row._mapping
            enqueue = self.resources.enqueue
            tx.after_commit.append(lambda: enqueue(m, ts))
