"""Versions: every worker version an executor registered, which version is current for each
task, promotion and rollback, and the version a new run is locked to.

A version is a manifest (task definitions and declarative schedules) registered under a name:
the executor's ``--version``, else a hash of its definitions and its task modules' code. Its
definitions never change: a registration of a known version with another manifest is refused,
naming the first task that differs. Promoting a version makes it current for each task it
defines, in one transaction: new runs of those tasks lock to it, and the environment's queues
and declarative schedules follow its manifest. With ``version_promotion = "auto"`` a version
registering for the first time is promoted at once (``runplane dev``, and a deploy that is just
"start the new executors"); with ``"manual"`` only ``runplane deploy`` / ``versions promote``
promote. A run keeps its version for life: only executors of that version run its attempts,
resumes and replays (:class:`~runplane_scheduler.dispatch.DispatchIndex` matches them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from runplane_common.errors import FailedPrecondition, NotFound
from runplane_scheduler.engine.resources import EngineResources
from runplane_scheduler.engine.triggering import Triggering
from runplane_scheduler.engine.waitpoints import Waitpoints
from runplane_scheduler.specs import TaskDef
from runplane_scheduler.store import Store, Tx
from runplane_scheduler.store import queues as stored_queues
from runplane_scheduler.store import versions as stored
from runplane_scheduler.worker_messages import (
    ManifestTask,
    Registration,
    manifest_from_json,
    manifest_to_json,
)

log = logging.getLogger("runplane.scheduler.versions")

# Syncs the environment's declarative schedules with a manifest that becomes current
# (environment, registration, executor id); raises, before anything is stored, on a bad one.
SyncHook = Callable[[str, Registration, str], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class WorkerVersion:
    environment_id: str
    version: str
    tasks: Mapping[str, ManifestTask]
    created_at: int

    @property
    def manifest(self) -> tuple[ManifestTask, ...]:
        return tuple(self.tasks.values())


def difference(old: Mapping[str, ManifestTask], new: Mapping[str, ManifestTask]) -> str:
    """What differs between two manifests of one version, naming the first task ('' if none)."""
    for task_id in sorted(old.keys() | new.keys()):
        if task_id not in new:
            return f"task {task_id!r} is missing from the new manifest"
        if task_id not in old:
            return f"task {task_id!r} is not in the registered manifest"
        if old[task_id] != new[task_id]:
            a, b = old[task_id], new[task_id]
            fields = [
                name
                for name in TaskDef.__dataclass_fields__
                if getattr(a.definition, name) != getattr(b.definition, name)
            ]
            if a.cron != b.cron or a.timezone != b.timezone:
                fields.append("schedule")
            return f"task {task_id!r} differs in {', '.join(fields) or 'its definition'}"
    return ""


def task_definition_row(environment_id: str, version: str, d: TaskDef, ts: int) -> dict[str, Any]:
    return {
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
        "version": version,
    }


class Versions:
    def __init__(
        self, resources: EngineResources, triggering: Triggering, waitpoints: Waitpoints
    ) -> None:
        self.resources = resources
        self.triggering = triggering
        self.waitpoints = waitpoints
        self.known: dict[tuple[str, str], WorkerVersion] = {}
        self.on_sync: SyncHook | None = None
        # Applies a promoted version's queue limits to the dispatch index (set by Executors).
        self.apply_queue_limit: Callable[[str, TaskDef], None] = lambda env, d: None

    @property
    def current(self) -> dict[tuple[str, str], str]:
        return self.resources.current_versions

    @property
    def auto(self) -> bool:
        return self.resources.settings.version_promotion != "manual"

    async def load(self) -> None:
        for row in await stored.load_all(self.resources.store.db):
            m = row._mapping
            manifest = manifest_from_json(m["manifest"])
            self._remember(m["environment_id"], m["version"], manifest, m["created_at"])

    def _remember(
        self, environment_id: str, version: str, manifest: tuple[ManifestTask, ...], ts: int
    ) -> WorkerVersion:
        wv = WorkerVersion(environment_id, version, {t.definition.task_id: t for t in manifest}, ts)
        self.known[(environment_id, version)] = wv
        self.resources.version_defs[(environment_id, version)] = {
            task_id: t.definition for task_id, t in wv.tasks.items()
        }
        return wv

    # -- registration ------------------------------------------------------------------------------

    def admit(self, environment_id: str, register: Registration) -> bool:
        """Check a registration's manifest against its version's (refused, naming the task
        that differs, when it is another one). True when the registration makes or keeps its
        version current: a new version under auto promotion, or the current one."""
        wv = self.known.get((environment_id, register.version))
        if wv is None:
            return self.auto
        new = {t.definition.task_id: t for t in register.manifest}
        if diff := difference(wv.tasks, new):
            raise FailedPrecondition(
                f"version {register.version!r} is already registered with another manifest: "
                f"{diff}. An executor with different task code must register a new version "
                "(change --version, or leave it unset for a content hash)"
            )
        return bool(new) and all(
            self.current.get((environment_id, task_id)) == register.version for task_id in new
        )

    async def register(self, environment_id: str, register: Registration, promote: bool) -> None:
        """Store a version the first time it registers (promoting it if ``promote``)."""
        version, manifest = register.version, register.manifest
        if (environment_id, version) in self.known:
            return
        ts = self.resources.clock.now_ms()

        async def op(tx: Tx) -> tuple[ManifestTask, ...]:
            row = await stored.find(tx, environment_id, version)
            if row is not None:  # registered meanwhile (by another connection)
                stored_manifest = manifest_from_json(row.manifest)
                old = {t.definition.task_id: t for t in stored_manifest}
                if diff := difference(old, {t.definition.task_id: t for t in manifest}):
                    raise FailedPrecondition(
                        f"version {version!r} is already registered with another manifest: {diff}"
                    )
                return stored_manifest
            await stored.add(tx, environment_id, version, manifest_to_json(manifest), ts)
            if promote:
                await self._promote_in(tx, environment_id, version, manifest, ts)
            return manifest

        made = await self.resources.store.writer.run(op)
        self._remember(environment_id, version, made, ts)
        if promote and made is manifest:
            self._promoted(environment_id, version, manifest)
            log.info("version %s registered and promoted in %s", version, environment_id)
        else:
            log.info("version %s registered in %s", version, environment_id)

    # -- promotion ---------------------------------------------------------------------------------

    async def promote(self, environment_id: str, version: str) -> WorkerVersion:
        """Make ``version`` current for every task it defines, atomically, and sync the
        declarative schedules to its manifest."""
        wv = self.known.get((environment_id, version))
        if wv is None:
            raise NotFound(f"version {version[:64]!r} is not registered")
        if self.on_sync is not None:
            await self.on_sync(
                environment_id,
                Registration(executor_id="", capacity=0, manifest=wv.manifest, version=version),
                "",
            )
        ts = self.resources.clock.now_ms()

        async def op(tx: Tx) -> None:
            await self._promote_in(tx, environment_id, version, wv.manifest, ts)

        await self.resources.store.writer.run(op)
        self._promoted(environment_id, version, wv.manifest)
        log.info("version %s promoted in %s", version, environment_id)
        return wv

    async def rollback(self, environment_id: str) -> WorkerVersion:
        """Undo the latest promotion: the version promoted before it becomes current again."""

        async def op(tx: Tx) -> str:
            promoted = await stored.promoted(tx, environment_id)
            if len(promoted) < 2:
                raise FailedPrecondition(
                    "nothing to roll back to: fewer than two versions were promoted"
                    if promoted
                    else "no version was promoted yet"
                )
            await stored.mark_rolled_back(tx, environment_id, promoted[0].version)
            return str(promoted[1].version)

        previous = await self.resources.store.writer.run(op)
        log.info("rolled back in %s: version %s becomes current again", environment_id, previous)
        return await self.promote(environment_id, previous)

    async def _promote_in(
        self,
        tx: Tx,
        environment_id: str,
        version: str,
        manifest: tuple[ManifestTask, ...],
        ts: int,
    ) -> None:
        defs = [t.definition for t in manifest]
        await stored.mark_promoted(tx, environment_id, version, ts)
        await Store.upsert_task_definitions(
            tx, environment_id, [task_definition_row(environment_id, version, d, ts) for d in defs]
        )
        declared = {d.queue: d.queue_concurrency_limit for d in defs}
        await stored_queues.declare(tx, environment_id, declared, ts)

    def _promoted(
        self, environment_id: str, version: str, manifest: tuple[ManifestTask, ...]
    ) -> None:
        """After the commit: new runs of its tasks lock to it; runs that waited for a version of
        them (or for this one) go on."""
        task_ids = []
        for t in manifest:
            d = t.definition
            self.current[(environment_id, d.task_id)] = version
            self.resources.task_defs[(environment_id, d.task_id)] = d
            self.apply_queue_limit(environment_id, d)
            task_ids.append(d.task_id)
        self.triggering.provided(environment_id, task_ids)
        self.waitpoints.provided(environment_id, task_ids)
        self.resources.dispatch_wake.set()

    # -- reading -----------------------------------------------------------------------------------

    async def listing(self, environment_id: str) -> list[dict[str, Any]]:
        """The environment's versions, newest first: tasks, which tasks it is current for, how
        many connected executors run it, and how many unfinished runs are locked to it."""
        rows = await stored.listing(self.resources.store.db, environment_id)
        executors: dict[str, int] = {}
        for ex in self.resources.index.executors.values():
            if ex.connected and ex.environment_id == environment_id:
                executors[ex.version] = executors.get(ex.version, 0) + 1
        out = []
        for m in rows:
            wv = self.known.get((environment_id, m["version"]))
            tasks = sorted(wv.tasks) if wv else []
            out.append(
                {
                    **m,
                    "tasks": tasks,
                    "current_for": [
                        t for t in tasks if self.current.get((environment_id, t)) == m["version"]
                    ],
                    "executors": executors.get(m["version"], 0),
                }
            )
        return out
