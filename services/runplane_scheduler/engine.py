"""The run engine: triggers, dispatch, attempt results, leases and timers.

Every change of a run is one state-machine transition committed with its outbox event through the
group-commit writer; the in-memory :class:`DispatchIndex` is updated only after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema
import orjson
from opentelemetry import trace
from sqlalchemy import select, update

from runplane.v1 import worker_service_pb2 as wpb
from runplane_common import db, telemetry
from runplane_common.config import SchedulerSettings
from runplane_common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from runplane_common.ids import new_id, random_id
from runplane_core.metadata import Operation, apply_operations
from runplane_scheduler import json_depth
from runplane_scheduler.dispatch import DispatchIndex, ExecutorState, Lease, QueueKey
from runplane_scheduler.retry import RetryPolicy, retry_delay, should_retry
from runplane_scheduler.states import Status
from runplane_scheduler.store import (
    CLEAN_ERRORS,
    DURATION_SINCE_START,
    DURATION_SO_FAR,
    FIRST_START,
    ONE_MORE_ATTEMPT,
    STARTED_AT_START,
    RunRow,
    Store,
    Tx,
    Via,
    now_ms,
    run_to_pb,
)
from runplane_scheduler.waitpoints import Waitpoints

log = logging.getLogger("runplane.scheduler")

NOT_STARTED = (Status.PENDING_VERSION, Status.DELAYED, Status.QUEUED)
# Worker messages about one attempt: accepted only from the connection holding the attempt.
ATTEMPT_REPORTS = frozenset({"ack", "started", "result", "metadata", "wait"})
CANCELLABLE = (*NOT_STARTED, Status.DEQUEUED, Status.EXECUTING, Status.WAITING)


class TxGuard(Protocol):
    """Something a write must pass in its own transaction: ``check`` before it writes (it may
    raise a domain error), ``record`` after it succeeded."""

    async def check(self, tx: Tx) -> None: ...

    async def record(self, tx: Tx) -> None: ...


@dataclass(frozen=True)
class TaskDef:
    task_id: str
    queue: str
    queue_concurrency_limit: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_duration: int = 0
    machine: str = "small-1x"
    ttl_ms: int = 0
    queue_rate_limit: int = 0
    queue_rate_period: float = 0.0
    queue_total_limit: int = 0
    payload_schema: str = ""


@dataclass(frozen=True)
class TriggerSpec:
    """A validated trigger request. Times are ms since the epoch; durations ms."""

    task_id: str
    payload: str = "null"
    queue: str = ""
    tags: tuple[str, ...] = ()
    metadata: str = "{}"
    max_attempts: int = 0
    idempotency_key: str = ""
    idempotency_key_ttl_ms: int = 0  # 0: 30 days
    concurrency_key: str = ""
    priority: int = 0
    delay_until: int = 0  # 0: not delayed
    ttl_ms: int | None = None  # None: the task's; 0: none
    max_duration_ms: int | None = None  # None: the task's
    machine: str = ""  # '': the task's
    parent_run_id: str = ""
    replayed_from_run_id: str = ""
    debounce: Debounce | None = None


@dataclass(frozen=True)
class Debounce:
    key: str
    delay_ms: int
    trailing: bool = False
    max_delay_ms: int = 0  # 0: unbounded


DEFAULT_IDEMPOTENCY_TTL_MS = 30 * 86_400_000


@functools.lru_cache(maxsize=1024)
def payload_validator(schema: str) -> jsonschema.protocols.Validator:
    """A validator for a task's payload schema (checked at registration), compiled once."""
    loaded = orjson.loads(schema)
    cls = jsonschema.validators.validator_for(loaded)
    return cls(loaded)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Resolved:
    """What a new run takes from its parent."""

    parent_run_id: str | None = None
    root_run_id: str | None = None
    depth: int = 0


