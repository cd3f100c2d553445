"""Run streams on a real nats-server, through the realtime service's stream store: indexes under
concurrent writers, retried appends, limits, close, and reads that end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from runplane_common import errors
from runplane_common.config import RealtimeSettings
from runplane_realtime.events import NatsLink
from runplane_realtime.streams import RunStreams
from tests.helpers.nats import NatsServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def streams(nats_server: NatsServer) -> AsyncIterator[RunStreams]:
    link = NatsLink(nats_server.url)
    link.start()
    assert await link.wait_connected(15.0)
    settings = RealtimeSettings(stream_chunk_bytes=100, stream_max_bytes=1000)
    yield RunStreams(link, settings)
    await link.stop()


async def _read(streams: RunStreams, after: int = 0, final: bool = False) -> list[tuple[int, str]]:
    async def run_is_final() -> bool:
        return final

    return [
        (c.index, c.data)
        async for ready in streams.read("env_1", "run_1", "s", after, run_is_final)
        for c in ready
    ]


async def test_concurrent_writers_get_distinct_indexes_and_a_retry_is_not_appended_twice(
    streams: RunStreams,
) -> None:
    async def writer(name: str) -> list[int]:
        return [
            await streams.append("env_1", "run_1", "s", [f'"{name}{i}"'], False, [f"{name}{i}"])
            for i in range(10)
        ]

    indexes = await asyncio.gather(writer("a"), writer("b"), writer("c"))
    assert sorted(i for each in indexes for i in each) == list(range(1, 31))
    # A retried append (its reply was lost): same chunk id, nothing new.
    assert await streams.append("env_1", "run_1", "s", ['"a9"'], False, ["a9"]) == 30
    chunks = await _read(streams, final=True)
    assert [i for i, _ in chunks] == list(range(1, 31))
    assert await _read(streams, after=28, final=True) == chunks[28:]


async def test_limits_are_invalid_arguments_naming_them_and_close_ends_readers(
    streams: RunStreams,
) -> None:
    with pytest.raises(errors.InvalidArgument, match="RUNPLANE_STREAM_CHUNK_BYTES") as big:
        await streams.append("env_1", "run_1", "s", ['"ok"', '"' + "x" * 100 + '"'], False)
    assert big.value.field == "chunks[1]"
    for _ in range(10):
        await streams.append("env_1", "run_1", "s", ['"' + "y" * 98 + '"'], False)
    with pytest.raises(errors.InvalidArgument, match="RUNPLANE_STREAM_MAX_BYTES"):
        await streams.append("env_1", "run_1", "s", ['"z"'], False)
    await streams.append("env_1", "run_1", "s", [], True)
    # Not final, yet the read ends: the stream is closed.
    assert len(await _read(streams)) == 10
    with pytest.raises(errors.FailedPrecondition, match="closed"):
        await streams.append("env_1", "run_1", "s", ['"late"'], False)


async def test_a_read_of_a_finished_run_without_chunks_ends(streams: RunStreams) -> None:
    assert await _read(streams, final=True) == []
