"""What happens when an attempt runs: hooks, catch_error, max_duration, machines, ctx,
metadata, tags and logs. ``runplane dev --tasks examples.execution``; the end-to-end tests in
tests/e2e/test_execution.py and test_metadata_logs.py drive these tasks.

Hooks that record their calls append ``name:attempt`` lines to the file ``payload["path"]``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from runplane import (
    AbortTaskRunError,
    CatchErrorResult,
    Context,
    Outcome,
    logger,
    metadata,
    runs,
    tags,
    task,
    tasks,
)


def record(payload: Any, ctx: Context, name: str) -> None:
    if isinstance(payload, dict) and "path" in payload:
        with Path(payload["path"]).open("a") as f:
            f.write(f"{name}:{ctx.attempt.number}\n")


# -- hooks ------------------------------------------------------------------------------------


@tasks.middleware
async def global_middleware(payload: Any, ctx: Context, next: Any) -> Any:
    record(payload, ctx, "global_middleware")
    return await next()


@tasks.on_start_attempt
def global_on_start_attempt(payload: Any, ctx: Context) -> None:
    record(payload, ctx, "global_on_start_attempt")


@tasks.on_success
async def global_on_success(payload: Any, output: Any, ctx: Context) -> None:
    record(payload, ctx, "global_on_success")


async def hooked_middleware(payload: Any, ctx: Context, next: Any) -> Any:
    record(payload, ctx, "middleware")
    output = await next()
    record(payload, ctx, "middleware_after")
    return output


async def hooked_init(payload: Any, ctx: Context) -> str:
    record(payload, ctx, "init")
    return "initialised"


@task(
    id="hooked",
    retry={"max_attempts": 2, "min_timeout": 0.05, "max_timeout": 0.1},
    middleware=hooked_middleware,
    init=hooked_init,
)
async def hooked(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Fails until attempt ``payload["succeed_on"]``; every hook records itself."""
    record(payload, ctx, "run")
    if payload.get("abort"):
        raise AbortTaskRunError("aborted on purpose")
    if ctx.attempt.number < payload.get("succeed_on", 99):
        raise RuntimeError(f"attempt {ctx.attempt.number} failed on purpose")
    return {"init": ctx.init}


@hooked.on_start
def hooked_on_start(payload: Any, ctx: Context) -> None:
    record(payload, ctx, "on_start")


@hooked.on_start_attempt
async def hooked_on_start_attempt(payload: Any, ctx: Context) -> None:
    record(payload, ctx, "on_start_attempt")


@hooked.on_success
async def hooked_on_success(payload: Any, output: Any, ctx: Context) -> None:
    record(payload, ctx, "on_success")
    raise RuntimeError("on_success fails, which must not fail the run")


@hooked.on_failure
async def hooked_on_failure(payload: Any, error: BaseException, ctx: Context) -> None:
    record(payload, ctx, f"on_failure({type(error).__name__})")
    raise RuntimeError("on_failure fails, which changes nothing")


@hooked.on_complete
async def hooked_on_complete(payload: Any, outcome: Outcome, ctx: Context) -> None:
    record(payload, ctx, "on_complete(ok)" if outcome.ok else "on_complete(error)")


@hooked.catch_error
async def hooked_catch_error(payload: Any, error: BaseException, ctx: Context) -> None:
    record(payload, ctx, "catch_error")


@hooked.cleanup
def hooked_cleanup(payload: Any, ctx: Context) -> None:
    record(payload, ctx, "cleanup")


async def decide(payload: dict[str, Any], error: BaseException, ctx: Context) -> Any:
    if payload.get("skip"):
        return CatchErrorResult(skip_retrying=True, error=ValueError("replaced by catch_error"))
    if "retry_delay" in payload:
        return {"retry_delay": payload["retry_delay"]}
    return None


@task(
    id="caught",
    retry={"max_attempts": 2, "min_timeout": 0.01, "max_timeout": 0.01},
    catch_error=decide,
)
async def caught(payload: dict[str, Any], ctx: Context) -> None:
    """Always fails; its catch_error skips retrying or sets the retry delay."""
    raise RuntimeError(f"attempt {ctx.attempt.number} failed")


@task(
    id="backoff",
    retry={
        "max_attempts": 3,
        "min_timeout": 0.3,
        "factor": 2,
        "max_timeout": 5,
        "randomize": False,
    },
)
async def backoff(payload: dict[str, Any], ctx: Context) -> None:
    """Always fails; its attempts start after 0.3 s and 0.6 s of back-off."""
    raise RuntimeError("fails on purpose")


@task(id="cancellable", on_cancel=lambda payload, ctx: record(payload, ctx, "on_cancel"))
async def cancellable(payload: dict[str, Any], ctx: Context) -> None:
    """Waits to be cancelled."""
    record(payload, ctx, "run")
    await asyncio.sleep(600)


# -- max_duration -----------------------------------------------------------------------------


@task(id="spin", max_duration=1, retry={"max_attempts": 3})
async def spin(payload: object) -> None:
    """An async task that never yields: only a hard stop ends it."""
    while True:
        pass


