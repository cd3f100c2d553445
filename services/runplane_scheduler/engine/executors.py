"""Executors: registration (its task definitions and the queues they declare), the one live
connection per executor id (its session token), heartbeats, disconnects, which connection
holds an attempt, and queue settings (limits, overrides, pauses)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from dataclasses import replace
from typing import Any

import orjson

from runplane_common.errors import AlreadyExists
from runplane_common.ids import new_id
from runplane_scheduler.dispatch import ExecutorState
from runplane_scheduler.engine.resources import EngineResources
from runplane_scheduler.engine.triggering import Triggering
from runplane_scheduler.engine.versions import Versions
from runplane_scheduler.engine.waitpoints import Waitpoints
from runplane_scheduler.retry import RetryPolicy
from runplane_scheduler.specs import TaskDef
from runplane_scheduler.store import RunRow, Tx
from runplane_scheduler.store import queues as stored_queues
from runplane_scheduler.worker_messages import Registration, ToExecutor, definitions_version

log = logging.getLogger("runplane.scheduler")


class Executors:
    def __init__(
        self,
        resources: EngineResources,
        triggering: Triggering,
        waitpoints: Waitpoints,
        versions: Versions,
    ) -> None:
        self.resources = resources
        self.triggering = triggering
        self.waitpoints = waitpoints
        self.versions = versions
        versions.apply_queue_limit = self.apply_queue_limit

    async def load(self) -> None:
        """After a restart: the current task definitions (with their versions), the registered
        versions, and the queues' settings."""
        task_defs = self.resources.task_defs
        for row in await self.resources.store.load_task_definitions():
            m = row._mapping
            task_defs[(m["environment_id"], m["task_id"])] = TaskDef(
                task_id=m["task_id"],
                queue=m["queue"],
                queue_concurrency_limit=m["queue_concurrency_limit"],
                retry=RetryPolicy.from_dict(orjson.loads(m["retry"])),
                max_duration=m["max_duration"],
                machine=m["machine"],
                ttl_ms=m["ttl_ms"],
                payload_schema=m["payload_schema"],
            )
            if m["version"]:
                self.resources.current_versions[(m["environment_id"], m["task_id"])] = m["version"]
        await self.versions.load()
        for (env, task_id), version in self.resources.current_versions.items():
            # The current version's full definition (rate limits too), where it is known.
            if (d := self.resources.definition(env, task_id, version)) is not None:
                task_defs[(env, task_id)] = d
        for td_key, td in task_defs.items():
            self.apply_queue_limit(td_key[0], td)
        for row in await self.resources.store.load_queues():
            self.apply_queue_row(row)

    async def register(
        self,
        environment_id: str,
        register: Registration,
        outbox: asyncio.Queue[ToExecutor],
    ) -> ExecutorState:
        """Register an executor of a worker version. A new version is stored (and promoted
        under auto promotion); a known one must bring the same manifest. The executor runs only
        runs locked to its version."""
        index = self.resources.index
        executor_id = register.executor_id or new_id("exec")
        if not register.version:
            register = replace(register, version=definitions_version(register.manifest))
        # Before anything of the registration is stored: a refused one changes nothing.
        self.check_executor_id(environment_id, executor_id, register.session_token)
        current = self.versions.admit(environment_id, register)
        if current and self.versions.on_sync is not None:
            await self.versions.on_sync(environment_id, register, executor_id)
        await self.versions.register(environment_id, register, promote=current)
        defs = [t.definition for t in register.manifest]
        # Checked again: another registration of this id may have finished while this one
        # wrote its version.
        self.check_executor_id(environment_id, executor_id, register.session_token)
        old = index.executors.get(executor_id)
        ex = ExecutorState(
            executor_id=executor_id,
            environment_id=environment_id,
            tasks=frozenset(d.task_id for d in defs),
            capacity=max(1, register.capacity),
            outbox=outbox,
            last_seen=self.resources.clock.monotonic(),
            session_token=secrets.token_urlsafe(24),
            version=register.version,
        )
        claimed = set(register.running_attempt_ids)
        if old is not None:
            old.connected = False
        for attempt_id, lease in index.leases.items():
            if (
                lease.executor_id == executor_id
                and lease.queue[0] == environment_id
                and attempt_id in claimed
            ):
                ex.attempts.add(attempt_id)
                lease.acked = True
        index.executors[executor_id] = ex
        self.waitpoints.registered(ex, claimed)
        log.info(
            "executor %s connected: version %s, %d tasks, capacity %d",
            executor_id,
            register.version or "-",
            len(defs),
            ex.capacity,
        )
        task_ids = [d.task_id for d in defs]
        self.triggering.provided(environment_id, task_ids)
        self.waitpoints.provided(environment_id, task_ids)
        self.resources.dispatch_wake.set()
        return ex

    def check_executor_id(self, environment_id: str, executor_id: str, session_token: str) -> None:
        """An executor id belongs to one environment and one connection at a time: while the
        scheduler knows the id, only the holder of its session token may register it again (a
        reconnect); an id whose leases or waiting attempts are another environment's is
        refused. ALREADY_EXISTS either way, the same for both, naming no environment."""
        index = self.resources.index
        refused = AlreadyExists(
            f"executor id {executor_id} is registered to another connection; an executor "
            "reconnects with the session_token it was given, a new executor uses a new id"
        )
        old = index.executors.get(executor_id)
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
            for lease in index.leases.values()
        ) or self.waitpoints.held_in_other_environment(executor_id, environment_id):
            log.warning(
                "registration of executor id %s refused: its attempts are another environment's",
                executor_id,
            )
            raise refused

    def holds(self, ex: ExecutorState, attempt_id: str) -> bool:
        """``ex`` is the live connection that holds the attempt: its current lease, or its
        suspended waiting attempt. Every report about an attempt must come from its holder."""
        index = self.resources.index
        if index.executors.get(ex.executor_id) is not ex:
            return False  # a connection replaced by a reconnect
        lease = index.leases.get(attempt_id)
        if lease is not None:
            return lease.executor_id == ex.executor_id and lease.queue[0] == ex.environment_id
        return self.waitpoints.held_by(attempt_id, ex)

    def heartbeat(self, ex: ExecutorState, draining: bool) -> None:
        if ex.draining != draining:
            ex.draining = draining
            self.resources.dispatch_wake.set()

    def disconnected(self, ex: ExecutorState) -> None:
        """The stream ended; its leases stand until they lapse (it may reconnect and claim them)."""
        if self.resources.index.executors.get(ex.executor_id) is ex:
            ex.connected = False
            log.info("executor %s disconnected", ex.executor_id)
            # Queued runs of its version may now leave their queues (PENDING_VERSION).
            self.resources.dispatch_wake.set()

    # -- queues ----------------------------------------------------------------------------------

    async def update_queue(self, environment_id: str, queue: str, **values: Any) -> RunRow:
        """Change a queue's pause flag or limit override; dispatch follows after the commit."""

        async def op(tx: Tx) -> RunRow:
            row = await stored_queues.change(
                tx, environment_id, queue, self.resources.clock.now_ms(), **values
            )
            tx.after_commit.append(lambda: self.apply_queue_row(row))
            return row

        return await self.resources.store.writer.run(op)

    def apply_queue_row(self, row: RunRow) -> None:
        m = row._mapping
        config = self.resources.index.config((m["environment_id"], m["name"]))
        config.limit = m["concurrency_limit"]
        config.override = m["limit_override"]
        config.paused = m["paused"]
        self.resources.dispatch_wake.set()

    def apply_queue_limit(self, environment_id: str, d: TaskDef) -> None:
        name = (environment_id, d.queue)
        config = self.resources.index.config(name)
        config.limit = d.queue_concurrency_limit
        config.total_limit = d.queue_total_limit
        self.resources.index.set_rate_limit(name, d.queue_rate_limit, d.queue_rate_period)
