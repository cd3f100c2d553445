"""One schedule tick makes one run: runs.schedule_tick is unique, whatever the idempotency key
says (it can expire or be reset) and whoever fires the tick."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from runplane.v1 import worker_service_pb2 as wpb
from runplane_scheduler.specs import TriggerSpec
from runplane_scheduler.store import tables as db
from runplane_scheduler.store.errors import is_duplicate
from tests.helpers.engine import ENV, engine_on_sqlite


async def test_a_tick_fired_twice_makes_one_run_even_with_another_idempotency_key(
    tmp_path: Path,
) -> None:
    async with engine_on_sqlite(tmp_path) as h:
        await h.executor(wpb.TaskDefinition(id="nightly"))
        first, _ = await h.engine.trigger(
            ENV, TriggerSpec(task_id="nightly", idempotency_key="a", schedule_tick="sched_1:1000")
        )
        with pytest.raises(Exception) as again:
            await h.engine.trigger(
                ENV,
                TriggerSpec(task_id="nightly", idempotency_key="b", schedule_tick="sched_1:1000"),
            )
        assert is_duplicate(again.value), again.value
        # The next tick, and runs of no schedule, are not held back.
        await h.engine.trigger(ENV, TriggerSpec(task_id="nightly", schedule_tick="sched_1:2000"))
        await h.engine.trigger(ENV, TriggerSpec(task_id="nightly"))
        await h.engine.trigger(ENV, TriggerSpec(task_id="nightly"))
        async with h.engine.store.db.connect() as conn:
            ticks = (
                await conn.execute(
                    select(db.runs.c.schedule_tick, func.count())
                    .group_by(db.runs.c.schedule_tick)
                    .order_by(db.runs.c.schedule_tick)
                )
            ).all()
        assert [tuple(t) for t in ticks] == [(None, 2), ("sched_1:1000", 1), ("sched_1:2000", 1)]
        assert (await h.run(first["id"])).status in ("QUEUED", "DEQUEUED", "EXECUTING")
