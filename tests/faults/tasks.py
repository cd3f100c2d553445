"""Tasks for the fault tests: ``--tasks tests.faults.tasks``."""

from __future__ import annotations

import asyncio
from typing import Any

from runplane import Context, streams, task


@task(
    id="fault-echo",
    retry={"max_attempts": 5, "factor": 2, "min_timeout": 0.2, "max_timeout": 1},
)
async def fault_echo(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Sleeps ``payload["sleep"]`` seconds, then answers with the payload's ``i`` and its run id,
    so a test can tell every run's output from every other's."""
    await asyncio.sleep(payload.get("sleep", 0))
    return {"i": payload["i"], "run": ctx.run.id}


@task(id="fault-stream", retry={"max_attempts": 1})
async def fault_stream(payload: dict[str, Any], ctx: Context) -> int:
    """Appends ``payload["n"]`` chunks ``{"i": i}`` to its stream ``chunks``, one every
    ``payload["every"]`` seconds; the appends retry while the realtime service is away."""
    chunks = streams.define(id="chunks")
    for i in range(payload["n"]):
        await chunks.append({"i": i})
        await asyncio.sleep(payload.get("every", 0.01))
    return int(payload["n"])
