"""The run engine: triggers, dispatch, attempt results, leases and timers.

Every change of a run is one state-machine transition committed with its outbox event through the
group-commit writer; the in-memory :class:`DispatchIndex` is updated only after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from opentelemetry import trace
from sqlalchemy import func, select

from runplane.v1 import worker_service_pb2 as wpb
from runplane_scheduler.dispatch import DispatchIndex, ExecutorState, Lease, QueueKey
from runplane_scheduler.retry import RetryPolicy, retry_delay, should_retry
from runplane_scheduler.states import Status
from runplane_scheduler.store import CLEAN_ERRORS, RunRow, Store, Tx, now_ms, run_to_pb
from runplane_server import db, telemetry
from runplane_server.config import SchedulerSettings
from runplane_server.errors import NotFound
from runplane_server.ids import new_id

log = logging.getLogger("runplane.scheduler")

NOT_STARTED = (Status.PENDING_VERSION, Status.DELAYED, Status.QUEUED)
CANCELLABLE = (*NOT_STARTED, Status.DEQUEUED, Status.EXECUTING, Status.WAITING)


@dataclass(frozen=True)
class TaskDef:
    task_id: str
    queue: str
    queue_concurrency_limit: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_duration: int = 0
    machine: str = "small-1x"


@dataclass(frozen=True)
class TriggerSpec:
    """A validated trigger request."""

    task_id: str
    payload: str
    queue: str
    tags: tuple[str, ...]
    metadata: str
    max_attempts: int
    idempotency_key: str
    concurrency_key: str
    priority: int


@dataclass(order=True)
class _Timer:
    due_at: int
    timer_id: str
    kind: str = field(compare=False)
    target: str = field(compare=False)


class RunEngine:
    def __init__(self, store: Store, settings: SchedulerSettings) -> None:
        self.store = store
        self.settings = settings
        self.index = DispatchIndex(settings.environment_concurrency_limit)
        self.task_defs: dict[tuple[str, str], TaskDef] = {}
        self.pending_version: dict[tuple[str, str], list[str]] = {}
        self._timers: list[_Timer] = []
        self._timer_wake = asyncio.Event()
        self._dispatch_wake = asyncio.Event()
        self._reports: deque[Callable[[Tx], Coroutine[Any, Any, Any]]] = deque()
        self._reports_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Task[Any]] = set()
        # Called first when an executor registers (environment, registration, executor id):
        # syncs its declarative schedules; raises, before anything is stored, on a bad one.
        self.on_register: Callable[[str, wpb.Register, str], Coroutine[Any, Any, None]] | None = (
            None
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        for row in await self.store.load_task_definitions():
            m = row._mapping
            self.task_defs[(m["environment_id"], m["task_id"])] = TaskDef(
                task_id=m["task_id"],
                queue=m["queue"],
                queue_concurrency_limit=m["queue_concurrency_limit"],
                retry=RetryPolicy.from_dict(orjson.loads(m["retry"])),
                max_duration=m["max_duration"],
                machine=m["machine"],
            )
        for td_key, td in self.task_defs.items():
            self._apply_queue_limit(td_key[0], td)
        now = time.monotonic()
        for row in await self.store.load_active_runs():
            m = row._mapping
            status = Status(m["status"])
            key = (m["environment_id"], m["queue"])
            if status is Status.QUEUED:
                self.index.push(key, m["id"], m["task_id"], m["queued_at"], m["priority"])
            elif status is Status.PENDING_VERSION:
                self.pending_version.setdefault((m["environment_id"], m["task_id"]), []).append(
                    m["id"]
                )
            elif m["current_attempt_id"]:
                # Its executor has lease_timeout to reconnect and claim it.
                self.index.adopt(
                    Lease(
                        attempt_id=m["current_attempt_id"],
                        run_id=m["id"],
                        queue=key,
                        executor_id=m["executor_id"] or "",
                        assigned_at=now,
                        started=status is Status.EXECUTING,
                        acked=True,
                    )
                )
        for row in await self.store.load_timers():
            m = row._mapping
            heapq.heappush(self._timers, _Timer(m["due_at"], m["id"], m["kind"], m["target"]))
        self.store.writer.start()
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            asyncio.create_task(self._timer_loop(), name="timers"),
            asyncio.create_task(self._lease_loop(), name="leases"),
            asyncio.create_task(self._reports_loop(), name="reports"),
        ]
        self._dispatch_wake.set()

    async def stop(self) -> None:
        for task in [*self._tasks, *self._spawned]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._spawned, return_exceptions=True)
        await self.store.writer.stop()

    def _submit(self, op: Callable[[Tx], Coroutine[Any, Any, Any]]) -> None:
        """Queue a write nobody waits for (executor reports, lapsed leases). Such writes are
        applied in submission order and retried until the database takes them, so a report
        that arrives while the database is down is not lost."""
        self._reports.append(op)
        self._reports_wake.set()

    async def _reports_loop(self) -> None:
        backoff = 0.2
        while True:
            await self._reports_wake.wait()
            self._reports_wake.clear()
            ops = list(self._reports)
            self._reports.clear()
            # Submitted together, so they share commits; the writer keeps their order.
            results = await asyncio.gather(
                *(self.store.writer.submit(op) for op in ops), return_exceptions=True
            )
            failed = next(
                (
                    i
                    for i, r in enumerate(results)
                    if isinstance(r, Exception) and not isinstance(r, CLEAN_ERRORS)
                ),
                None,
            )
            for r in results:
                if isinstance(r, CLEAN_ERRORS):
                    log.error("write refused: %s", r)
            if failed is None:
                backoff = 0.2
                continue
            # Writes are guarded by status and attempt id, so re-applying the ones after the
            # failure that did commit changes nothing.
            log.warning("database write failed (%s); retrying in %.1f s", results[failed], backoff)
            self._reports.extendleft(reversed(ops[failed:]))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            self._reports_wake.set()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    # -- API -----------------------------------------------------------------------------------

    async def trigger(
        self, environment_id: str, spec: TriggerSpec
    ) -> tuple[RunRow | dict[str, Any], bool]:
        """Create a run (or return the one holding the idempotency key). Returns (run, cached)."""
        td = self.task_defs.get((environment_id, spec.task_id))
        queue = spec.queue or (td.queue if td else f"task/{spec.task_id}")
        max_attempts = spec.max_attempts or (
            td.retry.max_attempts if td else RetryPolicy().max_attempts
        )
        known = self.index.provides(environment_id, spec.task_id)
        traceparent = telemetry.current_traceparent()
        key = (environment_id, queue)
        run_id = new_id("run")
        # Fast path: with nothing waiting in its queue and a slot free, the run is queued and
        # dequeued in one commit (both events are still published, in order).
        ex = self.index.reserve_direct(key, spec.task_id, run_id) if known else None
        attempt_id = new_id("attempt") if ex is not None else ""

        async def op(tx: Tx) -> tuple[RunRow | dict[str, Any], bool]:
            if spec.idempotency_key:
                existing = await Store.find_idempotent(
                    tx, environment_id, spec.task_id, spec.idempotency_key
                )
                if existing is not None:
                    return existing, True
            ts = now_ms()
            values: dict[str, Any] = {
                "id": run_id,
                "environment_id": environment_id,
                "task_id": spec.task_id,
                "status": (Status.QUEUED if known else Status.PENDING_VERSION).value,
                "payload": spec.payload,
                "output": None,
                "error": None,
                "tags": orjson.dumps(list(spec.tags)).decode(),
                "metadata": spec.metadata,
                "queue": queue,
                "idempotency_key": spec.idempotency_key or None,
                "concurrency_key": spec.concurrency_key,
                "priority": spec.priority,
                "attempt_count": 0,
                "max_attempts": max_attempts,
                "version": 1,
                "is_test": False,
                "parent_run_id": None,
                "root_run_id": None,
                "batch_id": None,
                "created_at": ts,
                "updated_at": ts,
                "queued_at": ts,
                "started_at": None,
                "finished_at": None,
                "duration_ms": 0,
                "traceparent": traceparent,
                "current_attempt_id": None,
                "executor_id": None,
            }
            if ex is not None:
                queued = values
                values = {
                    **queued,
                    "status": Status.DEQUEUED.value,
                    "version": 2,
                    "current_attempt_id": attempt_id,
                    "executor_id": ex.executor_id,
                }
                await Store.insert_run(tx, values, spec.tags, created=queued)
                tx.emit("dequeued", values)
                await Store.insert_attempt(tx, self._attempt_row(attempt_id, run_id, 1, ex, ts))
            elif known:
                await Store.insert_run(tx, values, spec.tags)
                tx.after_commit.append(
                    lambda: self._enqueue(
                        (environment_id, queue), run_id, spec.task_id, ts, spec.priority
                    )
                )
            else:
                await Store.insert_run(tx, values, spec.tags)
                tx.after_commit.append(lambda: self._park(environment_id, spec.task_id, run_id))
            return values, False

        try:
            row, cached = await self.store.writer.run(op)
        except BaseException:
            if ex is not None:
                self.index.unreserve(run_id, key, ex)
            raise
        if ex is not None:
            if cached:
                self.index.unreserve(run_id, key, ex)
                self._dispatch_wake.set()
            else:
                assert isinstance(row, dict)
                self._assign(row, attempt_id, key, ex)
        return row, cached

    def _park(self, environment_id: str, task_id: str, run_id: str) -> None:
        """A run no executor provides waits for one; if one registered while the run was being
        written, release it at once (registration has already emptied the waiting list)."""
        if self.index.provides(environment_id, task_id):
            self._spawn(self._release_pending(environment_id, [run_id]))
        else:
            self.pending_version.setdefault((environment_id, task_id), []).append(run_id)

    @staticmethod
    def _attempt_row(
        attempt_id: str, run_id: str, number: int, ex: ExecutorState, ts: int
    ) -> dict[str, Any]:
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

    async def cancel(self, environment_id: str, run_id: str) -> RunRow:
        async def op(tx: Tx) -> RunRow:
            ts = now_ms()
            row = await tx.transition(
                run_id,
                CANCELLABLE,
                Status.CANCELED,
                "canceled",
                db.runs.c.environment_id == environment_id,
                finished_at=ts,
                updated_at=ts,
                current_attempt_id=None,
            )
            if row is None:
                return await self._get_in_tx(tx, environment_id, run_id)
            attempt_id = self._attempt_of(run_id)
            if attempt_id is not None:
                await Store.finish_attempt(tx, attempt_id, "CANCELED")
                tx.after_commit.append(lambda: self._cancel_attempt(attempt_id, run_id))
            return row

        return await self.store.writer.run(op)

    async def _get_in_tx(self, tx: Tx, environment_id: str, run_id: str) -> RunRow:
        row = (
            await tx.execute(
                select(db.runs).where(
                    db.runs.c.id == run_id, db.runs.c.environment_id == environment_id
                )
            )
        ).first()
        if row is None:
            raise NotFound(f"run {run_id} not found")
        return row

    def _attempt_of(self, run_id: str) -> str | None:
        for lease in self.index.leases.values():
            if lease.run_id == run_id:
                return lease.attempt_id
        return None

    def _cancel_attempt(self, attempt_id: str, run_id: str) -> None:
        lease = self.index.release(attempt_id)
        if lease is not None:
            ex = self.index.executors.get(lease.executor_id)
            if ex is not None and ex.connected:
                ex.outbox.put_nowait(
                    wpb.ConnectResponse(
                        cancel=wpb.CancelAttempt(attempt_id=attempt_id, run_id=run_id)
                    )
                )
        self._dispatch_wake.set()

    # -- executors -----------------------------------------------------------------------------

    async def register_executor(
        self,
        environment_id: str,
        register: wpb.Register,
        outbox: asyncio.Queue[wpb.ConnectResponse],
    ) -> ExecutorState:
        executor_id = register.executor_id or new_id("exec")
        if self.on_register is not None:
            await self.on_register(environment_id, register, executor_id)
        defs = [
            TaskDef(
                task_id=t.id,
                queue=t.queue or f"task/{t.id}",
                queue_concurrency_limit=t.queue_concurrency_limit,
                retry=RetryPolicy(
                    max_attempts=t.retry.max_attempts or 3,
                    factor=t.retry.factor or 2.0,
                    min_timeout=t.retry.min_timeout_seconds or 1.0,
                    max_timeout=t.retry.max_timeout_seconds or 60.0,
                    randomize=t.retry.randomize,
                )
                if t.HasField("retry")
                else RetryPolicy(),
                max_duration=int(t.max_duration_seconds),
                machine=t.machine or "small-1x",
            )
            for t in register.manifest.tasks
        ]
        ts = now_ms()
        rows = [
            {
                "environment_id": environment_id,
                "task_id": d.task_id,
                "queue": d.queue,
                "queue_concurrency_limit": d.queue_concurrency_limit,
                "retry": orjson.dumps(d.retry.to_dict()).decode(),
                "max_duration": d.max_duration,
                "machine": d.machine,
                "updated_at": ts,
            }
            for d in defs
        ]

        async def op(tx: Tx) -> None:
            await Store.upsert_task_definitions(tx, environment_id, rows)

        await self.store.writer.run(op)
        for d in defs:
            self.task_defs[(environment_id, d.task_id)] = d
            self._apply_queue_limit(environment_id, d)
        old = self.index.executors.get(executor_id)
        ex = ExecutorState(
            executor_id=executor_id,
            environment_id=environment_id,
            tasks=frozenset(d.task_id for d in defs),
            capacity=max(1, register.capacity),
            outbox=outbox,
            last_seen=time.monotonic(),
        )
        claimed = set(register.running_attempt_ids)
        if old is not None:
            old.connected = False
        for attempt_id, lease in self.index.leases.items():
            if lease.executor_id == executor_id and attempt_id in claimed:
                ex.attempts.add(attempt_id)
                lease.acked = True
        self.index.executors[executor_id] = ex
        log.info(
            "executor %s connected: %d tasks, capacity %d", executor_id, len(defs), ex.capacity
        )
        for d in defs:
            waiting = self.pending_version.pop((environment_id, d.task_id), None)
            if waiting:
                self._spawn(self._release_pending(environment_id, waiting))
        self._dispatch_wake.set()
        return ex

    def _apply_queue_limit(self, environment_id: str, d: TaskDef) -> None:
        self.index.queue((environment_id, d.queue)).limit = d.queue_concurrency_limit

    async def _release_pending(self, environment_id: str, run_ids: list[str]) -> None:
        """Runs that waited for an executor providing their task move to QUEUED."""

        def make_op(run_id: str) -> Callable[[Tx], Coroutine[Any, Any, None]]:
            async def op(tx: Tx) -> None:
                ts = now_ms()
                row = await tx.transition(
                    run_id,
                    [Status.PENDING_VERSION],
                    Status.QUEUED,
                    "queued",
                    queued_at=ts,
                    updated_at=ts,
                )
                if row is not None:
                    m = row._mapping
                    tx.after_commit.append(
                        lambda: self._enqueue(
                            (environment_id, m["queue"]), run_id, m["task_id"], ts, m["priority"]
                        )
                    )

            return op

        await asyncio.gather(*(self.store.writer.run(make_op(r)) for r in run_ids))

    def executor_disconnected(self, ex: ExecutorState) -> None:
        """The stream ended; its leases stand until they lapse (it may reconnect and claim them)."""
        if self.index.executors.get(ex.executor_id) is ex:
            ex.connected = False
            log.info("executor %s disconnected", ex.executor_id)

    def on_message(self, ex: ExecutorState, msg: wpb.ConnectRequest) -> None:
        ex.last_seen = time.monotonic()
        kind = msg.WhichOneof("message")
        if kind == "heartbeat":
            if ex.draining != msg.heartbeat.draining:
                ex.draining = msg.heartbeat.draining
                self._dispatch_wake.set()
            return
        if kind == "ack":
            lease = self.index.leases.get(msg.ack.attempt_id)
            if lease is not None:
                lease.acked = True
        elif kind == "started":
            self._started(msg.started.attempt_id)
        elif kind == "result":
            self._result(msg.result)

    def _started(self, attempt_id: str) -> None:
        lease = self.index.leases.get(attempt_id)
        if lease is None:
            return
        lease.acked = lease.started = True
        run_id = lease.run_id

        async def op(tx: Tx) -> None:
            ts = now_ms()
            row = await tx.transition(
                run_id,
                [Status.DEQUEUED],
                Status.EXECUTING,
                "started",
                db.runs.c.current_attempt_id == attempt_id,
                started_at=func.coalesce(db.runs.c.started_at, ts),
                attempt_count=db.runs.c.attempt_count + 1,
                updated_at=ts,
            )
            if row is not None:
                await Store.start_attempt(tx, attempt_id, ts)

        self._submit(op)

    def _result(self, result: wpb.AttemptResult) -> None:
        attempt_id = result.attempt_id
        lease = self.index.leases.get(attempt_id)
        if lease is None:
            return  # stale: the run was cancelled or its lease lapsed
        outcome = result.WhichOneof("outcome")
        if result.lost:
            self._requeue_lost(lease)
        elif outcome == "output":
            self._complete(lease, result.output)
        elif result.canceled:
            self.index.release(attempt_id)
        else:
            error = {
                "type": result.error.type,
                "message": result.error.message,
                "stack_trace": result.error.stack_trace,
            }
            self._fail(lease, error, result.skip_retrying)
        self._dispatch_wake.set()

    def _complete(self, lease: Lease, output: str) -> None:
        attempt_id = lease.attempt_id

        async def op(tx: Tx) -> None:
            ts = now_ms()
            row = await tx.transition(
                lease.run_id,
                [Status.EXECUTING],
                Status.COMPLETED,
                "completed",
                db.runs.c.current_attempt_id == attempt_id,
                output=output,
                finished_at=ts,
                updated_at=ts,
                current_attempt_id=None,
                duration_ms=db.runs.c.duration_ms + (ts - db.runs.c.started_at),
            )
            if row is not None:
                await Store.finish_attempt(tx, attempt_id, "COMPLETED")
            tx.after_commit.append(lambda: self.index.release(attempt_id))

        self._submit(op)

    def _fail(
        self,
        lease: Lease,
        error: dict[str, str],
        skip_retrying: bool,
        final_status: Status = Status.FAILED,
    ) -> None:
        """An attempt failed: retry after back-off if allowed, else end the run."""
        attempt_id = lease.attempt_id
        error_text = orjson.dumps(error).decode()

        async def op(tx: Tx) -> None:
            ts = now_ms()
            current = (
                await tx.execute(
                    db.runs.select().where(
                        db.runs.c.id == lease.run_id, db.runs.c.current_attempt_id == attempt_id
                    )
                )
            ).first()
            tx.after_commit.append(lambda: self.index.release(attempt_id))
            if current is None:
                return
            m = current._mapping
            status = Status(m["status"])
            if status not in (Status.EXECUTING, Status.DEQUEUED):
                return
            attempt = m["attempt_count"] if status is Status.EXECUTING else m["attempt_count"] + 1
            td = self.task_defs.get((m["environment_id"], m["task_id"]))
            policy = td.retry if td else RetryPolicy()
            await Store.finish_attempt(tx, attempt_id, "FAILED", error_text)
            elapsed = ts - m["started_at"] if m["started_at"] else 0
            if should_retry(m["max_attempts"], attempt, skip_retrying):
                delay_ms = int(retry_delay(policy, attempt) * 1000)
                timer_id = new_id("evt")
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
                )
                await Store.add_timer(tx, timer_id, ts + delay_ms, "retry", lease.run_id)
                tx.after_commit.append(
                    lambda: self._add_timer(_Timer(ts + delay_ms, timer_id, "retry", lease.run_id))
                )
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

        self._submit(op)

    def _requeue_lost(self, lease: Lease) -> None:
        """The attempt never ran to an end through no fault of its own: queue the run again."""
        attempt_id = lease.attempt_id

        async def op(tx: Tx) -> None:
            ts = now_ms()
            row = await tx.transition(
                lease.run_id,
                [Status.DEQUEUED, Status.EXECUTING],
                Status.QUEUED,
                "requeued",
                db.runs.c.current_attempt_id == attempt_id,
                current_attempt_id=None,
                executor_id=None,
                queued_at=ts,
                updated_at=ts,
                # A started attempt that was lost does not count against the retries.
                attempt_count=db.runs.c.attempt_count - int(lease.started),
            )
            await Store.finish_attempt(tx, attempt_id, "LOST")
            tx.after_commit.append(lambda: self.index.release(attempt_id))
            if row is not None:
                m = row._mapping
                tx.after_commit.append(
                    lambda: self._enqueue(
                        lease.queue, lease.run_id, m["task_id"], ts, m["priority"]
                    )
                )

        self._submit(op)

    # -- dispatch --------------------------------------------------------------------------------

    def _enqueue(
        self, key: QueueKey, run_id: str, task_id: str, queued_at: int, priority: int
    ) -> None:
        self.index.push(key, run_id, task_id, queued_at, priority)
        self._dispatch_wake.set()

    async def _dispatch_loop(self) -> None:
        while True:
            await self._dispatch_wake.wait()
            self._dispatch_wake.clear()
            picked = self.index.take()
            for queued, key, ex in picked:
                self._spawn(self._dequeue(queued.run_id, key, ex))

    async def _dequeue(self, run_id: str, key: QueueKey, ex: ExecutorState) -> None:
        attempt_id = new_id("attempt")

        async def op(tx: Tx) -> RunRow | None:
            ts = now_ms()
            row = await tx.transition(
                run_id,
                [Status.QUEUED],
                Status.DEQUEUED,
                "dequeued",
                current_attempt_id=attempt_id,
                executor_id=ex.executor_id,
                updated_at=ts,
            )
            if row is not None:
                number = row._mapping["attempt_count"] + 1
                await Store.insert_attempt(
                    tx, self._attempt_row(attempt_id, run_id, number, ex, ts)
                )
            return row

        try:
            row = await self.store.writer.run(op)
        except Exception:
            log.exception("dequeue of %s failed", run_id)
            row = None
        if row is None:
            self.index.unreserve(run_id, key, ex)
            self._dispatch_wake.set()
            return
        self._assign(dict(row._mapping), attempt_id, key, ex)

    def _assign(
        self, m: Mapping[str, Any], attempt_id: str, key: QueueKey, ex: ExecutorState
    ) -> None:
        """Lease the dequeued run's attempt to ``ex`` and send it the assignment."""
        run_id = m["id"]
        lease = Lease(attempt_id, run_id, key, ex.executor_id, time.monotonic())
        self.index.lease(lease, ex)
        if not ex.connected:  # gone between pick and commit
            self._lapse(lease)
            return
        with telemetry.tracer().start_as_current_span(
            "dispatch",
            context=telemetry.context_from_traceparent(m["traceparent"]),
            kind=trace.SpanKind.PRODUCER,
            attributes={"runplane.run_id": run_id, "runplane.executor_id": ex.executor_id},
        ):
            traceparent = telemetry.current_traceparent()
        ex.outbox.put_nowait(
            wpb.ConnectResponse(
                assignment=wpb.Assignment(
                    run=run_to_pb(m),
                    attempt_id=attempt_id,
                    attempt_number=m["attempt_count"] + 1,
                    traceparent=traceparent,
                    environment_slug=ex.environment_id.removeprefix("env_"),
                )
            )
        )

    # -- timers and leases ------------------------------------------------------------------------

    def _add_timer(self, timer: _Timer) -> None:
        heapq.heappush(self._timers, timer)
        self._timer_wake.set()

    async def _timer_loop(self) -> None:
        while True:
            self._timer_wake.clear()
            if not self._timers:
                await self._timer_wake.wait()
                continue
            delay = (self._timers[0].due_at - now_ms()) / 1000
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._timer_wake.wait(), timeout=delay)
                continue
            timer = heapq.heappop(self._timers)
            self._spawn(self._fire(timer))

    async def _fire(self, timer: _Timer) -> None:
        if timer.kind != "retry":
            log.warning("unknown timer kind %s", timer.kind)
            return

        async def op(tx: Tx) -> None:
            if not await Store.delete_timer(tx, timer.timer_id):
                return
            ts = now_ms()
            row = await tx.transition(
                timer.target,
                [Status.EXECUTING],
                Status.QUEUED,
                "queued",
                db.runs.c.current_attempt_id.is_(None),
                queued_at=ts,
                updated_at=ts,
            )
            if row is not None:
                m = row._mapping
                tx.after_commit.append(
                    lambda: self._enqueue(
                        (m["environment_id"], m["queue"]), m["id"], m["task_id"], ts, m["priority"]
                    )
                )

        try:
            await self.store.writer.run(op)
        except Exception:
            log.exception("timer %s failed; retrying in 1 s", timer.timer_id)
            timer.due_at = now_ms() + 1000
            self._add_timer(timer)

    async def _lease_loop(self) -> None:
        """Lapse leases of silent executors and of assignments never acknowledged."""
        while True:
            await asyncio.sleep(min(0.5, self.settings.lease_timeout / 4))
            now = time.monotonic()
            timeout = self.settings.lease_timeout
            for lease in list(self.index.leases.values()):
                if lease.lapsing:
                    continue
                ex = self.index.executors.get(lease.executor_id)
                if ex is None:  # adopted after a restart: its executor has `timeout` to claim it
                    lapsed = now - lease.assigned_at > timeout
                else:
                    lapsed = (
                        now - ex.last_seen > timeout
                        or (ex.connected and lease.attempt_id not in ex.attempts)
                        or (not lease.acked and now - lease.assigned_at > self.settings.ack_timeout)
                    )
                if lapsed:
                    self._lapse(lease)
            for ex in list(self.index.executors.values()):
                if now - ex.last_seen > timeout:
                    ex.connected = False
                    if not ex.attempts:
                        del self.index.executors[ex.executor_id]

    def _lapse(self, lease: Lease) -> None:
        """The attempt's executor is gone: a started attempt failed, an unstarted one goes back."""
        log.warning("lease of attempt %s (run %s) lapsed", lease.attempt_id, lease.run_id)
        lease.lapsing = True
        ex = self.index.executors.get(lease.executor_id)
        if ex is not None:
            ex.attempts.discard(lease.attempt_id)
        if lease.started:
            error = {
                "type": "ExecutorLost",
                "message": "the executor running this attempt stopped responding",
                "stack_trace": "",
            }
            self._fail(lease, error, False, final_status=Status.SYSTEM_FAILURE)
        else:
            self._requeue_lost(lease)
