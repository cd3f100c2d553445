"""Tasks for the realtime end-to-end tests: the examples, plus tasks that write streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from examples.hello import flaky, hello_world  # noqa: F401  (registered for the executor)
from runplane import Context, metadata, streams, task

tokens = streams.define(id="tokens")


async def _words(n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield f"word-{i}"


@task(id="stream-words")
async def stream_words(payload: dict[str, int], ctx: Context) -> int:
    """Pipes ``payload["n"]`` words, then waits ``payload["linger"]`` seconds."""
    count = await tokens.pipe(_words(payload["n"]))
    await asyncio.sleep(payload.get("linger", 0))
    return count


@task(id="stream-two-writers")
async def stream_two_writers(payload: dict[str, int], ctx: Context) -> list[int]:
    """Two concurrent writers on one stream; returns the indexes they got."""

    async def write(name: str) -> list[int]:
        return [await tokens.append({"writer": name, "i": i}) for i in range(payload["n"])]

    a, b = await asyncio.gather(write("a"), write("b"))
    return sorted(a + b)


@task(id="metadata-steps")
async def metadata_steps(payload: dict[str, int], ctx: Context) -> int:
    """Sets its metadata ``payload["steps"]`` times, flushing each one (a run update each)."""
    for step in range(payload["steps"]):
        metadata.set("step", step)
        await metadata.flush()
    return payload["steps"]


@task(id="stream-to-parent")
async def stream_to_parent(payload: dict[str, int], ctx: Context) -> int:
    """A child that writes to its parent's and its root's stream."""
    await tokens.append({"from": "child", "to": "parent"}, target="parent")
    await tokens.append({"from": "child", "to": "root"}, target="root")
    return 2


@task(id="stream-parent")
async def stream_parent(payload: dict[str, int], ctx: Context) -> str:
    """Writes its own chunk, then waits for a child that writes to this run's stream."""
    await tokens.append({"from": "parent"})
    result = await stream_to_parent.trigger_and_wait({})
    await tokens.close()
    return result.id