@dataclass(frozen=True)
class _SameAs:
    """A batch item whose idempotency key an earlier item of the same batch claimed."""

    index: int


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
        self._timer_kinds: dict[str, Callable[[Tx, str, int], Coroutine[Any, Any, None]]] = {
            "retry": self._retry_due,
            "delay": self._delay_due,
            "ttl": self._ttl_due,
        }
        # Called first when an executor registers (environment, registration, executor id):
        # syncs its declarative schedules; raises, before anything is stored, on a bad one.
        self.on_register: Callable[[str, wpb.Register, str], Coroutine[Any, Any, None]] | None = (
            None
        )
        self.waits = Waitpoints(self)
        self._timer_kinds["waitpoint"] = self.waits.timer_due
        store.writer.on_final = self.waits.run_finished

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
                ttl_ms=m["ttl_ms"],
                payload_schema=m["payload_schema"],
            )
        for td_key, td in self.task_defs.items():
            self._apply_queue_limit(td_key[0], td)
        for row in await self.store.load_queues():
            self._apply_queue_row(row)
        now = time.monotonic()
        for row in await self.store.load_active_runs():
            m = row._mapping
            status = Status(m["status"])
            key = (m["environment_id"], m["queue"], m["concurrency_key"])
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
        await self.waits.load()
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
        self, environment_id: str, spec: TriggerSpec, guard: TxGuard | None = None
    ) -> tuple[Mapping[Any, Any], bool]:
        """Create a run (or return the one holding the idempotency key). Returns (run, cached).

        ``guard`` (a single-use token's use) is checked in the run's transaction before it
        writes and recorded after, so a trigger that fails leaves it unused."""
        self._check_payload(environment_id, spec, "payload")
        queue = self._queue_for(environment_id, spec, "options.queue")
        known = self.index.provides(environment_id, spec.task_id)
        key = (environment_id, queue, spec.concurrency_key)
        run_id = new_id("run")
        # Fast path: with nothing waiting in its queue and a slot free, the run is queued and
        # dequeued in one commit (both events are still published, in order).
        direct = known and spec.delay_until <= now_ms() and spec.debounce is None
        ex = self.index.reserve_direct(key, spec.task_id, run_id) if direct else None
        attempt_id = random_id("attempt") if ex is not None else ""
        traceparent = telemetry.current_traceparent()

        async def op(tx: Tx) -> tuple[Mapping[Any, Any], bool]:
            if guard is not None:
                await guard.check(tx)
            made = await make(tx)
            if guard is not None:
                await guard.record(tx)
            return made

        async def make(tx: Tx) -> tuple[Mapping[Any, Any], bool]:
            ts = now_ms()
            [found] = await self._resolve(tx, environment_id, [spec], ts)
            if isinstance(found, _Resolved):
                if (pushed := await self._debounce(tx, environment_id, spec, ts)) is not None:
                    return pushed, True
                row = self._new_run(environment_id, spec, run_id, queue, found, traceparent, ts)
                return await self._insert(tx, row, spec, known, ex, attempt_id), False
            assert not isinstance(found, _SameAs)  # only within a batch
            return found, True

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
                self._assign(row, attempt_id, key, ex)
        return row, cached

    async def batch_trigger(
        self, environment_id: str, specs: list[TriggerSpec], idempotency_key: str = ""
    ) -> tuple[str, list[Mapping[Any, Any]], list[bool]]:
        """Create a batch's runs in item order, all in one transaction or none."""
        for i, spec in enumerate(specs):
            self._check_payload(environment_id, spec, f"items[{i}].payload")
        queues = [
            self._queue_for(environment_id, spec, f"items[{i}].options.queue")
            for i, spec in enumerate(specs)
        ]
        batch_id = new_id("batch")
        run_ids = [new_id("run") for _ in specs]
        traceparent = telemetry.current_traceparent()

        async def op(tx: Tx) -> tuple[str, list[Mapping[Any, Any]], list[bool]]:
            ts = now_ms()
            if idempotency_key:
                existing = await self._existing_batch(tx, environment_id, idempotency_key)
                if existing is not None:
                    return existing
            found = await self._resolve(tx, environment_id, specs, ts, where="items[{}].")
            tx.insert_later(
                db.batches,
                {
                    "id": batch_id,
                    "environment_id": environment_id,
                    "run_count": len(specs),
                    "idempotency_key": idempotency_key or None,
                    "created_at": ts,
                },
            )
            rows: list[Mapping[Any, Any]] = []
            cached: list[bool] = []
            for spec, queue, run_id, item in zip(specs, queues, run_ids, found, strict=True):
                if not isinstance(item, _Resolved):
                    rows.append(rows[item.index] if isinstance(item, _SameAs) else item)
                    cached.append(True)
                    continue
                if (pushed := await self._debounce(tx, environment_id, spec, ts)) is not None:
                    rows.append(pushed)
                    cached.append(True)
                    continue
                row = self._new_run(environment_id, spec, run_id, queue, item, traceparent, ts)
                row["batch_id"] = batch_id
                known = self.index.provides(environment_id, spec.task_id)
                rows.append(await self._insert(tx, row, spec, known, None, ""))
                cached.append(False)
            return batch_id, rows, cached

        return await self.store.writer.run(op)

    async def _existing_batch(
        self, tx: Tx, environment_id: str, idempotency_key: str
    ) -> tuple[str, list[Mapping[Any, Any]], list[bool]] | None:
        batch = (
            await tx.execute(
                select(db.batches.c.id).where(
                    db.batches.c.environment_id == environment_id,
                    db.batches.c.idempotency_key == idempotency_key,
                )
            )
        ).first()
        if batch is None:
            return None
        rows = (
            await tx.execute(
                select(db.runs).where(db.runs.c.batch_id == batch.id).order_by(db.runs.c.id)
            )
        ).all()
        return batch.id, [r._mapping for r in rows], [True] * len(rows)

    def _check_payload(self, environment_id: str, spec: TriggerSpec, field_name: str) -> None:
        """The payload against the JSON Schema the task registered (pydantic models register
        theirs), so a trigger from any language is checked before a run exists."""
        td = self.task_defs.get((environment_id, spec.task_id))
        if td is None or not td.payload_schema:
            return
        validator = payload_validator(td.payload_schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(orjson.loads(spec.payload)))
        if error is not None:
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            raise InvalidArgument(
                f"{field_name}{path}",
                f"does not match task {spec.task_id!r}'s payload schema: {error.message[:300]}",
            )

    def _queue_for(self, environment_id: str, spec: TriggerSpec, field_name: str) -> str:
        """The run's queue: the trigger's (which code must define), else the task's."""
        if spec.queue:
            if (environment_id, spec.queue) not in self.index.configs:
                raise InvalidArgument(
                    field_name,
                    f"unknown queue {spec.queue[:80]!r}: no registered task defines it",
                )
            return spec.queue
        td = self.task_defs.get((environment_id, spec.task_id))
        return td.queue if td else f"task/{spec.task_id}"

    async def _resolve(
        self,
        tx: Tx,
        environment_id: str,
        specs: list[TriggerSpec],
        ts: int,
        where: str = "",
    ) -> list[_Resolved | _SameAs | Mapping[Any, Any]]:
        """Reads before any write: each spec's parent, or the run already holding its
        idempotency key (also an earlier item of the same batch)."""
        out: list[_Resolved | _SameAs | Mapping[Any, Any]] = []
        claimed: dict[tuple[str, str], int] = {}
        for i, spec in enumerate(specs):
            prefix = where.format(i)
            if spec.idempotency_key:
                claim = (spec.task_id, spec.idempotency_key)
                if claim in claimed:
                    out.append(_SameAs(claimed[claim]))
                    continue
                existing = await Store.find_idempotent(
                    tx, environment_id, spec.task_id, spec.idempotency_key, ts
                )
                if existing is not None:
                    out.append(existing._mapping)
                    continue
                claimed[claim] = i
            resolved = _Resolved()
            if spec.parent_run_id:
                parent = (
                    await tx.execute(
                        select(db.runs.c.id, db.runs.c.root_run_id, db.runs.c.depth).where(
                            db.runs.c.id == spec.parent_run_id,
                            db.runs.c.environment_id == environment_id,
                        )
                    )
                ).first()
                if parent is None:
                    raise InvalidArgument(
                        f"{prefix}options.parent_run_id", f"run {spec.parent_run_id} not found"
                    )
                resolved = _Resolved(parent.id, parent.root_run_id or parent.id, parent.depth + 1)
            out.append(resolved)
        return out

    def _new_run(
        self,
        environment_id: str,
        spec: TriggerSpec,
        run_id: str,
        queue: str,
        resolved: _Resolved,
        traceparent: str,
        ts: int,
    ) -> dict[str, Any]:
        td = self.task_defs.get((environment_id, spec.task_id))
        ttl_ms = spec.ttl_ms if spec.ttl_ms is not None else (td.ttl_ms if td else 0)
        delay_until = ts + spec.debounce.delay_ms if spec.debounce else spec.delay_until
        delayed = delay_until > ts
        key_ttl = spec.idempotency_key_ttl_ms or DEFAULT_IDEMPOTENCY_TTL_MS
        return {
            "id": run_id,
            "environment_id": environment_id,
            "task_id": spec.task_id,
            "status": Status.DELAYED.value if delayed else Status.QUEUED.value,
            "payload": spec.payload,
            "output": None,
            "error": None,
            "tags": orjson.dumps(list(spec.tags)).decode(),
            "metadata": spec.metadata,
            "queue": queue,
            "idempotency_key": spec.idempotency_key or None,
            "idempotency_key_expires_at": ts + key_ttl if spec.idempotency_key else None,
            "concurrency_key": spec.concurrency_key,
            "priority": spec.priority,
            "attempt_count": 0,
            "max_attempts": self._max_attempts(environment_id, spec),
            "version": 1,
            "is_test": False,
            "parent_run_id": resolved.parent_run_id,
            "root_run_id": resolved.root_run_id,
            "depth": resolved.depth,
            "batch_id": None,
            "created_at": ts,
            "updated_at": ts,
            "queued_at": None if delayed else ts,
            "delay_until": delay_until if delayed else None,
            "debounce_key": spec.debounce.key if spec.debounce else None,
            "ttl_ms": ttl_ms or None,
            "max_duration_ms": spec.max_duration_ms,
            "machine": spec.machine,
            "replayed_from_run_id": spec.replayed_from_run_id or None,
            "started_at": None,
            "finished_at": None,
            "duration_ms": 0,
            "traceparent": traceparent,
            "current_attempt_id": None,
            "executor_id": None,
        }

    def _max_attempts(self, environment_id: str, spec: TriggerSpec) -> int:
        """The trigger's max_attempts, else the task's, else the default."""
        td = self.task_defs.get((environment_id, spec.task_id))
        return spec.max_attempts or (td.retry.max_attempts if td else RetryPolicy().max_attempts)

    async def _debounce(
        self, tx: Tx, environment_id: str, spec: TriggerSpec, ts: int
    ) -> Mapping[Any, Any] | None:
        """Push back the task's DELAYED run with the same debounce key and return it (in
        trailing mode with this trigger's payload and options); None when there is none or
        ``max_delay`` forbids pushing it further (then a new run is made)."""
        d = spec.debounce
        if d is None:
            return None
        r = db.runs.c
        current = (
            await tx.execute(
                select(r.id, r.created_at)
                .where(
                    r.environment_id == environment_id,
                    r.task_id == spec.task_id,
                    r.debounce_key == d.key,
                    r.status == Status.DELAYED.value,
                )
                .order_by(r.id.desc())
                .limit(1)
            )
        ).first()
        if current is None:
            return None
        until = ts + d.delay_ms
        if d.max_delay_ms and until > current.created_at + d.max_delay_ms:
            return None
        values: dict[str, Any] = {"delay_until": until, "updated_at": ts}
        if d.trailing:
            values.update(
                payload=spec.payload,
                metadata=spec.metadata,
                tags=orjson.dumps(list(spec.tags)).decode(),
                max_attempts=self._max_attempts(environment_id, spec),
                max_duration_ms=spec.max_duration_ms,
                machine=spec.machine,
            )
        row = await tx.transition(
            current.id, [Status.DELAYED], Status.DELAYED, "debounced", **values
        )
        if row is None:
            return None
        if d.trailing:
            await Store.replace_tags(tx, environment_id, current.id, spec.tags)
        await self._schedule(tx, until, "delay", current.id)
        return row._mapping

    async def _insert(
        self,
        tx: Tx,
        values: dict[str, Any],
        spec: TriggerSpec,
        known: bool,
        ex: ExecutorState | None,
        attempt_id: str,
    ) -> dict[str, Any]:
        """Write a new run (DELAYED, QUEUED, dequeued at once, or PENDING_VERSION) with its
        timers; the index learns of it after the commit."""
        run_id, ts = values["id"], values["created_at"]
        if values["status"] == Status.DELAYED.value:
            await Store.insert_run(tx, values, spec.tags)
            await self._schedule(tx, values["delay_until"], "delay", run_id)
            return values
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
            return values
        if not known:
            values["status"] = Status.PENDING_VERSION.value
        await Store.insert_run(tx, values, spec.tags)
        await self._queued(tx, values, ts)
        return values

    async def _queued(self, tx: Tx, m: Mapping[Any, Any], ts: int) -> None:
        """A run has just become QUEUED (or PENDING_VERSION): index it after the commit and
        start its TTL countdown."""
        if m["ttl_ms"]:
            await self._schedule(tx, ts + m["ttl_ms"], "ttl", m["id"])
        if m["status"] == Status.PENDING_VERSION.value:
            env, task_id, run_id = m["environment_id"], m["task_id"], m["id"]
            tx.after_commit.append(lambda: self._park(env, task_id, run_id))
        else:
            snapshot = dict(m)
            tx.after_commit.append(lambda: self._enqueue_row(snapshot, ts))

    async def _schedule(self, tx: Tx, due_at: int, kind: str, target: str) -> None:
        """A durable timer: in the database, and in the in-memory heap once committed."""
        timer_id = new_id("evt")
        await Store.add_timer(tx, timer_id, due_at, kind, target)
        tx.after_commit.append(lambda: self._add_timer(_Timer(due_at, timer_id, kind, target)))

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
        """Cancel a run that has not finished, and its descendants in progress."""

        async def op(tx: Tx) -> RunRow:
            row = await self._cancel_one(tx, environment_id, run_id)
            if row is None:
                return await self._get_in_tx(tx, environment_id, run_id)
            frontier = [run_id]
            while frontier:
                children = (
                    await tx.execute(
                        select(db.runs.c.id).where(
                            db.runs.c.parent_run_id.in_(frontier),
                            db.runs.c.status.in_([s.value for s in CANCELLABLE]),
                        )
                    )
                ).all()
                frontier = [c.id for c in children]
                for child in frontier:
                    await self._cancel_one(tx, environment_id, child)
            return row

        return await self.store.writer.run(op)

    async def _cancel_one(self, tx: Tx, environment_id: str, run_id: str) -> RunRow | None:
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
            return None
        attempt_id = self._attempt_of(run_id)
        if attempt_id is not None:
            await Store.finish_attempt(tx, attempt_id, "CANCELED")
            tx.after_commit.append(lambda: self._cancel_attempt(attempt_id, run_id))
        else:
            m = row._mapping
            tx.after_commit.append(lambda: self._cancelled_without_attempt(m))
        return row

    def _cancelled_without_attempt(self, m: Mapping[Any, Any]) -> None:
        """A run cancelled with no leased attempt: a suspended (waiting) attempt is stopped and
        runs its on_cancel hooks itself; otherwise (queued, delayed, or waiting with its attempt
        gone) one executor providing its task runs them (best effort)."""
        if self.waits.cancelled(m["id"]):
            return
        for ex in self.index.executors.values():
            if (
                ex.connected
                and ex.environment_id == m["environment_id"]
                and m["task_id"] in ex.tasks
            ):
                ex.outbox.put_nowait(
                    wpb.ConnectResponse(
                        run_canceled=wpb.RunCanceled(
                            run=run_to_pb(m),
                            environment_slug=ex.environment_id.removeprefix("env_"),
                            environment_id=ex.environment_id,
                        )
                    )
                )
                return

    async def replay(self, environment_id: str, run_id: str) -> Mapping[Any, Any]:
        """A new run of the same task with the original's payload, tags, metadata and options."""
        original = await self.store.get_run(environment_id, run_id)
        if original is None:
            raise NotFound(f"run {run_id} not found")
        m = original._mapping
        spec = TriggerSpec(
            task_id=m["task_id"],
            payload=m["payload"],
            queue=m["queue"] if (environment_id, m["queue"]) in self.index.configs else "",
            tags=tuple(orjson.loads(m["tags"])),
            metadata=m["metadata"],
            max_attempts=m["max_attempts"],
            concurrency_key=m["concurrency_key"],
            priority=m["priority"],
            ttl_ms=m["ttl_ms"] or 0,
            max_duration_ms=m["max_duration_ms"],
            machine=m["machine"],
            replayed_from_run_id=run_id,
        )
        row, _ = await self.trigger(environment_id, spec)
        return row

    async def reschedule(self, environment_id: str, run_id: str, delay_until: int) -> RunRow:
        """Move a DELAYED run's start (queued at once when ``delay_until`` has passed)."""

        async def op(tx: Tx) -> RunRow:
            ts = now_ms()
            row = await tx.transition(
                run_id,
                [Status.DELAYED],
                Status.DELAYED,
                "rescheduled",
                db.runs.c.environment_id == environment_id,
                delay_until=delay_until,
                updated_at=ts,
            )
            if row is None:
                current = await self._get_in_tx(tx, environment_id, run_id)
                raise FailedPrecondition(
                    f"run {run_id} is {current.status}; only DELAYED runs can be rescheduled"
                )
            await self._schedule(tx, max(delay_until, ts), "delay", run_id)
            return row

        return await self.store.writer.run(op)

    async def reset_idempotency_key(self, environment_id: str, task_id: str, key: str) -> int:
        """Release ``key``: the next trigger with it creates a new run."""

        async def op(tx: Tx) -> int:
            result = await tx.execute(
                update(db.runs)
                .where(
                    db.runs.c.environment_id == environment_id,
                    db.runs.c.task_id == task_id,
                    db.runs.c.idempotency_key == key,
                    db.runs.c.idempotency_key_expires_at > now_ms(),
                )
                .values(idempotency_key_expires_at=now_ms())
            )
            return int(result.rowcount)

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
        # Before anything of the registration is stored: a refused one changes nothing.
        self._check_executor_id(environment_id, executor_id, register.session_token)
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
                ttl_ms=int(t.ttl_seconds * 1000),
                queue_rate_limit=t.queue_rate_limit,
                queue_rate_period=t.queue_rate_period_seconds,
                queue_total_limit=t.queue_total_concurrency_limit,
                payload_schema=t.payload_schema,
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
                "ttl_ms": d.ttl_ms,
                "payload_schema": d.payload_schema,
                "updated_at": ts,
            }
            for d in defs
        ]

        async def op(tx: Tx) -> None:
            await Store.upsert_task_definitions(tx, environment_id, rows)
            await self._register_queues(tx, environment_id, defs, ts)

        await self.store.writer.run(op)
        for d in defs:
            self.task_defs[(environment_id, d.task_id)] = d
            self._apply_queue_limit(environment_id, d)
        # Checked again: another registration of this id may have finished while this one
        # wrote its definitions.
        self._check_executor_id(environment_id, executor_id, register.session_token)
        old = self.index.executors.get(executor_id)
        ex = ExecutorState(
            executor_id=executor_id,
            environment_id=environment_id,
            tasks=frozenset(d.task_id for d in defs),
            capacity=max(1, register.capacity),
            outbox=outbox,
            last_seen=time.monotonic(),
            session_token=secrets.token_urlsafe(24),
        )
        claimed = set(register.running_attempt_ids)
        if old is not None:
            old.connected = False
        for attempt_id, lease in self.index.leases.items():
            if (
                lease.executor_id == executor_id
                and lease.queue[0] == environment_id
                and attempt_id in claimed
            ):
                ex.attempts.add(attempt_id)
                lease.acked = True
        self.index.executors[executor_id] = ex
        self.waits.registered(ex, claimed)
        log.info(
            "executor %s connected: %d tasks, capacity %d", executor_id, len(defs), ex.capacity
        )
        for d in defs:
            waiting = self.pending_version.pop((environment_id, d.task_id), None)
            if waiting:
                self._spawn(self._release_pending(environment_id, waiting))
        self._dispatch_wake.set()
        return ex

    def _check_executor_id(self, environment_id: str, executor_id: str, session_token: str) -> None:
        """An executor id belongs to one environment and one connection at a time: while the
        scheduler knows the id, only the holder of its session token may register it again (a
        reconnect); an id whose leases or waiting attempts are another environment's is
        refused. ALREADY_EXISTS either way, the same for both, naming no environment."""
        refused = AlreadyExists(
            f"executor id {executor_id} is registered to another connection; an executor "
            "reconnects with the session_token it was given, a new executor uses a new id"
        )
        old = self.index.executors.get(executor_id)
        if old is not None:
            if old.environment_id != environment_id or not hmac.compare_digest(
                old.session_token.encode(), session_token.encode()
            ):
                log.warning(
                    "registration of executor id %s refused: held by another connection%s",
                    executor_id,
                    "" if old.environment_id == environment_id else " of another environment",
                )
                raise refused
            return
        # Not connected since this scheduler started: its adopted leases and waiting attempts
        # say which environment it belongs to.
        if any(
            lease.executor_id == executor_id and lease.queue[0] != environment_id
            for lease in self.index.leases.values()
        ) or self.waits.held_in_other_environment(executor_id, environment_id):
            log.warning(
                "registration of executor id %s refused: its attempts are another environment's",
                executor_id,
            )
            raise refused

    def holds(self, ex: ExecutorState, attempt_id: str) -> bool:
        """``ex`` is the live connection that holds the attempt: its current lease, or its
        suspended waiting attempt. Every report about an attempt must come from its holder."""
        if self.index.executors.get(ex.executor_id) is not ex:
            return False  # a connection replaced by a reconnect
        lease = self.index.leases.get(attempt_id)
        if lease is not None:
            return lease.executor_id == ex.executor_id and lease.queue[0] == ex.environment_id
        return self.waits.held_by(attempt_id, ex)

    async def _register_queues(
        self, tx: Tx, environment_id: str, defs: list[TaskDef], ts: int
    ) -> None:
        """Queues the code declares, with their declared limits (overrides and pauses stay)."""
        declared = {d.queue: d.queue_concurrency_limit for d in defs}
        if not declared:
            return
        q = db.queues.c
        existing = {
            r.name
            for r in (
                await tx.execute(
                    select(q.name).where(
                        q.environment_id == environment_id, q.name.in_(list(declared))
                    )
                )
            ).all()
        }
        for name, limit in declared.items():
            if name in existing:
                await tx.execute(
                    update(db.queues)
                    .where(q.environment_id == environment_id, q.name == name)
                    .values(concurrency_limit=limit, updated_at=ts)
                )
            else:
                tx.insert_later(
                    db.queues,
                    {
                        "id": new_id("queue"),
                        "environment_id": environment_id,
                        "name": name,
                        "concurrency_limit": limit,
                        "limit_override": None,
                        "overridden_at": None,
                        "paused": False,
                        "created_at": ts,
                        "updated_at": ts,
                    },
                )

    async def update_queue(self, environment_id: str, queue: str, **values: Any) -> RunRow:
        """Change a queue's pause flag or limit override; dispatch follows after the commit."""
        q = db.queues.c

        async def op(tx: Tx) -> RunRow:
            named = q.id == queue if queue.startswith("queue_") else q.name == queue
            row = (
                await tx.execute(
                    update(db.queues)
                    .where(q.environment_id == environment_id, named)
                    .values(updated_at=now_ms(), **values)
                    .returning(*db.queues.c)
                )
            ).first()
            if row is None:
                raise NotFound(f"queue {queue} not found")
            tx.after_commit.append(lambda: self._apply_queue_row(row))
            return row

        return await self.store.writer.run(op)

    def _apply_queue_row(self, row: RunRow) -> None:
        m = row._mapping
        config = self.index.config((m["environment_id"], m["name"]))
        config.limit = m["concurrency_limit"]
        config.override = m["limit_override"]
        config.paused = m["paused"]
        self._dispatch_wake.set()

    def _apply_queue_limit(self, environment_id: str, d: TaskDef) -> None:
        name = (environment_id, d.queue)
        config = self.index.config(name)
        config.limit = d.queue_concurrency_limit
        config.total_limit = d.queue_total_limit
        self.index.set_rate_limit(name, d.queue_rate_limit, d.queue_rate_period)

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
                    tx.after_commit.append(lambda: self._enqueue_row(m, ts))

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
        if kind in ATTEMPT_REPORTS:
            attempt_id: str = getattr(msg, kind).attempt_id
            if not self.holds(ex, attempt_id):
                self._refuse(ex, kind, attempt_id)
                return
        if kind == "ack":
            lease = self.index.leases.get(msg.ack.attempt_id)
            if lease is not None:
                lease.acked = True
        elif kind == "started":
            self._started(msg.started.attempt_id, _ms(msg.started, "started_at"))
        elif kind == "result":
            self._result(msg.result)
        elif kind == "metadata":
            self._metadata_from_attempt(ex, msg.metadata)
        elif kind == "logs":
            self._store_logs(ex, msg.logs)
        elif kind == "wait":
            self.waits.on_wait(ex, msg.wait)

    def _refuse(self, ex: ExecutorState, kind: str, attempt_id: str) -> None:
        """A report about an attempt ``ex`` does not hold: dropped. Reports of attempts that
        ended (cancelled, lapsed) are normal; one about another connection's attempt is not."""
        lease = self.index.leases.get(attempt_id)
        other = lease is not None or self.waits.held_by_anyone(attempt_id)
        (log.warning if other else log.info)(
            "%s for attempt %s from executor %s (environment %s) refused: %s",
            kind,
            attempt_id[:40],
            ex.executor_id,
            ex.environment_id,
            "another connection holds it" if other else "no live attempt of this connection",
        )

    def _started(self, attempt_id: str, started_at: int = 0) -> None:
        """The attempt began (at ``started_at`` by the executor's clock; 0: now)."""
        lease = self.index.leases.get(attempt_id)
        if lease is None:
            return
        lease.acked = lease.started = True
        run_id = lease.run_id

        async def op(tx: Tx) -> None:
            ts = now_ms()
            start = min(started_at, ts) if started_at else ts
            row = await tx.transition(
                run_id,
                [Status.DEQUEUED],
                Status.EXECUTING,
                "started",
                db.runs.c.current_attempt_id == attempt_id,
                started_at=FIRST_START,
                attempt_count=ONE_MORE_ATTEMPT,
                updated_at=ts,
                params={"p_now": start},
            )
            if row is not None:
                await Store.start_attempt(tx, attempt_id, start)

        self._submit(op)

    def _result(self, result: wpb.AttemptResult) -> None:
        attempt_id = result.attempt_id
        lease = self.index.leases.get(attempt_id)
        if lease is None:
            # Stale (the run was cancelled or its lease lapsed), or a WAITING run's attempt.
            self.waits.attempt_ended(attempt_id)
            return
        outcome = result.WhichOneof("outcome")
        limits = self.settings.limits
        too_large = outcome == "output" and (
            len(result.output) > limits.output_bytes
            or json_depth.too_deep(result.output, limits.json_depth)
        )
        if not lease.started and not result.lost and not result.canceled:
            started_at = _ms(result, "started_at")
            if started_at and outcome == "output" and not too_large:
                # It ended at once, so its executor held back its start: one write for both.
                lease.started = True
                self._complete(lease, result.output, started_at)
                self._dispatch_wake.set()
                return
            # Its start was held back, or its "started" report was lost (sent to a scheduler
            # that died before committing it): record the start first, in order.
            self._started(attempt_id, started_at)
        if result.lost:
            self._requeue_lost(lease)
        elif too_large:
            error = {
                "type": "OutputTooLargeError",
                "message": f"the output is over the output limit of {limits.output_bytes} bytes"
                if len(result.output) > limits.output_bytes
                else f"the output nests deeper than the JSON depth limit of {limits.json_depth}",
                "stack_trace": "",
            }
            self._fail(lease, error, True)
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
            if result.timed_out:  # never retried
                self._fail(lease, error, True, final_status=Status.TIMED_OUT)
            elif result.out_of_memory:  # retried only on a named bigger machine
                self._fail(
                    lease,
                    error,
                    not result.retry_machine,
                    final_status=Status.CRASHED,
                    retry_machine=result.retry_machine,
                )
            else:
                self._fail(
                    lease,
                    error,
                    result.skip_retrying,
                    retry_at=result.retry_at.ToMilliseconds()
                    if result.HasField("retry_at")
                    else None,
                    retry_delay_ms=result.retry_delay_ms
                    if result.HasField("retry_delay_ms")
                    else None,
                )
        self._dispatch_wake.set()

    def _complete(self, lease: Lease, output: str, started_at: int = 0) -> None:
        """The attempt returned ``output``; with ``started_at`` its start is recorded with it."""
        attempt_id = lease.attempt_id

        async def op(tx: Tx) -> None:
            ts = now_ms()
            tx.after_commit.append(lambda: self._release(attempt_id))
            if started_at:
                await self._start_and_complete(tx, lease, output, min(started_at, ts), ts)
                return
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
                duration_ms=DURATION_SO_FAR,
                params={"p_now": ts},
            )
            if row is not None:
                await Store.finish_attempt(tx, attempt_id, "COMPLETED")

        self._submit(op)

    @staticmethod
    async def _start_and_complete(tx: Tx, lease: Lease, output: str, start: int, ts: int) -> None:
        """DEQUEUED -> EXECUTING -> COMPLETED in one statement, with both events."""
        attempt_id = lease.attempt_id

        def as_started(m: dict[str, Any]) -> None:
            m.update(
                updated_at=start,
                output=None,
                finished_at=None,
                current_attempt_id=attempt_id,
                duration_ms=m["duration_ms"] - (ts - m["started_at"]),
            )

        row = await tx.transition(
            lease.run_id,
            [Status.DEQUEUED],
            Status.COMPLETED,
            "completed",
            db.runs.c.current_attempt_id == attempt_id,
            via=Via(Status.EXECUTING, "started", as_started),
            output=output,
            finished_at=ts,
            updated_at=ts,
            current_attempt_id=None,
            started_at=STARTED_AT_START,
            attempt_count=ONE_MORE_ATTEMPT,
            duration_ms=DURATION_SINCE_START,
            params={"p_now": ts, "p_start": start},
        )
        if row is not None:
            await Store.start_and_finish_attempt(tx, attempt_id, "COMPLETED", start, ts)

    def _fail(
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

        async def op(tx: Tx) -> None:
            ts = now_ms()
            current = (
                await tx.execute(
                    db.runs.select().where(
                        db.runs.c.id == lease.run_id, db.runs.c.current_attempt_id == attempt_id
                    )
                )
            ).first()
            tx.after_commit.append(lambda: self._release(attempt_id))
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
                if retry_delay_ms is not None:
                    delay_ms = max(0, retry_delay_ms)
                elif retry_at is not None:
                    delay_ms = max(0, retry_at - ts)
                else:
                    delay_ms = int(retry_delay(policy, attempt) * 1000)
                timer_id = new_id("evt")
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
            tx.after_commit.append(lambda: self._release(attempt_id))
            if row is not None:
                m = row._mapping
                tx.after_commit.append(lambda: self._enqueue_row(m, ts))

        self._submit(op)

    # -- dispatch --------------------------------------------------------------------------------

    def _release(self, attempt_id: str) -> None:
        """Free the attempt's slot; the next queued run may take it."""
        self.index.release(attempt_id)
        self._dispatch_wake.set()

    def _enqueue_row(self, m: Mapping[Any, Any], queued_at: int) -> None:
        key = (m["environment_id"], m["queue"], m["concurrency_key"])
        self.index.push(key, m["id"], m["task_id"], queued_at, m["priority"])
        self._dispatch_wake.set()

    async def _dispatch_loop(self) -> None:
        while True:
            wake_at = self.index.next_wake()
            timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dispatch_wake.wait(), timeout)
            self._dispatch_wake.clear()
            picked = self.index.take()
            for queued, key, ex in picked:
                if queued.run_id in self.waits.resuming:
                    self._spawn(self.waits.resume(queued.run_id, key, ex))
                else:
                    self._spawn(self._dequeue(queued.run_id, key, ex))

    async def _dequeue(self, run_id: str, key: QueueKey, ex: ExecutorState) -> None:
        attempt_id = random_id("attempt")

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
        self, m: Mapping[Any, Any], attempt_id: str, key: QueueKey, ex: ExecutorState
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
                    environment_id=ex.environment_id,
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
        fire = self._timer_kinds.get(timer.kind)
        if fire is None:
            log.warning("unknown timer kind %s", timer.kind)
            return

        async def op(tx: Tx) -> None:
            if await Store.delete_timer(tx, timer.timer_id):
                await fire(tx, timer.target, now_ms())

        try:
            await self.store.writer.run(op)
        except Exception:
            log.exception("timer %s failed; retrying in 1 s", timer.timer_id)
            timer.due_at = now_ms() + 1000
            self._add_timer(timer)

    async def _retry_due(self, tx: Tx, run_id: str, ts: int) -> None:
        """A retry's back-off ended: the run queues for its next attempt."""
        row = await tx.transition(
            run_id,
            [Status.EXECUTING],
            Status.QUEUED,
            "queued",
            db.runs.c.current_attempt_id.is_(None),
            queued_at=ts,
            updated_at=ts,
        )
        if row is not None:
            m = row._mapping
            tx.after_commit.append(lambda: self._enqueue_row(m, ts))

    async def _delay_due(self, tx: Tx, run_id: str, ts: int) -> None:
        """A DELAYED run's time came (unless it was rescheduled later): it queues, and its TTL
        starts counting."""
        current = (
            await tx.execute(
                select(db.runs.c.environment_id, db.runs.c.task_id).where(db.runs.c.id == run_id)
            )
        ).first()
        if current is None:
            return
        known = self.index.provides(current.environment_id, current.task_id)
        row = await tx.transition(
            run_id,
            [Status.DELAYED],
            Status.QUEUED if known else Status.PENDING_VERSION,
            "queued",
            db.runs.c.delay_until <= ts,
            queued_at=ts,
            updated_at=ts,
        )
        if row is not None:
            await self._queued(tx, row._mapping, ts)

    async def _ttl_due(self, tx: Tx, run_id: str, ts: int) -> None:
        """A run not started within its TTL of being queued expires."""
        row = await tx.transition(
            run_id,
            [Status.QUEUED, Status.PENDING_VERSION],
            Status.EXPIRED,
            "expired",
            db.runs.c.started_at.is_(None),
            db.runs.c.current_attempt_id.is_(None),
            error=orjson.dumps(
                {
                    "type": "TTL_EXPIRED",
                    "message": "the run was not started within its ttl",
                    "stack_trace": "",
                }
            ).decode(),
            finished_at=ts,
            updated_at=ts,
        )
        if row is not None:
            tx.after_commit.append(lambda: self.index.discard(run_id))

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

    # -- run execution: metadata, tags, logs ---------------------------

    def _metadata_op(
        self,
        environment_id: str,
        run_id: str,
        change: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> Callable[[Tx], Coroutine[Any, Any, RunRow]]:
        """An operation changing a run's metadata as one run update (one event, one version),
        refused (nothing written) when the result is over the metadata limit."""
        limit = self.settings.limits.metadata_bytes
        depth = self.settings.limits.json_depth

        async def op(tx: Tx) -> RunRow:
            row = await self._get_in_tx(tx, environment_id, run_id)
            try:
                text = orjson.dumps(change(orjson.loads(row.metadata or "{}"))).decode()
            except (TypeError, ValueError) as error:
                raise InvalidArgument("metadata", str(error)) from None
            size = len(text.encode())
            if size > limit:
                raise InvalidArgument(
                    "metadata", f"{size} bytes is over the metadata limit of {limit} bytes"
                )
            if json_depth.too_deep(text, depth):
                raise InvalidArgument(
                    "metadata", f"nested deeper than the JSON depth limit of {depth}"
                )
            status = Status(row.status)
            updated = await tx.transition(run_id, [status], status, "metadata", metadata=text)
            return updated if updated is not None else row

        return op

    def _metadata_from_attempt(self, ex: ExecutorState, update: wpb.MetadataUpdate) -> None:
        """One flush of an attempt's metadata updates (its run, parent or root)."""
        lease = self.index.leases.get(update.attempt_id)
        if lease is None or lease.executor_id != ex.executor_id:
            log.warning("metadata update from unknown attempt %s dropped", update.attempt_id)
            return
        try:
            operations: list[Operation] = [
                (o.type, o.key, orjson.loads(o.value) if o.value else None)
                for o in update.operations
            ]
        except orjson.JSONDecodeError:
            log.warning("metadata update of %s is not JSON; dropped", update.run_id)
            return
        change = self._metadata_op(
            ex.environment_id, update.run_id, lambda doc: apply_operations(doc, operations)
        )
        own = lease.run_id

        async def op(tx: Tx) -> RunRow:
            # An attempt changes its own run's metadata, its parent's or its root's (SPEC §7,
            # metadata.parent / metadata.root), never another run's of the environment.
            if update.run_id != own:
                row = await self._get_in_tx(tx, ex.environment_id, own)
                if update.run_id not in (row.parent_run_id, row.root_run_id):
                    raise PermissionDenied(
                        f"attempt {update.attempt_id} of run {own} may change the metadata of "
                        f"its run, its parent or its root, not of {update.run_id[:80]}"
                    )
            return await change(tx)

        self._submit(op)

    async def update_metadata(self, environment_id: str, run_id: str, metadata: str) -> RunRow:
        """Replace a run's metadata object (``RunService.UpdateRunMetadata``)."""
        new = orjson.loads(metadata)
        return await self.store.writer.run(self._metadata_op(environment_id, run_id, lambda _: new))

    async def add_tags(self, environment_id: str, run_id: str, tags: list[str]) -> RunRow:
        """Add tags to a run (``RunService.AddRunTags``), within the per-run tag limit."""
        limit = self.settings.limits.tags

        async def op(tx: Tx) -> RunRow:
            row = await self._get_in_tx(tx, environment_id, run_id)
            current: list[str] = orjson.loads(row.tags)
            new = [t for t in dict.fromkeys(tags) if t not in current]
            if len(current) + len(new) > limit:
                raise InvalidArgument(
                    "tags",
                    f"{len(current) + len(new)} tags is over the limit of {limit} tags per run",
                )
            if not new:
                return row
            for tag in new:
                tx.insert_later(
                    db.run_tags, {"run_id": run_id, "tag": tag, "environment_id": environment_id}
                )
            status = Status(row.status)
            updated = await tx.transition(
                run_id, [status], status, "tags", tags=orjson.dumps(current + new).decode()
            )
            return updated if updated is not None else row

        return await self.store.writer.run(op)

    def _store_logs(self, ex: ExecutorState, batch: wpb.LogBatch) -> None:
        """Log lines of attempts, stored in the executor's environment (read by ListRunLogs)."""

        def clean(value: str, length: int | None = None) -> str:
            value = value.replace("\x00", "")  # PostgreSQL text cannot hold NUL
            return value if length is None else value[:length]

        rows = [
            {
                "id": new_id("log"),
                "environment_id": ex.environment_id,
                "run_id": clean(e.run_id, 40),
                "attempt_id": clean(e.attempt_id, 40),
                "attempt_number": e.attempt_number,
                "level": clean(e.level, 16),
                "message": clean(e.message),
                "attributes": clean(e.attributes) or "{}",
                "time": e.time.ToMilliseconds(),
                "trace_id": clean(e.trace_id, 32),
                "span_id": clean(e.span_id, 16),
            }
            for e in batch.entries
        ]

        async def op(tx: Tx) -> None:
            for row in rows:
                tx.insert_later(db.run_logs, row)

        if rows:
            self._submit(op)

    async def list_logs(
        self, environment_id: str, run_id: str, after_id: str | None, limit: int
    ) -> list[RunRow]:
        """A run's log lines after ``after_id``, oldest first."""
        c = db.run_logs.c
        stmt = (
            select(db.run_logs)
            .where(c.environment_id == environment_id, c.run_id == run_id)
            .order_by(c.id)
            .limit(limit)
        )
        if after_id:
            stmt = stmt.where(c.id > after_id)
        async with self.store.engine.connect() as conn:
            return list((await conn.execute(stmt)).all())


def _ms(message: Any, field: str) -> int:
    """A Timestamp field in milliseconds, 0 when unset."""
    return int(getattr(message, field).ToMilliseconds()) if message.HasField(field) else 0
