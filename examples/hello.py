"""A first task module: ``runplane dev --tasks examples.hello``."""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel

from runplane import AbortTaskRunError, Context, task


class Greeting(BaseModel):
    name: str


@task(id="hello-world")
async def hello_world(payload: Greeting, ctx: Context) -> dict[str, object]:
    """Greets someone, a little slowly."""
    await asyncio.sleep(0.1)
    return {"message": f"Hello, {payload.name}!", "run": ctx.run.id, "attempt": ctx.attempt.number}


@task(id="flaky", retry={"max_attempts": 3, "min_timeout": 0.2, "max_timeout": 1, "factor": 2})
async def flaky(payload: dict[str, int], ctx: Context) -> dict[str, int]:
    """Fails until attempt ``payload["succeed_on"]`` (never, if it is larger than the attempts)."""
    if ctx.attempt.number < payload.get("succeed_on", 99):
        raise RuntimeError(f"attempt {ctx.attempt.number} failed on purpose")
    return {"attempt": ctx.attempt.number}


@task(id="refuse")
async def refuse(payload: object) -> None:
    """Fails at once without retrying."""
    raise AbortTaskRunError("not today")


@task(id="busy-loop")
def busy_loop(payload: dict[str, float]) -> str:
    """A plain ``def`` that never yields: only a hard stop ends it early."""
    end = time.monotonic() + payload.get("seconds", 600)
    n = 0
    while time.monotonic() < end:
        n += 1
    return f"counted to {n}"


@task(id="sleepy")
async def sleepy(payload: dict[str, float]) -> float:
    """Sleeps ``payload["seconds"]`` (for kill tests)."""
    await asyncio.sleep(payload.get("seconds", 5))
    return payload.get("seconds", 5)
