"""Tasks for the realtime end-to-end tests: the examples, plus tasks that write streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from examples.hello import flaky, hello_world  # noqa: F401  (registered for the executor)
from runplane import Context, streams, task

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
