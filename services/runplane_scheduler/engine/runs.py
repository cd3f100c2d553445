"""Runs: what is done to a run from outside its attempts: cancel (with its descendants),
replay, reschedule, metadata (from the API and from attempts), tags, and log lines."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import orjson

from runplane_common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from runplane_common.ids import new_id
from runplane_core.metadata import Operation, apply_operations
from runplane_scheduler import json_depth
from runplane_scheduler.dispatch import ExecutorState
from runplane_scheduler.engine.resources import EngineResources
from runplane_scheduler.engine.timers import TimerKind, Timers
from runplane_scheduler.engine.triggering import Triggering
from runplane_scheduler.engine.waitpoints import Waitpoints
from runplane_scheduler.specs import TriggerSpec
from runplane_scheduler.states import Status
from runplane_scheduler.store import RunRow, Store, Tx
from runplane_scheduler.store import runs as stored_runs
from runplane_scheduler.worker_messages import CancelAttempt, LogBatch, MetadataUpdate, RunCanceled

log = logging.getLogger("runplane.scheduler")

NOT_STARTED = (Status.PENDING_VERSION, Status.DELAYED, Status.QUEUED)
CANCELLABLE = (*NOT_STARTED, Status.DEQUEUED, Status.EXECUTING, Status.WAITING)


class Runs:
    def __init__(
        self,
        resources: EngineResources,
        timers: Timers,
        triggering: Triggering,
        waitpoints: Waitpoints,
    ) -> None:
        self.resources = resources
        self.timers = timers
        self.triggering = triggering
        self.waitpoints = waitpoints

    # -- cancel ----------------------------------------------------------------------------------

    async def cancel(self, environment_id: str, run_id: str) -> RunRow:
        """Cancel a run that has not finished, and its descendants in progress."""

        async def op(tx: Tx) -> RunRow:
            row = await self.cancel_one(tx, environment_id, run_id)
            if row is None:
                return await stored_runs.get_in_environment(tx, environment_id, run_id)
            frontier = [run_id]
            while frontier:
                frontier = await stored_runs.children_in(tx, frontier, CANCELLABLE)
                for child in frontier:
                    await self.cancel_one(tx, environment_id, child)
            return row

        return await self.resources.store.writer.run(op)

    async def cancel_one(self, tx: Tx, environment_id: str, run_id: str) -> RunRow | None:
        ts = self.resources.clock.now_ms()
        row = await tx.transition(
            run_id,
            CANCELLABLE,
            Status.CANCELED,
            "canceled",
            stored_runs.in_environment(environment_id),
            finished_at=ts,
            updated_at=ts,
            current_attempt_id=None,
        )
        if row is None:
            return None
        attempt_id = self.resources.index.attempt_of(run_id)
        if attempt_id is not None:
            await Store.finish_attempt(tx, attempt_id, "CANCELED")
            tx.after_commit.append(lambda: self.cancel_attempt(attempt_id, run_id))
        else:
            m = row._mapping
            tx.after_commit.append(lambda: self.cancelled_without_attempt(m))
        return row

    def cancelled_without_attempt(self, m: Mapping[Any, Any]) -> None:
        """A run cancelled with no leased attempt: a suspended (waiting) attempt is stopped and
        runs its on_cancel hooks itself; otherwise (queued, delayed, or waiting with its attempt
        gone) one executor providing its task runs them (best effort)."""
        if self.waitpoints.cancelled(m["id"]):
            return
        for ex in self.resources.index.executors.values():
            if (
                ex.connected
                and ex.environment_id == m["environment_id"]
                and m["task_id"] in ex.tasks
            ):
                ex.outbox.put_nowait(
                    RunCanceled(
                        run=m,
                        environment_slug=ex.environment_id.removeprefix("env_"),
                        environment_id=ex.environment_id,
                    )
                )
                return

    def cancel_attempt(self, attempt_id: str, run_id: str) -> None:
        index = self.resources.index
        lease = index.release(attempt_id)
        if lease is not None:
            ex = index.executors.get(lease.executor_id)
            if ex is not None and ex.connected:
                ex.outbox.put_nowait(CancelAttempt(attempt_id=attempt_id, run_id=run_id))
        self.resources.dispatch_wake.set()

    # -- replay and reschedule -------------------------------------------------------------------

    async def replay(self, environment_id: str, run_id: str) -> Mapping[Any, Any]:
        """A new run of the same task with the original's payload, tags, metadata and options."""
        original = await self.resources.store.get_run(environment_id, run_id)
        if original is None:
            raise NotFound(f"run {run_id} not found")
        m = original._mapping
        configs = self.resources.index.configs
        spec = TriggerSpec(
            task_id=m["task_id"],
            payload=m["payload"],
            queue=m["queue"] if (environment_id, m["queue"]) in configs else "",
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
        row, _ = await self.triggering.trigger(environment_id, spec)
        return row

    async def reschedule(self, environment_id: str, run_id: str, delay_until: int) -> RunRow:
        """Move a DELAYED run's start (queued at once when ``delay_until`` has passed)."""

        async def op(tx: Tx) -> RunRow:
            ts = self.resources.clock.now_ms()
            row = await tx.transition(
                run_id,
                [Status.DELAYED],
                Status.DELAYED,
                "rescheduled",
                stored_runs.in_environment(environment_id),
                delay_until=delay_until,
                updated_at=ts,
            )
            if row is None:
                current = await stored_runs.get_in_environment(tx, environment_id, run_id)
                raise FailedPrecondition(
                    f"run {run_id} is {current.status}; only DELAYED runs can be rescheduled"
                )
            await self.timers.schedule(tx, max(delay_until, ts), TimerKind.DELAY, run_id)
            return row

        return await self.resources.store.writer.run(op)

    # -- metadata, tags, logs --------------------------------------------------------------------

    def metadata_op(
        self,
        environment_id: str,
        run_id: str,
        change: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> Callable[[Tx], Coroutine[Any, Any, RunRow]]:
        """An operation changing a run's metadata as one run update (one event, one version),
        refused (nothing written) when the result is over the metadata limit."""
        limit = self.resources.settings.limits.metadata_bytes
        depth = self.resources.settings.limits.json_depth

        async def op(tx: Tx) -> RunRow:
            row = await stored_runs.get_in_environment(tx, environment_id, run_id)
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

    def metadata_from_attempt(self, ex: ExecutorState, update: MetadataUpdate) -> None:
        """One flush of an attempt's metadata updates (its run, parent or root)."""
        lease = self.resources.index.leases.get(update.attempt_id)
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
        change = self.metadata_op(
            ex.environment_id, update.run_id, lambda doc: apply_operations(doc, operations)
        )
        own = lease.run_id

        async def op(tx: Tx) -> RunRow:
            # An attempt changes its own run's metadata, its parent's or its root's (SPEC §7,
            # metadata.parent / metadata.root), never another run's of the environment.
            if update.run_id != own:
                row = await stored_runs.get_in_environment(tx, ex.environment_id, own)
                if update.run_id not in (row.parent_run_id, row.root_run_id):
                    raise PermissionDenied(
                        f"attempt {update.attempt_id} of run {own} may change the metadata of "
                        f"its run, its parent or its root, not of {update.run_id[:80]}"
                    )
            return await change(tx)

        self.resources.background.submit(op)

    async def update_metadata(self, environment_id: str, run_id: str, metadata: str) -> RunRow:
        """Replace a run's metadata object (``RunService.UpdateRunMetadata``)."""
        new = orjson.loads(metadata)
        return await self.resources.store.writer.run(
            self.metadata_op(environment_id, run_id, lambda _: new)
        )

    async def add_tags(self, environment_id: str, run_id: str, tags: list[str]) -> RunRow:
        """Add tags to a run (``RunService.AddRunTags``), within the per-run tag limit."""
        limit = self.resources.settings.limits.tags

        async def op(tx: Tx) -> RunRow:
            row = await stored_runs.get_in_environment(tx, environment_id, run_id)
            current: list[str] = orjson.loads(row.tags)
            new = [t for t in dict.fromkeys(tags) if t not in current]
            if len(current) + len(new) > limit:
                raise InvalidArgument(
                    "tags",
                    f"{len(current) + len(new)} tags is over the limit of {limit} tags per run",
                )
            if not new:
                return row
            stored_runs.add_tags(tx, environment_id, run_id, new)
            status = Status(row.status)
            updated = await tx.transition(
                run_id, [status], status, "tags", tags=orjson.dumps(current + new).decode()
            )
            return updated if updated is not None else row

        return await self.resources.store.writer.run(op)

    def store_logs(self, ex: ExecutorState, batch: LogBatch) -> None:
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
                "time": e.time,
                "trace_id": clean(e.trace_id, 32),
                "span_id": clean(e.span_id, 16),
            }
            for e in batch.entries
        ]

        async def op(tx: Tx) -> None:
            stored_runs.insert_logs(tx, rows)

        if rows:
            self.resources.background.submit(op)

    async def list_logs(
        self, environment_id: str, run_id: str, after_id: str | None, limit: int
    ) -> list[RunRow]:
        """A run's log lines after ``after_id``, oldest first."""
        return await stored_runs.list_logs(
            self.resources.store.db, environment_id, run_id, after_id, limit
        )

    async def timeline(
        self, environment_id: str, run_id: str, log_limit: int
    ) -> stored_runs.TimelineRows:
        """The rows of a run's waterfall: attempts, waits, child runs, its first log lines."""
        return await stored_runs.timeline(
            self.resources.store.db, environment_id, run_id, log_limit
        )
