"""runplane benchmark client (runs in the product venv)."""

from __future__ import annotations

import asyncio
import inspect
import os
import time

import runplane

TASK = {
    "noop": "bench-noop",
    "sleep": os.environ.get("BENCH_RUNPLANE_SLEEP_TASK", "bench-sleep"),
    "wait": "bench-wait",  # W3 `+wait` row: wait.for_(seconds=1), frees the slot
}


async def _maybe_await(x):
    return await x if inspect.isawaitable(x) else x


def _ids(result) -> list:
    runs = getattr(result, "runs", result)
    return [getattr(r, "id", r) for r in runs]


class Client:
    def __init__(self, c, spread: list | None = None) -> None:
        self.c = c
        self.spread = spread or [c]

    def _next(self, i: int):
        return self.spread[i % len(self.spread)]

    async def enqueue(self, kind: str, key: str, i: int, t: float) -> str:
        handle = await self._next(i).tasks.trigger(TASK[kind], {"k": key, "i": i, "t": t})
        return handle.id

    async def enqueue_batch(self, kind: str, key: str, items: list[tuple[int, float]]) -> list:
        # Trigger.dev shape: batch_trigger(task_id, [{"payload": ...}, ...])
        items_ = [{"payload": {"k": key, "i": i, "t": t}} for i, t in items]
        client = self._next(items[0][0] if items else 0)
        return _ids(await client.tasks.batch_trigger(TASK[kind], items_))

    async def verify(self, ids: list, deadline: float) -> dict:
        """Every sampled run must reach status COMPLETED (polled until deadline)."""
        pending = list(ids)
        statuses: dict[str, int] = {}
        sem = asyncio.Semaphore(32)

        async def one(rid):
            async with sem:
                r = await self.c.runs.retrieve(rid)
                s = getattr(r, "status", "?")
                return rid, str(getattr(s, "value", s)).rsplit(".", 1)[-1]

        while True:
            res = await asyncio.gather(*(one(r) for r in pending))
            statuses = {}
            still = []
            for rid, s in res:
                if s != "COMPLETED":
                    still.append(rid)
                    statuses[s] = statuses.get(s, 0) + 1
            done = len(ids) - len(still)
            if not still or time.monotonic() > deadline:
                statuses["COMPLETED"] = done
                return {"ok": not still, "checked": len(ids), "statuses": statuses}
            pending = still
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        for c in self.spread:
            for name in ("aclose", "close"):
                f = getattr(c, name, None)
                if f:
                    await _maybe_await(f())
                    break


async def open_client(cfg: dict) -> Client:
    # Scheduler replicas: one client per replica, triggers spread over them in turn (as a
    # load balancer in front of them would), so most calls are forwarded to the leader.
    urls = os.environ.get("BENCH_RUNPLANE_API_URLS", "") or os.environ["RUNPLANE_API_URL"]
    key = os.environ["RUNPLANE_SECRET_KEY"]
    clients = [runplane.Client(api_url=url, secret_key=key) for url in urls.split(",")]
    return Client(clients[0], clients)
