"""runplane tasks for the benchmark; loaded by ``runplane executor --tasks bench.tasks_runplane``.

Same work as the peers' tasks: record completion in the recorder redis (bench/recorder.py).
"""

import asyncio
import time

from bench.recorder import record
from runplane import task, wait


@task(id="bench-noop")
async def noop(payload: dict) -> None:
    record(payload["k"], payload["i"], payload["t"], time.time())


@task(id="bench-sleep")
async def sleep1(payload: dict) -> None:
    """W3 comparable row: hold the slot for 1 s (like the peers)."""
    s = time.time()
    await asyncio.sleep(1.0)
    record(payload["k"], payload["i"], payload["t"], s)


@task(id="bench-wait")
async def wait1(payload: dict) -> None:
    """W3 `+wait` row: a durable 1 s wait (`wait.for_` frees the slot while waiting)."""
    s = time.time()
    await wait.for_(seconds=1)
    record(payload["k"], payload["i"], payload["t"], s)


@task(id="bench-wait-token")
async def wait_token(payload: dict) -> None:
    """W4 and W5: say "about to wait" (list ``<k>:w``), wait on the client's token, then record.

    Every run of a wave waits on the same token, so the client decides when all resume."""
    s = time.time()
    record(payload["k"] + ":w", payload["i"], payload["t"], s)
    (await wait.for_token(payload["token"])).unwrap()
    record(payload["k"], payload["i"], payload["t"], s)
