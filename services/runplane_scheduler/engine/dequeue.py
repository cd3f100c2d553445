"""Dequeue: the dispatch loop. It takes runs off the index fairly across queues, with their
slots reserved on an executor, and either dequeues them (QUEUED -> DEQUEUED with a new attempt,
leased by :class:`~runplane_scheduler.engine.attempts.Attempts`) or, for WAITING runs whose waits
completed, hands them to :class:`~runplane_scheduler.engine.waitpoints.Waitpoints` to resume.

It is its own system (as in Trigger.dev's ``dequeueSystem``) because it routes to both
attempts and waitpoints, and waitpoints build on attempts."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from runplane_common.ids import random_id
from runplane_scheduler.dispatch import ExecutorState, QueueKey
from runplane_scheduler.engine.attempts import Attempts, attempt_row
from runplane_scheduler.engine.resources import EngineResources
from runplane_scheduler.engine.triggering import Triggering
from runplane_scheduler.engine.waitpoints import Waitpoints
from runplane_scheduler.store import Store, Tx, hot
from runplane_scheduler.store.hot import Dequeued

log = logging.getLogger("runplane.scheduler")


class Dequeue:
    def __init__(
        self,
        resources: EngineResources,
        attempts: Attempts,
        waitpoints: Waitpoints,
        triggering: Triggering,
    ) -> None:
        self.resources = resources
        self.attempts = attempts
        self.waitpoints = waitpoints
        self.triggering = triggering
        current = resources.current_versions
        # A queued run of a version no executor runs any more, which is not its task's current
        # version (a deploy replaced it), waits in PENDING_VERSION instead of at the head of its
        # queue, where it would hold back the runs of the current version behind it. A run of
        # the current version stays queued through a restart of its executors.
        resources.index.strands = lambda env, task_id, version: (
            current.get((env, task_id), "") != version
        )

    async def loop(self) -> None:
        index, wake, spawn = (
            self.resources.index,
            self.resources.dispatch_wake,
            self.resources.background.spawn,
        )
        while True:
            wake_at = index.next_wake()
            timeout = (
                None if wake_at is None else max(0.0, wake_at - self.resources.clock.monotonic())
            )
            await self.resources.clock.wait(wake, timeout)
            wake.clear()
            picked = index.take()
            stranded, index.stranded = index.stranded, []
            for queued, key in stranded:
                if queued.run_id in self.waitpoints.resuming:
                    self.waitpoints.strand(queued.run_id, key[0], queued.task_id, queued.version)
                else:
                    spawn(self.triggering.strand(queued, key))
            fresh: list[tuple[str, QueueKey, ExecutorState]] = []
            for queued, key, ex in picked:
                if queued.run_id in self.waitpoints.resuming:
                    spawn(self.waitpoints.resume(queued.run_id, key, ex))
                else:
                    fresh.append((queued.run_id, key, ex))
            if fresh:
                spawn(self.dequeue(fresh))

    async def dequeue(self, picked: list[tuple[str, QueueKey, ExecutorState]]) -> None:
        """QUEUED -> DEQUEUED with a new attempt for each picked run, in one write, then lease
        each attempt to its executor; a run that was not QUEUED any more gives its slot back."""
        items = [Dequeued(run_id, random_id("attempt"), ex.executor_id) for run_id, _, ex in picked]

        async def op(tx: Tx) -> dict[str, Mapping[str, Any]]:
            ts = self.resources.clock.now_ms()
            moved = await hot.dequeue_many(tx, items, ts)
            for item, (run_id, _, ex) in zip(items, picked, strict=True):
                row = moved.get(run_id)
                if row is not None:
                    number = row["attempt_count"] + 1
                    await Store.insert_attempt(
                        tx, attempt_row(item.attempt_id, run_id, number, ex, ts)
                    )
            return moved

        try:
            moved = await self.resources.store.writer.run(op)
        except Exception:
            log.exception("dequeue of %d runs failed", len(picked))
            moved = {}
        for item, (run_id, key, ex) in zip(items, picked, strict=True):
            row = moved.get(run_id)
            if row is None:
                self.resources.index.unreserve(run_id, key, ex)
                self.resources.dispatch_wake.set()
            else:
                self.attempts.assign(row, item.attempt_id, key, ex)
