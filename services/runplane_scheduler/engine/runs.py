"""Runs: what is done to a run from outside its attempts: cancel (with its descendants),
replay, reschedule, metadata (from the API and from attempts), tags, and log lines."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import orjson

from runplane_common import telemetry
from runplane_common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from runplane_common.ids import new_id
from runplane_core.metadata import Operation, apply_operations
from runplane_scheduler import json_depth
from runplane_scheduler.dispatch import ExecutorState
from runplane_scheduler.engine.resources import EngineResources, unlist
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
        # The replay is the replaying caller's, in its trace; the original run's trace is a
        # link, not a parent (the original did not cause it).
        with telemetry.tracer().start_as_current_span(
            "replay",
            links=telemetry.links_to(m["traceparent"], **{"runplane.replayed_from_run_id": run_id}),
            attributes={"runplane.replayed_from_run_id": run_id},
        ):
            row, _ = await self.triggering.trigger(environment_id, spec)
        return row

    async def migrate(
        self, environment_id: str, run_ids: list[str], from_version: str, to_version: str
    ) -> tuple[list[str], list[str]]:
        """Move PENDING_VERSION runs off the version they are locked to, whose code is gone:
        to ``to_version`` (a parked waiting run replays its journal there), or, with
        ``to_version`` '', fail them. The runs are ``run_ids``, or every PENDING_VERSION run
        locked to ``from_version``. Returns (moved, skipped: asked for by id, not
        PENDING_VERSION). All or nothing: an unknown id or a task ``to_version`` does not
        define refuses the whole request."""
        defs = self.resources.version_defs.get((environment_id, to_version), {})
        if to_version and not defs:
            raise InvalidArgument("to_version", f"version {to_version[:64]!r} is not registered")

        async def op(tx: Tx) -> tuple[list[Mapping[Any, Any]], list[str]]:
            rows = await stored_runs.for_migration(tx, environment_id, run_ids, from_version)
            found = {row.id for row in rows}
            for i, run_id in enumerate(run_ids):
                if run_id not in found:
                    raise NotFound(f"run_ids[{i}]: run {run_id} not found")
            parked = [row for row in rows if row.status == Status.PENDING_VERSION.value]
            for row in parked:
                if to_version and row.task_id not in defs:
                    raise FailedPrecondition(
                        f"version {to_version[:64]!r} does not define task {row.task_id!r} "
                        f"(run {row.id})"
                    )
            moved = [m for row in parked if (m := await self._migrate_one(tx, row, to_version))]
            return moved, [row.id for row in rows if row.id not in {m["id"] for m in moved}]

        moved, skipped = await self.resources.store.writer.run(op)
        return [m["id"] for m in moved], skipped

    async def _migrate_one(self, tx: Tx, row: RunRow, to_version: str) -> Mapping[Any, Any] | None:
        ts = self.resources.clock.now_ms()
        run_id, waited = row.id, row.parked_from == Status.WAITING.value
        if not to_version:
            error = {
                "type": "VERSION_UNAVAILABLE",
                "message": f"failed by an operator: no executor runs version {row.worker_version}",
                "stack_trace": "",
            }
            done = await tx.transition(
                run_id,
                [Status.PENDING_VERSION],
                Status.FAILED,
                "failed",
                error=orjson.dumps(error).decode(),
                parked_from=None,
                current_attempt_id=None,
                finished_at=ts,
                updated_at=ts,
            )
            if done is not None:
                tx.after_commit.append(lambda: self._given_up(run_id))
        elif waited:
            done = await tx.transition(
                run_id,
                [Status.PENDING_VERSION],
                Status.WAITING,
                "resuming",
                worker_version=to_version,
                parked_from=None,
                updated_at=ts,
            )
            if done is not None:
                m = done._mapping
                tx.after_commit.append(lambda: self.waitpoints.migrated(m))
        else:
            done = await tx.transition(
                run_id,
                [Status.PENDING_VERSION],
                Status.QUEUED,
                "queued",
                worker_version=to_version,
                parked_from=None,
                queued_at=ts,
                updated_at=ts,
            )
            if done is not None:
                m = done._mapping
                tx.after_commit.append(lambda: self._requeued(m, ts))
        if done is None:
            return None
        log.warning(
            "run %s %s by an operator (was locked to version %s)",
            run_id,
            f"moved to version {to_version}" if to_version else "failed",
            row.worker_version,
        )
        return done._mapping

    def _given_up(self, run_id: str) -> None:
        unlist(self.triggering.pending_version, run_id)
        unlist(self.waitpoints.parked, run_id)
        self.waitpoints.cancelled(run_id)

    def _requeued(self, m: Mapping[Any, Any], ts: int) -> None:
        unlist(self.triggering.pending_version, m["id"])
        self.resources.enqueue(m, ts)

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
