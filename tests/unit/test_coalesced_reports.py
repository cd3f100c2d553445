"""The background writes' coalescing: like writes submitted one after another become one write,
nothing moves past another write, and a failed write is retried with everything after it."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from runplane_scheduler.engine.resources import Background, Coalesce
from runplane_scheduler.store import Store, Tx


class FakeWriter:
    """Applies each submitted write in order; fails the writes listed in ``fail`` once."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.submitted = 0
        self.fail = fail or set()

    def submit(self, op: Any) -> asyncio.Future[Any]:
        n, self.submitted = self.submitted, self.submitted + 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if n in self.fail:
            self.fail.discard(n)
            future.set_exception(OSError("database went away"))
            return future
        task = asyncio.ensure_future(op(cast(Tx, None)))
        task.add_done_callback(lambda t: future.set_result(t.result()))
        return future


class FakeStore:
    def __init__(self, writer: FakeWriter) -> None:
        self.writer = writer


async def _drain(entries: list[Any], writer: FakeWriter) -> list[Any]:
    background = Background(cast(Store, FakeStore(writer)))
    loop = asyncio.create_task(background.reports_loop())
    for entry in entries:
        background.submit(entry)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not background.reports:
            break
    await asyncio.sleep(0.3)  # the retry's back-off is 0.2 s
    loop.cancel()
    return entries


async def test_like_writes_in_a_row_become_one_and_keep_their_order() -> None:
    applied: list[Any] = []

    async def apply_x(tx: Tx, items: list[Any]) -> None:
        applied.append(("x", items))

    async def apply_y(tx: Tx, items: list[Any]) -> None:
        applied.append(("y", items))

    def op(name: str) -> Any:
        async def run(tx: Tx) -> None:
            applied.append((name, None))

        return run

    writer = FakeWriter()
    await _drain(
        [
            op("a"),
            Coalesce(apply_x, 1),
            Coalesce(apply_x, 2),
            op("b"),
            Coalesce(apply_x, 3),
            Coalesce(apply_y, 4),
            Coalesce(apply_y, 5),
        ],
        writer,
    )
    assert applied == [
        ("a", None),
        ("x", [1, 2]),
        ("b", None),
        ("x", [3]),
        ("y", [4, 5]),
    ]
    assert writer.submitted == 5


async def test_a_failed_write_is_retried_with_every_write_after_it() -> None:
    applied: list[Any] = []

    async def apply_x(tx: Tx, items: list[Any]) -> None:
        applied.append(("x", items))

    async def first(tx: Tx) -> None:
        applied.append(("first", None))

    async def last(tx: Tx) -> None:
        applied.append(("last", None))

    writer = FakeWriter(fail={1})  # the coalesced write fails once
    await _drain([first, Coalesce(apply_x, 1), Coalesce(apply_x, 2), last], writer)
    # "last" was applied in the first round too (its write did not fail); writes are guarded,
    # so applying it again changes nothing, and nothing ran before what it followed.
    assert applied[0] == ("first", None)
    assert ("x", [1, 2]) in applied
    assert applied.index(("x", [1, 2])) < len(applied) - 1
    assert applied[-1] == ("last", None)
    assert applied.count(("first", None)) == 1
