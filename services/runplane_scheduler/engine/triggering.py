"""Triggering: new runs (one or a batch), idempotency keys, debounce, the parent a child run
inherits from, and the way a new run starts (DELAYED, QUEUED, dequeued at once, or waiting for
an executor that provides its task); also the timers that end a delay or a TTL."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema
import orjson

from runplane_common import telemetry
from runplane_common.errors import InvalidArgument
from runplane_common.ids import new_id, random_id
from runplane_scheduler.dispatch import ExecutorState, QueuedRun, QueueKey
from runplane_scheduler.engine.attempts import Attempts, attempt_row
from runplane_scheduler.engine.resources import EngineResources
from runplane_scheduler.engine.timers import TimerKind, Timers
from runplane_scheduler.retry import RetryPolicy
from runplane_scheduler.specs import TriggerSpec, TxGuard
from runplane_scheduler.states import Status
from runplane_scheduler.store import Store, Tx
from runplane_scheduler.store import runs as stored_runs

log = logging.getLogger("runplane.scheduler")

DEFAULT_IDEMPOTENCY_TTL_MS = 30 * 86_400_000


@functools.lru_cache(maxsize=1024)
def payload_validator(schema: str) -> jsonschema.protocols.Validator:
    """A validator for a task's payload schema (checked at registration), compiled once."""
    loaded = orjson.loads(schema)
    cls = jsonschema.validators.validator_for(loaded)
    return cls(loaded)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Resolved:
    """What a new run takes from its parent."""

    parent_run_id: str | None = None
    root_run_id: str | None = None
    depth: int = 0
    parent_version: str = ""


@dataclass(frozen=True)
class SameAs:
    """A batch item whose idempotency key an earlier item of the same batch claimed."""

    index: int


