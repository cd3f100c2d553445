"""What every engine system shares: :class:`EngineResources` (the store, the dispatch index,
the settings, the registered task definitions, the dispatch wake-up) and :class:`Background`,
which owns every task the engine starts and the ordered queue of writes nobody waits for."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from runplane_common.config import SchedulerSettings
from runplane_scheduler.dispatch import DispatchIndex
from runplane_scheduler.engine.clock import Clock, SystemClock
from runplane_scheduler.specs import TaskDef
from runplane_scheduler.states import Status
from runplane_scheduler.store import CLEAN_ERRORS, RunRow, Store, Tx

log = logging.getLogger("runplane.scheduler")

Op = Callable[[Tx], Coroutine[Any, Any, Any]]


@dataclass(frozen=True)
class Coalesce:
    """A background write that joins the ones like it submitted right before it (nothing else
    in between, so the order of writes stays as submitted): ``apply`` writes them all in one
    go (one statement for many runs, ``store/hot.py``)."""

    apply: Callable[[Tx, list[Any]], Coroutine[Any, Any, None]]
    item: Any


def _coalesced(entries: list[Op | Coalesce]) -> list[tuple[Op, list[Op | Coalesce]]]:
    """The writes to submit, each with the entries it carries (runs of like Coalesce entries
    become one write)."""
    out: list[tuple[Op, list[Op | Coalesce]]] = []
    for entry in entries:
        if isinstance(entry, Coalesce):
            last = out[-1][1] if out else None
            if last and isinstance(last[0], Coalesce) and last[0].apply == entry.apply:
                last.append(entry)
                continue
            group: list[Op | Coalesce] = [entry]
            apply = entry.apply
            out.append((_apply_group(apply, group), group))
        else:
            out.append((entry, [entry]))
    return out


def _apply_group(
    apply: Callable[[Tx, list[Any]], Coroutine[Any, Any, None]], group: list[Op | Coalesce]
) -> Op:
    def op(tx: Tx) -> Coroutine[Any, Any, None]:
        return apply(tx, [e.item for e in group if isinstance(e, Coalesce)])

    return op


class Background:
    """The engine's background tasks: its loops, fire-and-forget work, and the report queue.

    Every task it starts is cancelled by :meth:`stop`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.loops: list[asyncio.Task[None]] = []
        self.spawned: set[asyncio.Task[Any]] = set()
        self.reports: deque[Op | Coalesce] = deque()
        self.reports_wake = asyncio.Event()

    def run_loop(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.loops.append(asyncio.create_task(coro, name=name))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self.spawned.add(task)
        task.add_done_callback(self.spawned.discard)

    def submit(self, op: Op | Coalesce) -> None:
        """Queue a write nobody waits for (executor reports, lapsed leases). Such writes are
        applied in submission order and retried until the database takes them, so a report
        that arrives while the database is down is not lost."""
        self.reports.append(op)
        self.reports_wake.set()

    async def reports_loop(self) -> None:
        backoff = 0.2
        while True:
            await self.reports_wake.wait()
            self.reports_wake.clear()
            groups = _coalesced(list(self.reports))
            self.reports.clear()
            # Submitted together, so they share commits; the writer keeps their order.
            results = await asyncio.gather(
                *(self.store.writer.submit(op) for op, _ in groups), return_exceptions=True
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
            self.reports.extendleft(reversed([e for _, g in groups[failed:] for e in g]))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            self.reports_wake.set()

    async def stop(self) -> None:
        tasks = [*self.loops, *self.spawned]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class EngineResources:
    """Shared by every engine system: the store, the settings, the dispatch index, the
    background tasks, the clock, the task definitions and the dispatch wake-up. The systems
    get their siblings through their constructors, never through the engine front."""

    store: Store
    settings: SchedulerSettings
    index: DispatchIndex
    background: Background
    clock: Clock = field(default_factory=SystemClock)
    # Registered task definitions by (environment id, task id).
    task_defs: dict[tuple[str, str], TaskDef] = field(default_factory=dict)
    # The current worker version of each task, by (environment id, task id).
    current_versions: dict[tuple[str, str], str] = field(default_factory=dict)
    # Every registered version's task definitions, by (environment id, version).
    version_defs: dict[tuple[str, str], Mapping[str, TaskDef]] = field(default_factory=dict)
    # Set when a slot, a run or an executor may have become available for dispatch.
    dispatch_wake: asyncio.Event = field(default_factory=asyncio.Event)

    def lock_version(
        self, environment_id: str, task_id: str, explicit: str = "", parent: str = ""
    ) -> str:
        """The version a new run of ``task_id`` locks to: the one asked for, else its parent's
        when that version defines the task, else the task's current version ('' if none yet:
        the run waits in PENDING_VERSION and locks when a version of the task is promoted)."""
        if explicit:
            return explicit
        if parent and task_id in self.version_defs.get((environment_id, parent), {}):
            return parent
        return self.current_versions.get((environment_id, task_id), "")

    def definition(self, environment_id: str, task_id: str, version: str = "") -> TaskDef | None:
        """The task's definition in ``version`` (the current one for '' or an unknown one)."""
        if version:
            d = self.version_defs.get((environment_id, version), {}).get(task_id)
            if d is not None:
                return d
        return self.task_defs.get((environment_id, task_id))

    def enqueue(self, m: Mapping[Any, Any], queued_at: int) -> None:
        """A QUEUED run (committed) joins its queue in the index."""
        key = (m["environment_id"], m["queue"], m["concurrency_key"])
        self.index.push(
            key, m["id"], m["task_id"], queued_at, m["priority"], m.get("worker_version") or ""
        )
        self.dispatch_wake.set()

    async def park(self, run_id: str, parked_from: Status) -> RunRow | None:
        """The run (in ``parked_from``) waits in PENDING_VERSION for an executor of its version;
        None when it was no longer in ``parked_from``."""

        async def op(tx: Tx) -> RunRow | None:
            return await tx.transition(
                run_id,
                [parked_from],
                Status.PENDING_VERSION,
                "pending_version",
                parked_from=parked_from.value,
                updated_at=self.clock.now_ms(),
            )

        return await self.store.writer.run(op)

    def release(self, attempt_id: str) -> None:
        """Free the attempt's slot; the next queued run may take it."""
        self.index.release(attempt_id)
        self.dispatch_wake.set()


def unlist(lists: dict[Any, list[str]], run_id: str) -> None:
    """Take ``run_id`` out of whichever of ``lists`` holds it (parked runs by version)."""
    for key, ids in list(lists.items()):
        if run_id in ids:
            ids.remove(run_id)
            if not ids:
                del lists[key]
            return
