"""The run engine's front: it builds the systems around one :class:`EngineResources`, starts
and stops their loops, and routes each call and each executor message to the system that owns
it. It holds no run logic of its own.

Every change of a run is one state-machine transition committed with its outbox event through
the group-commit writer; the in-memory :class:`DispatchIndex` is updated only after the commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from runplane_common.config import SchedulerSettings
from runplane_scheduler.dispatch import DispatchIndex, ExecutorState
from runplane_scheduler.engine.attempts import Attempts
from runplane_scheduler.engine.clock import Clock, SystemClock
from runplane_scheduler.engine.dequeue import Dequeue
from runplane_scheduler.engine.executors import Executors
from runplane_scheduler.engine.resources import Background, EngineResources
from runplane_scheduler.engine.runs import Runs
from runplane_scheduler.engine.timers import TimerKind, Timers
from runplane_scheduler.engine.triggering import Triggering
from runplane_scheduler.engine.versions import SyncHook, Versions, WorkerVersion
from runplane_scheduler.engine.waitpoints import Waitpoints
from runplane_scheduler.specs import TaskDef, TriggerSpec, TxGuard
from runplane_scheduler.states import Status
from runplane_scheduler.store import RunRow, Store
from runplane_scheduler.store import runs as stored_runs
from runplane_scheduler.worker_messages import (
    Ack,
    AttemptResult,
    Heartbeat,
    LogBatch,
    MetadataUpdate,
    Registration,
    Started,
    ToExecutor,
    WaitRequest,
    WorkerReport,
)

log = logging.getLogger("runplane.scheduler")


class RunEngine:
    def __init__(
        self, store: Store, settings: SchedulerSettings, clock: Clock | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        clock = clock or SystemClock()
        self.resources = EngineResources(
            store=store,
            settings=settings,
            index=DispatchIndex(settings.environment_concurrency_limit, clock.monotonic),
            background=Background(store),
            clock=clock,
        )
        self.index = self.resources.index
        self.task_defs: dict[tuple[str, str], TaskDef] = self.resources.task_defs
        self.timers = Timers(self.resources)
        self.attempts = Attempts(self.resources, self.timers)
        self.triggering = Triggering(self.resources, self.timers, self.attempts)
        self.waits = Waitpoints(self.resources, self.timers, self.attempts, self.triggering)
        self.dequeue = Dequeue(self.resources, self.attempts, self.waits, self.triggering)
        self.versions = Versions(self.resources, self.triggering, self.waits)
        self.executors = Executors(self.resources, self.triggering, self.waits, self.versions)
        self.runs = Runs(self.resources, self.timers, self.triggering, self.waits)
        self.timers.route(
            {
                TimerKind.RETRY: self.attempts.retry_due,
                TimerKind.DELAY: self.triggering.delay_due,
                TimerKind.TTL: self.triggering.ttl_due,
                TimerKind.WAITPOINT: self.waits.timer_due,
            }
        )
        store.writer.on_final = self.waits.run_finished

    @property
    def on_register(self) -> SyncHook | None:
        """Called when a manifest becomes (or stays) current, by a registration or a promotion
        (environment, registration, executor id): syncs the declarative schedules; raises,
        before anything is stored, on a bad one."""
        return self.versions.on_sync

    @on_register.setter
    def on_register(self, hook: SyncHook | None) -> None:
        self.versions.on_sync = hook

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.executors.load()
        now = self.resources.clock.monotonic()
        for row in await self.store.load_active_runs():
            m = row._mapping
            status = Status(m["status"])
            key = (m["environment_id"], m["queue"], m["concurrency_key"])
            if status is Status.QUEUED:
                self.index.push(
                    key, m["id"], m["task_id"], m["queued_at"], m["priority"], m["worker_version"]
                )
            elif status is Status.PENDING_VERSION and m["parked_from"] == Status.WAITING.value:
                self.waits.restore_parked(m)
            elif status is Status.PENDING_VERSION:
                self.triggering.restore_parked(
                    m["environment_id"], m["task_id"], m["worker_version"], m["id"]
                )
            elif m["current_attempt_id"]:
                self.attempts.adopt(m, now)
        await self.waits.load()
        await self.timers.load()
        self.store.writer.start()
        background = self.resources.background
        background.run_loop(self.dequeue.loop(), "dispatch")
        background.run_loop(self.timers.loop(), "timers")
        background.run_loop(self.attempts.lease_loop(), "leases")
        background.run_loop(background.reports_loop(), "reports")
        self.resources.dispatch_wake.set()

    async def stop(self) -> None:
        await self.resources.background.stop()
        await self.store.writer.stop()

    # -- the API ---------------------------------------------------------------------------------

    async def trigger(
        self, environment_id: str, spec: TriggerSpec, guard: TxGuard | None = None
    ) -> tuple[Mapping[Any, Any], bool]:
        return await self.triggering.trigger(environment_id, spec, guard)

    async def batch_trigger(
        self, environment_id: str, specs: list[TriggerSpec], idempotency_key: str = ""
    ) -> tuple[str, list[Mapping[Any, Any]], list[bool]]:
        return await self.triggering.batch_trigger(environment_id, specs, idempotency_key)

    async def reset_idempotency_key(self, environment_id: str, task_id: str, key: str) -> int:
        return await self.triggering.reset_idempotency_key(environment_id, task_id, key)

    async def cancel(self, environment_id: str, run_id: str) -> RunRow:
        return await self.runs.cancel(environment_id, run_id)

    async def replay(self, environment_id: str, run_id: str) -> Mapping[Any, Any]:
        return await self.runs.replay(environment_id, run_id)

    async def reschedule(self, environment_id: str, run_id: str, delay_until: int) -> RunRow:
        return await self.runs.reschedule(environment_id, run_id, delay_until)

    async def update_metadata(self, environment_id: str, run_id: str, metadata: str) -> RunRow:
        return await self.runs.update_metadata(environment_id, run_id, metadata)

    async def add_tags(self, environment_id: str, run_id: str, tags: list[str]) -> RunRow:
        return await self.runs.add_tags(environment_id, run_id, tags)

    async def list_logs(
        self, environment_id: str, run_id: str, after_id: str | None, limit: int
    ) -> list[RunRow]:
        return await self.runs.list_logs(environment_id, run_id, after_id, limit)

    async def timeline(
        self, environment_id: str, run_id: str, log_limit: int
    ) -> stored_runs.TimelineRows:
        return await self.runs.timeline(environment_id, run_id, log_limit)

    async def update_queue(self, environment_id: str, queue: str, **values: Any) -> RunRow:
        return await self.executors.update_queue(environment_id, queue, **values)

    async def list_versions(self, environment_id: str) -> list[dict[str, Any]]:
        return await self.versions.listing(environment_id)

    async def promote_version(self, environment_id: str, version: str) -> WorkerVersion:
        return await self.versions.promote(environment_id, version)

    async def rollback_version(self, environment_id: str) -> WorkerVersion:
        return await self.versions.rollback(environment_id)

    async def migrate_runs(
        self, environment_id: str, run_ids: list[str], from_version: str, to_version: str
    ) -> tuple[list[str], list[str]]:
        return await self.runs.migrate(environment_id, run_ids, from_version, to_version)

    # -- the worker plane ------------------------------------------------------------------------

    async def register_executor(
        self,
        environment_id: str,
        register: Registration,
        outbox: asyncio.Queue[ToExecutor],
    ) -> ExecutorState:
        return await self.executors.register(environment_id, register, outbox)

    def executor_disconnected(self, ex: ExecutorState) -> None:
        self.executors.disconnected(ex)

    def holds(self, ex: ExecutorState, attempt_id: str) -> bool:
        return self.executors.holds(ex, attempt_id)

    def on_message(self, ex: ExecutorState, report: WorkerReport | None) -> None:
        """A message from ``ex`` after its registration; None: one the engine does not act on
        (it still shows the executor is alive). A report about an attempt is accepted only
        from the connection holding the attempt."""
        ex.last_seen = self.resources.clock.monotonic()
        if report is None:
            return
        if isinstance(report, Heartbeat):
            self.executors.heartbeat(ex, report.draining)
            return
        if not isinstance(report, LogBatch) and not self.holds(ex, report.attempt_id):
            self._refuse(ex, report.kind, report.attempt_id)
            return
        if isinstance(report, Ack):
            self.attempts.ack(report.attempt_id)
        elif isinstance(report, Started):
            self.attempts.started(report.attempt_id, report.started_at)
        elif isinstance(report, AttemptResult):
            if not self.attempts.result(report):
                # Stale (the run was cancelled or its lease lapsed), or a WAITING run's attempt.
                self.waits.attempt_ended(report.attempt_id)
        elif isinstance(report, MetadataUpdate):
            self.runs.metadata_from_attempt(ex, report)
        elif isinstance(report, LogBatch):
            self.runs.store_logs(ex, report)
        elif isinstance(report, WaitRequest):
            self.waits.on_wait(ex, report)

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