class Triggering:
    def __init__(self, resources: EngineResources, timers: Timers, attempts: Attempts) -> None:
        self.resources = resources
        self.timers = timers
        self.attempts = attempts
        # Runs no connected executor of their version provides the task of, by (environment
        # id, task id, version); version '': runs that lock to the task's current version.
        self.pending_version: dict[tuple[str, str, str], list[str]] = {}

    async def trigger(
        self, environment_id: str, spec: TriggerSpec, guard: TxGuard | None = None
    ) -> tuple[Mapping[Any, Any], bool]:
        """Create a run (or return the one holding the idempotency key). Returns (run, cached).

        ``guard`` (a single-use token's use) is checked in the run's transaction before it
        writes and recorded after, so a trigger that fails leaves it unused."""
        index = self.resources.index
        # A child run's version is its parent's (read in the transaction) unless one is asked.
        inherits = bool(spec.parent_run_id and not spec.version)
        self.check_task(environment_id, spec, "task_id")
        self.check_version(environment_id, spec, "options.version")
        version = self.resources.lock_version(environment_id, spec.task_id, spec.version)
        self.check_payload(environment_id, spec, "payload", version)
        queue = self.queue_for(environment_id, spec, "options.queue", version)
        known = self.runnable(environment_id, spec.task_id, version)
        key = (environment_id, queue, spec.concurrency_key)
        run_id = new_id("run")
        # Fast path: with nothing waiting in its queue and a slot free, the run is queued and
        # dequeued in one commit (both events are still published, in order).
        direct = (
            known
            and not inherits
            and spec.delay_until <= self.resources.clock.now_ms()
            and spec.debounce is None
        )
        ex = index.reserve_direct(key, spec.task_id, run_id, version) if direct else None
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
            ts = self.resources.clock.now_ms()
            [found] = await self.resolve(tx, environment_id, [spec], ts)
            if isinstance(found, Resolved):
                if (pushed := await self.debounce(tx, environment_id, spec, ts)) is not None:
                    return pushed, True
                row = self.new_run(environment_id, spec, run_id, queue, found, traceparent, ts)
                if inherits:
                    row["worker_version"] = self.resources.lock_version(
                        environment_id, spec.task_id, "", found.parent_version
                    )
                    runnable = self.runnable(environment_id, spec.task_id, row["worker_version"])
                    return await self.insert(tx, row, spec, runnable, None, ""), False
                row["worker_version"] = version
                return await self.insert(tx, row, spec, known, ex, attempt_id), False
            assert not isinstance(found, SameAs)  # only within a batch
            return found, True

        try:
            row, cached = await self.resources.store.writer.run(op)
        except BaseException:
            if ex is not None:
                index.unreserve(run_id, key, ex)
            raise
        if ex is not None:
            if cached:
                index.unreserve(run_id, key, ex)
                self.resources.dispatch_wake.set()
            else:
                self.attempts.assign(row, attempt_id, key, ex)
        if cached:
            telemetry.link_current_span(
                row.get("traceparent") or "", **{"runplane.run_id": row["id"]}
            )
        return row, cached

    async def batch_trigger(
        self, environment_id: str, specs: list[TriggerSpec], idempotency_key: str = ""
    ) -> tuple[str, list[Mapping[Any, Any]], list[bool]]:
        """Create a batch's runs in item order, all in one transaction or none."""
        lock = self.resources.lock_version
        versions = [lock(environment_id, s.task_id, s.version) for s in specs]
        for i, spec in enumerate(specs):
            self.check_task(environment_id, spec, f"items[{i}].task_id")
            self.check_version(environment_id, spec, f"items[{i}].options.version")
            self.check_payload(environment_id, spec, f"items[{i}].payload", versions[i])
        queues = [
            self.queue_for(environment_id, spec, f"items[{i}].options.queue", versions[i])
            for i, spec in enumerate(specs)
        ]
        batch_id = new_id("batch")
        run_ids = [new_id("run") for _ in specs]
        traceparent = telemetry.current_traceparent()

        async def op(tx: Tx) -> tuple[str, list[Mapping[Any, Any]], list[bool]]:
            ts = self.resources.clock.now_ms()
            if idempotency_key:
                existing = await self.existing_batch(tx, environment_id, idempotency_key)
                if existing is not None:
                    return existing
            found = await self.resolve(tx, environment_id, specs, ts, where="items[{}].")
            stored_runs.insert_batch(
                tx,
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
            for spec, queue, run_id, item, version in zip(
                specs, queues, run_ids, found, versions, strict=True
            ):
                if not isinstance(item, Resolved):
                    rows.append(rows[item.index] if isinstance(item, SameAs) else item)
                    cached.append(True)
                    continue
                if (pushed := await self.debounce(tx, environment_id, spec, ts)) is not None:
                    rows.append(pushed)
                    cached.append(True)
                    continue
                row = self.new_run(environment_id, spec, run_id, queue, item, traceparent, ts)
                row["batch_id"] = batch_id
                if spec.parent_run_id and not spec.version:
                    version = self.resources.lock_version(
                        environment_id, spec.task_id, "", item.parent_version
                    )
                row["worker_version"] = version
                known = self.runnable(environment_id, spec.task_id, version)
                rows.append(await self.insert(tx, row, spec, known, None, ""))
                cached.append(False)
            return batch_id, rows, cached

        made = await self.resources.store.writer.run(op)
        for row, cached in zip(made[1], made[2], strict=True):
            if cached:
                telemetry.link_current_span(
                    row.get("traceparent") or "", **{"runplane.run_id": row["id"]}
                )
        return made

    @staticmethod
    async def existing_batch(
        tx: Tx, environment_id: str, idempotency_key: str
    ) -> tuple[str, list[Mapping[Any, Any]], list[bool]] | None:
        found = await stored_runs.find_batch(tx, environment_id, idempotency_key)
        if found is None:
            return None
        batch_id, rows = found
        return batch_id, rows, [True] * len(rows)

    def runnable(self, environment_id: str, task_id: str, version: str) -> bool:
        """A run of ``task_id`` locked to ``version`` can be dispatched now ('' : not yet)."""
        return bool(version) and self.resources.index.provides(environment_id, task_id, version)

    def check_task(self, environment_id: str, spec: TriggerSpec, field_name: str) -> None:
        """A task no version in the environment ever registered is a mistake (a typo, the wrong
        environment), not a run to keep until one does: refused, naming the known tasks. A known
        task with no executor online waits in PENDING_VERSION instead."""
        r = self.resources
        if (environment_id, spec.task_id) in r.task_defs:
            return
        known: set[str] = set()
        for (env, _), defs in r.version_defs.items():
            if env == environment_id:
                if spec.task_id in defs:
                    return
                known.update(defs)
        known.update(task for env, task in r.task_defs if env == environment_id)
        names = sorted(known)
        listed = ", ".join(repr(n) for n in names[:20]) + (" ..." if len(names) > 20 else "")
        raise InvalidArgument(
            field_name,
            f"unknown task {spec.task_id[:128]!r}: no worker version in this environment "
            "has registered it; "
            + (f"known tasks: {listed}" if names else "no task is registered here yet"),
        )

    def check_version(self, environment_id: str, spec: TriggerSpec, field_name: str) -> None:
        """A trigger's explicit version must be registered in the environment and define the
        task."""
        if not spec.version:
            return
        defs = self.resources.version_defs.get((environment_id, spec.version))
        if defs is None:
            raise InvalidArgument(field_name, f"version {spec.version[:64]!r} is not registered")
        if spec.task_id not in defs:
            raise InvalidArgument(
                field_name, f"version {spec.version[:64]!r} does not define task {spec.task_id!r}"
            )

    def check_payload(
        self, environment_id: str, spec: TriggerSpec, field_name: str, version: str = ""
    ) -> None:
        """The payload against the JSON Schema the task registered (pydantic models register
        theirs), so a trigger from any language is checked before a run exists."""
        td = self.resources.definition(environment_id, spec.task_id, version)
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

    def queue_for(
        self, environment_id: str, spec: TriggerSpec, field_name: str, version: str = ""
    ) -> str:
        """The run's queue: the trigger's (which code must define), else the task's."""
        if spec.queue:
            if (environment_id, spec.queue) not in self.resources.index.configs:
                raise InvalidArgument(
                    field_name,
                    f"unknown queue {spec.queue[:80]!r}: no registered task defines it",
                )
            return spec.queue
        td = self.resources.definition(environment_id, spec.task_id, version)
        return td.queue if td else f"task/{spec.task_id}"

    @staticmethod
    async def resolve(
        tx: Tx,
        environment_id: str,
        specs: list[TriggerSpec],
        ts: int,
        where: str = "",
    ) -> list[Resolved | SameAs | Mapping[Any, Any]]:
        """Reads before any write: each spec's parent, or the run already holding its
        idempotency key (also an earlier item of the same batch)."""
        out: list[Resolved | SameAs | Mapping[Any, Any]] = []
        claimed: dict[tuple[str, str], int] = {}
        for i, spec in enumerate(specs):
            prefix = where.format(i)
            if spec.idempotency_key:
                claim = (spec.task_id, spec.idempotency_key)
                if claim in claimed:
                    out.append(SameAs(claimed[claim]))
                    continue
                existing = await Store.find_idempotent(
                    tx, environment_id, spec.task_id, spec.idempotency_key, ts
                )
                if existing is not None:
                    out.append(existing._mapping)
                    continue
                claimed[claim] = i
            resolved = Resolved()
            if spec.parent_run_id:
                parent = await stored_runs.parent(tx, environment_id, spec.parent_run_id)
                if parent is None:
                    raise InvalidArgument(
                        f"{prefix}options.parent_run_id", f"run {spec.parent_run_id} not found"
                    )
                resolved = Resolved(
                    parent.id,
                    parent.root_run_id or parent.id,
                    parent.depth + 1,
                    parent.worker_version,
                )
            out.append(resolved)
        return out

    def new_run(
        self,
        environment_id: str,
        spec: TriggerSpec,
        run_id: str,
        queue: str,
        resolved: Resolved,
        traceparent: str,
        ts: int,
    ) -> dict[str, Any]:
        td = self.resources.definition(environment_id, spec.task_id, spec.version)
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
            "max_attempts": self.max_attempts(environment_id, spec),
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
            "schedule_tick": spec.schedule_tick or None,
            "started_at": None,
            "finished_at": None,
            "duration_ms": 0,
            "traceparent": traceparent,
            "current_attempt_id": None,
            "executor_id": None,
            "worker_version": spec.version,
            "parked_from": None,
        }

    def max_attempts(self, environment_id: str, spec: TriggerSpec) -> int:
        """The trigger's max_attempts, else the task's, else the default."""
        td = self.resources.definition(environment_id, spec.task_id, spec.version)
        return spec.max_attempts or (td.retry.max_attempts if td else RetryPolicy().max_attempts)

    async def debounce(
        self, tx: Tx, environment_id: str, spec: TriggerSpec, ts: int
    ) -> Mapping[Any, Any] | None:
        """Push back the task's DELAYED run with the same debounce key and return it (in
        trailing mode with this trigger's payload and options); None when there is none or
        ``max_delay`` forbids pushing it further (then a new run is made)."""
        d = spec.debounce
        if d is None:
            return None
        current = await stored_runs.debounced(tx, environment_id, spec.task_id, d.key)
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
                max_attempts=self.max_attempts(environment_id, spec),
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
        await self.timers.schedule(tx, until, TimerKind.DELAY, current.id)
        return row._mapping

    async def insert(
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
            await self.timers.schedule(tx, values["delay_until"], TimerKind.DELAY, run_id)
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
            await Store.insert_attempt(tx, attempt_row(attempt_id, run_id, 1, ex, ts))
            return values
        if not known:
            values["status"] = Status.PENDING_VERSION.value
        await Store.insert_run(tx, values, spec.tags)
        await self.queued(tx, values, ts)
        return values

    async def queued(self, tx: Tx, m: Mapping[Any, Any], ts: int) -> None:
        """A run has just become QUEUED (or PENDING_VERSION): index it after the commit and
        start its TTL countdown."""
        if m["ttl_ms"]:
            await self.timers.schedule(tx, ts + m["ttl_ms"], TimerKind.TTL, m["id"])
        if m["status"] == Status.PENDING_VERSION.value:
            env, task_id, run_id = m["environment_id"], m["task_id"], m["id"]
            version = m.get("worker_version") or ""
            tx.after_commit.append(lambda: self.park(env, task_id, version, run_id))
        else:
            snapshot = dict(m)
            enqueue = self.resources.enqueue
            tx.after_commit.append(lambda: enqueue(snapshot, ts))

    def park(self, environment_id: str, task_id: str, version: str, run_id: str) -> None:
        """A run no executor of its version provides waits for one; if one registered while
        the run was being written, release it at once (registration has already emptied the
        waiting list)."""
        self.pending_version.setdefault((environment_id, task_id, version), []).append(run_id)
        self.provided(environment_id, [task_id])

    async def strand(self, queued: QueuedRun, key: QueueKey) -> None:
        """A QUEUED run reached the head of its queue with no executor of its version connected
        and another version current: it waits in PENDING_VERSION (the dispatch index has set
        it aside) until an executor of its version registers, or an operator migrates it."""
        run_id, environment_id, task_id, version = (
            queued.run_id,
            key[0],
            queued.task_id,
            queued.version,
        )

        try:
            row = await self.resources.park(run_id, Status.QUEUED)
        except Exception:
            log.exception("parking %s for version %s failed", run_id, version)
            # Back in its queue: it is still QUEUED in the database.
            self.resources.index.requeue(queued, key)
            return
        if row is not None:
            log.info("queued run %s waits for an executor of version %s", run_id, version)
            self.park(environment_id, task_id, version, run_id)

    def restore_parked(self, environment_id: str, task_id: str, version: str, run_id: str) -> None:
        """A PENDING_VERSION run found after a restart."""
        self.pending_version.setdefault((environment_id, task_id, version), []).append(run_id)

    def provided(self, environment_id: str, task_ids: list[str]) -> None:
        """An executor of these tasks registered, or a version of them was promoted: the
        waiting runs whose version is now provided queue (those locked to no version yet lock
        to the task's current one)."""
        wanted = set(task_ids)
        for key in list(self.pending_version):
            env, task_id, version = key
            if env != environment_id or task_id not in wanted:
                continue
            lock = version or self.resources.current_versions.get((env, task_id), "")
            if lock and self.resources.index.provides(env, task_id, lock):
                waiting = self.pending_version.pop(key)
                self.resources.background.spawn(
                    self.release_pending(environment_id, waiting, "" if version else lock)
                )

    async def release_pending(
        self, environment_id: str, run_ids: list[str], lock: str = ""
    ) -> None:
        """Runs that waited for an executor of their version move to QUEUED (``lock``: the
        version the ones locked to none yet take)."""
        enqueue = self.resources.enqueue
        values: dict[str, Any] = {"worker_version": lock} if lock else {}

        def make_op(run_id: str) -> Callable[[Tx], Coroutine[Any, Any, None]]:
            async def op(tx: Tx) -> None:
                ts = self.resources.clock.now_ms()
                row = await tx.transition(
                    run_id,
                    [Status.PENDING_VERSION],
                    Status.QUEUED,
                    "queued",
                    queued_at=ts,
                    updated_at=ts,
                    parked_from=None,
                    **values,
                )
                if row is not None:
                    m = row._mapping
                    tx.after_commit.append(lambda: enqueue(m, ts))

            return op

        writer = self.resources.store.writer
        await asyncio.gather(*(writer.run(make_op(r)) for r in run_ids))

    async def reset_idempotency_key(self, environment_id: str, task_id: str, key: str) -> int:
        """Release ``key``: the next trigger with it creates a new run."""

        async def op(tx: Tx) -> int:
            return await stored_runs.release_idempotency_key(
                tx, environment_id, task_id, key, self.resources.clock.now_ms()
            )

        return await self.resources.store.writer.run(op)

    # -- timers ----------------------------------------------------------------------------------

    async def delay_due(self, tx: Tx, run_id: str, ts: int) -> None:
        """A DELAYED run's time came (unless it was rescheduled later): it queues, and its TTL
        starts counting."""
        current = await stored_runs.environment_and_task(tx, run_id)
        if current is None:
            return
        known = self.runnable(current.environment_id, current.task_id, current.worker_version)
        row = await tx.transition(
            run_id,
            [Status.DELAYED],
            Status.QUEUED if known else Status.PENDING_VERSION,
            "queued",
            stored_runs.delay_until_by(ts),
            queued_at=ts,
            updated_at=ts,
        )
        if row is not None:
            await self.queued(tx, row._mapping, ts)

    async def ttl_due(self, tx: Tx, run_id: str, ts: int) -> None:
        """A run not started within its TTL of being queued expires."""
        row = await tx.transition(
            run_id,
            [Status.QUEUED, Status.PENDING_VERSION],
            Status.EXPIRED,
            "expired",
            stored_runs.NEVER_STARTED,
            stored_runs.NO_ATTEMPT,
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
            index = self.resources.index
            tx.after_commit.append(lambda: index.discard(run_id))
