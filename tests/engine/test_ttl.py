"""A run not started within its TTL of being queued expires, on the engine's clock."""

from __future__ import annotations

from pathlib import Path

from runplane.v1 import worker_service_pb2 as wpb
from runplane_scheduler.specs import TriggerSpec
from tests.helpers.engine import ENV, engine_on_sqlite


async def test_a_run_no_executor_provides_expires_after_its_ttl(tmp_path: Path) -> None:
    async with engine_on_sqlite(tmp_path) as h:
        # Its executor registered the task, then went away.
        gone = await h.executor(wpb.TaskDefinition(id="nobody"))
        h.engine.executor_disconnected(gone.state)
        row, _ = await h.engine.trigger(ENV, TriggerSpec(task_id="nobody", ttl_ms=10_000))
        run_id = row["id"]
        await h.status_becomes(run_id, "PENDING_VERSION")

        h.clock.advance(9.9)
        await h.settled()
        assert (await h.run(run_id)).status == "PENDING_VERSION"

        h.clock.advance(0.2)
        expired = await h.status_becomes(run_id, "EXPIRED")
        assert "TTL_EXPIRED" in expired.error


async def test_a_queued_run_expires_but_a_started_one_does_not(tmp_path: Path) -> None:
    async with engine_on_sqlite(tmp_path) as h:
        ex = await h.executor(wpb.TaskDefinition(id="slow"), capacity=1)
        busy, _ = await h.engine.trigger(ENV, TriggerSpec(task_id="slow", ttl_ms=5_000))
        assignment = await ex.next("assignment")
        ex.ack_and_start(assignment.attempt_id)
        await h.status_becomes(busy["id"], "EXECUTING")
        waiting, _ = await h.engine.trigger(ENV, TriggerSpec(task_id="slow", ttl_ms=5_000))
        await h.status_becomes(waiting["id"], "QUEUED")

        h.clock.advance(5.1)
        await h.status_becomes(waiting["id"], "EXPIRED")
        await h.settled()
        assert (await h.run(busy["id"])).status == "EXECUTING"
