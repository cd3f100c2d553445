"""An assignment its executor never acknowledges lapses after the ack timeout and the run is
queued again for a new attempt (not counted as a retry)."""

from __future__ import annotations

from pathlib import Path

from runplane.v1 import worker_service_pb2 as wpb
from runplane_scheduler.specs import TriggerSpec
from runplane_scheduler.store import tables as db
from tests.helpers.engine import ENV, engine_on_sqlite


async def test_an_unacknowledged_assignment_lapses_and_the_run_is_requeued(
    tmp_path: Path,
) -> None:
    async with engine_on_sqlite(tmp_path, ack_timeout=10.0) as h:
        ex = await h.executor(wpb.TaskDefinition(id="work"))
        row, _ = await h.engine.trigger(ENV, TriggerSpec(task_id="work"))
        run_id = row["id"]
        first = await ex.next("assignment")

        h.clock.advance(9.5)
        await h.settled()
        assert ex.nothing_sent(), "the lease lapsed before the ack timeout"
        assert (await h.run(run_id)).current_attempt_id == first.attempt_id

        h.clock.advance(1.0)
        second = await ex.next("assignment")
        assert second.attempt_id != first.attempt_id
        assert second.attempt_number == 1  # a lost attempt that never started is no retry
        run = await h.run(run_id)
        assert run.status == "DEQUEUED"
        assert run.current_attempt_id == second.attempt_id

        async with h.store.db.connect() as conn:
            lost = (
                await conn.execute(db.attempts.select().where(db.attempts.c.id == first.attempt_id))
            ).one()
        assert lost.status == "LOST"
