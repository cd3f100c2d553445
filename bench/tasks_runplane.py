"""runplane tasks for the benchmark; loaded by ``runplane executor --tasks bench.tasks_runplane``.

Same work as the peers' tasks: record completion in the recorder redis (bench/recorder.py).
"""

import asyncio
import time

from bench.recorder import record
from runplane import task


@task(id="bench-noop")
async def noop(payload: dict) -> None:
    record(payload["k"], payload["i"], payload["t"], time.time())


@task(id="bench-sleep")
async def sleep1(payload: dict) -> None:
    """W3 comparable row: hold the slot for 1 s (like the peers)."""
    s = time.time()
    await asyncio.sleep(1.0)
    record(payload["k"], payload["i"], payload["t"], s)


try:  # W3 durable-wait row, once the SDK has it (`wait.for_` frees the slot while waiting)
    from runplane import wait  # type: ignore[attr-defined]

    @task(id="bench-wait")
    async def wait1(payload: dict) -> None:
        s = time.time()
        await wait.for_(seconds=1)
        record(payload["k"], payload["i"], payload["t"], s)
except ImportError:  # pragma: no cover
    pass