@task(id="spin-def", max_duration=1, retry={"max_attempts": 3})
def spin_def(payload: object) -> None:
    """A plain def that never returns."""
    while True:
        time.sleep(0.01)


@task(id="slow", max_duration=1, retry={"max_attempts": 3})
async def slow(payload: dict[str, Any], ctx: Context) -> None:
    """Sleeps past its max_duration; records why its signal fired."""

    async def watch() -> None:
        reason = await ctx.signal.wait()
        record(payload, ctx, f"signal({reason})")

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.sleep(600)
    finally:
        await asyncio.sleep(0)  # let the watcher record
        watcher.cancel()


# -- machines ---------------------------------------------------------------------------------

MB = 2**20


@task(id="hog", machine="micro", retry={"max_attempts": 3})
async def hog(payload: dict[str, Any], ctx: Context) -> str:
    """Allocates ``payload["mb"]`` MB on a micro machine (0.25 GB)."""
    block = bytearray(payload.get("mb", 600) * MB)
    return f"{len(block) // MB} MB on {ctx.machine.name}"


@task(
    id="hog-retry",
    machine="micro",
    retry={"max_attempts": 3, "min_timeout": 0.05, "out_of_memory": {"machine": "small-2x"}},
)
async def hog_retry(payload: dict[str, Any], ctx: Context) -> str:
    """Too big for micro; its out-of-memory retry runs on small-2x (1 GB) and fits."""
    block = bytearray(payload.get("mb", 400) * MB)
    return f"{len(block) // MB} MB on {ctx.machine.name}"


@task(id="quick")
async def quick(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Returns at once, reporting its machine."""
    await asyncio.sleep(payload.get("seconds", 0))
    return {"machine": ctx.machine.name, "n": payload.get("n")}


# -- ctx --------------------------------------------------------------------------------------


@task(id="ctx-report")
async def ctx_report(payload: object, ctx: Context) -> dict[str, Any]:
    """Returns the fields of its ctx."""
    return {
        "run": {
            "id": ctx.run.id,
            "tags": ctx.run.tags,
            "is_test": ctx.run.is_test,
            "is_replay": ctx.run.is_replay,
            "created_at": ctx.run.created_at.isoformat() if ctx.run.created_at else None,
            "started_at": ctx.run.started_at.isoformat() if ctx.run.started_at else None,
            "idempotency_key": ctx.run.idempotency_key,
            "max_attempts": ctx.run.max_attempts,
            "priority": ctx.run.priority,
            "parent_run_id": ctx.run.parent_run_id,
            "root_run_id": ctx.run.root_run_id,
            "batch_id": ctx.run.batch_id,
        },
        "attempt": {"id": ctx.attempt.id, "number": ctx.attempt.number},
        "task": {"id": ctx.task.id},
        "queue": {"name": ctx.queue.name},
        "environment": {
            "id": ctx.environment.id,
            "slug": ctx.environment.slug,
            "type": ctx.environment.type,
        },
        "machine": {"name": ctx.machine.name, "cpu": ctx.machine.cpu, "memory": ctx.machine.memory},
    }


# -- metadata, tags, logs ---------------------------------------------------------------------


@task(id="progress")
async def progress(payload: object) -> dict[str, Any]:
    """Reports progress through metadata in two flushes."""
    metadata.set("progress", 0.5).increment("count", 2).append("steps", "a")
    await metadata.flush()
    await asyncio.sleep(1.5)
    metadata.set("progress", 1.0).decrement("count").append("steps", "b").delete("scratch")
    return metadata.current()


@task(id="child")
async def child(payload: object) -> None:
    """Updates its parent's and its root's metadata."""
    metadata.parent.set("child_done", True).increment("children")
    metadata.root.append("log", "child was here")


@task(id="parent")
async def parent(payload: object, ctx: Context) -> str:
    """Triggers ``child`` and waits for it to finish."""
    handle = await child.trigger({})
    done = await runs.poll(handle, interval=0.1, timeout=60)
    return done.id


@task(id="tagger")
async def tagger(payload: dict[str, Any]) -> list[str]:
    """Adds tags to its own run."""
    run = await tags.add(payload.get("tags", ["added:1", "added:2"]))
    return run.tags


@task(id="chatty")
async def chatty(payload: object) -> str:
    """Logs a few lines and a span."""
    logger.info("starting the work", step=1)
    with logger.trace("fetch") as span:
        span.set_attribute("url", "https://example.com")
        logger.warning("the fetch was slow", seconds=2.5)
    logger.error("something went wrong, but we carry on")
    return "done"


@task(id="oversize")
async def oversize(payload: object) -> str:
    """Sets metadata past the 256 KB limit: the update is refused, the run goes on."""
    metadata.set("small", 1)
    await metadata.flush()
    metadata.set("huge", "x" * 300_000)
    await metadata.flush()
    await asyncio.sleep(0.5)
    metadata.set("after", True)
    return "still here"
