"""The one timer mechanism: durable timers (a row each, due time, kind, target) and the
near-horizon heap that fires them. A restart reloads the heap from the database, so no timer
is lost; a timer fires in the transaction that deletes its row, so it fires once."""

from __future__ import annotations

import asyncio
import enum
import heapq
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from runplane_common.ids import new_id
from runplane_scheduler.engine.resources import EngineResources
from runplane_scheduler.store import Store, Tx

log = logging.getLogger("runplane.scheduler")


class TimerKind(enum.StrEnum):
    """What a timer does when it fires (stored as its value)."""

    RETRY = "retry"  # a retry's back-off ended
    DELAY = "delay"  # a DELAYED run's time came
    TTL = "ttl"  # a queued run not started within its TTL expires
    WAITPOINT = "waitpoint"  # a duration wait ended, or a token timed out


# Fires a timer of one kind: (transaction, target, now in ms).
TimerHandler = Callable[[Tx, str, int], Coroutine[Any, Any, None]]


@dataclass(order=True)
class Timer:
    due_at: int
    timer_id: str
    kind: TimerKind = field(compare=False)
    target: str = field(compare=False)


class Timers:
    """The heap of timers and the loop that fires them through one handler per kind."""

    def __init__(self, resources: EngineResources) -> None:
        self.resources = resources
        self.heap: list[Timer] = []
        self.wake = asyncio.Event()
        self.handlers: dict[TimerKind, TimerHandler] = {}

    def route(self, handlers: Mapping[TimerKind, TimerHandler]) -> None:
        """Set the handler of each kind (the systems that own them are built after this one,
        since they schedule timers)."""
        self.handlers.update(handlers)

    async def load(self) -> None:
        for row in await self.resources.store.load_timers():
            m = row._mapping
            try:
                kind = TimerKind(m["kind"])
            except ValueError:
                log.warning("unknown timer kind %s", m["kind"])
                continue
            heapq.heappush(self.heap, Timer(m["due_at"], m["id"], kind, m["target"]))

    async def schedule(self, tx: Tx, due_at: int, kind: TimerKind, target: str) -> None:
        """A durable timer: in the database, and in the in-memory heap once committed."""
        timer_id = new_id("evt")
        await Store.add_timer(tx, timer_id, due_at, kind.value, target)
        tx.after_commit.append(lambda: self.add(Timer(due_at, timer_id, kind, target)))

    def add(self, timer: Timer) -> None:
        heapq.heappush(self.heap, timer)
        self.wake.set()

    async def loop(self) -> None:
        while True:
            self.wake.clear()
            if not self.heap:
                await self.wake.wait()
                continue
            delay = (self.heap[0].due_at - self.resources.clock.now_ms()) / 1000
            if delay > 0:
                await self.resources.clock.wait(self.wake, delay)
                continue
            timer = heapq.heappop(self.heap)
            self.resources.background.spawn(self.fire(timer))

    async def fire(self, timer: Timer) -> None:
        fire = self.handlers.get(timer.kind)
        if fire is None:
            log.warning("unknown timer kind %s", timer.kind)
            return

        async def op(tx: Tx) -> None:
            if await Store.delete_timer(tx, timer.timer_id):
                await fire(tx, timer.target, self.resources.clock.now_ms())

        try:
            await self.resources.store.writer.run(op)
        except Exception:
            log.exception("timer %s failed; retrying in 1 s", timer.timer_id)
            timer.due_at = self.resources.clock.now_ms() + 1000
            self.add(timer)
