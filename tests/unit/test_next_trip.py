"""NextTrip: identical reads share trips, and nobody gets an answer older than its question."""

from __future__ import annotations

import asyncio

import pytest

from runplane_realtime.scheduler import NextTrip


async def settle() -> None:
    """Let every ready task run until they all wait."""
    for _ in range(10):
        await asyncio.sleep(0)


class Reader:
    """A read whose trips the test releases one at a time; each answers its trip number."""

    def __init__(self) -> None:
        self.started = 0
        self.gates: list[asyncio.Event] = []

    async def read(self) -> int:
        self.started += 1
        number = self.started
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return number

    async def release(self, trip: int) -> None:
        while len(self.gates) < trip:
            await settle()
        self.gates[trip - 1].set()


async def test_callers_during_a_trip_share_the_next_one_not_the_one_under_way() -> None:
    trips, reader = NextTrip(), Reader()
    first = asyncio.ensure_future(trips.call("k", reader.read))
    await settle()
    later = [asyncio.ensure_future(trips.call("k", reader.read)) for _ in range(50)]
    await settle()
    assert reader.started == 1  # the others wait for the next trip

    await reader.release(1)
    assert await first == 1
    await reader.release(2)
    assert await asyncio.gather(*later) == [2] * 50
    assert reader.started == 2


async def test_different_keys_do_not_share() -> None:
    trips, reader = NextTrip(), Reader()
    a = asyncio.ensure_future(trips.call("a", reader.read))
    b = asyncio.ensure_future(trips.call("b", reader.read))
    await settle()
    assert reader.started == 2
    await reader.release(1)
    await reader.release(2)
    assert sorted(await asyncio.gather(a, b)) == [1, 2]


async def test_a_failed_trip_fails_every_caller_of_it_and_the_next_trip_starts_afresh() -> None:
    trips = NextTrip()
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise ConnectionError("scheduler away")
        return calls

    results = await asyncio.gather(
        trips.call("k", failing), trips.call("k", failing), return_exceptions=True
    )
    assert isinstance(results[0], ConnectionError)
    assert results[1] == 2  # it asked while trip 1 was under way: it got trip 2
    assert await trips.call("k", failing) == 3


async def test_a_caller_that_gives_up_does_not_cancel_the_trip_for_the_others() -> None:
    trips, reader = NextTrip(), Reader()
    first = asyncio.ensure_future(trips.call("k", reader.read))
    second = asyncio.ensure_future(trips.call("k", reader.read))
    await settle()
    third = asyncio.ensure_future(trips.call("k", reader.read))
    await settle()
    second.cancel()  # it waited for trip 2, with third
    first.cancel()  # trip 1 is under way for it alone
    for gone in (first, second):
        with pytest.raises(asyncio.CancelledError):
            await gone
    await reader.release(1)
    await reader.release(2)
    assert await third == 2
    assert reader.started == 2
