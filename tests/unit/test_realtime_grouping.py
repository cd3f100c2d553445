"""A set subscription's changes that are ready together go in one message, only when the
subscriber asks (``max_changes_per_response``), in order, in groups of at most its size."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from runplane.v1 import run_pb2
from runplane_realtime.feed import Feed
from runplane_realtime.server import MAX_CHANGES_PER_RESPONSE, grouped


async def _changes(n: int) -> AsyncGenerator[tuple[run_pb2.Run, int], None]:
    for i in range(1, n + 1):
        yield run_pb2.Run(id=f"run_{i}", version=1), 100 + i


async def _buffered(n: int) -> Feed[tuple[run_pb2.Run, int]]:
    """A feed whose pump has buffered all ``n`` changes (its subscriber was busy)."""
    feed = Feed(_changes(n), 1 << 20, lambda _: 1, lambda _: {})
    while feed.buffered_bytes < n:
        await asyncio.sleep(0)
    return feed


async def _groups(feed: Feed[tuple[run_pb2.Run, int]], most: int) -> list[list[tuple[str, int]]]:
    out = []
    async for run, cursor, more in grouped(feed, most):
        out.append([(run.id, cursor), *((c.run.id, c.cursor) for c in more)])
    return out


async def test_buffered_changes_go_in_groups_of_at_most_the_asked_size_in_order() -> None:
    groups = await _groups(await _buffered(10), 4)
    assert [len(g) for g in groups] == [4, 4, 2]
    assert [c for g in groups for c in g] == [(f"run_{i}", 100 + i) for i in range(1, 11)]


async def test_an_older_client_asking_nothing_gets_one_change_per_message() -> None:
    groups = await _groups(await _buffered(5), 0)
    assert [len(g) for g in groups] == [1] * 5


async def test_the_group_size_is_capped() -> None:
    n = MAX_CHANGES_PER_RESPONSE + 5
    groups = await _groups(await _buffered(n), 10**6)
    assert [len(g) for g in groups] == [MAX_CHANGES_PER_RESPONSE, 5]
