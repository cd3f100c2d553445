"""wait.for: the run goes WAITING (its slot free), and when the duration has passed on the
engine's clock its suspended attempt is resumed with the wait's result."""

from __future__ import annotations

from pathlib import Path

from runplane.v1 import worker_service_pb2 as wpb
from runplane_scheduler.specs import TriggerSpec
from tests.helpers.engine import ENV, engine_on_sqlite


async def test_a_duration_wait_resumes_the_attempt_when_it_ends(tmp_path: Path) -> None:
    async with engine_on_sqlite(tmp_path) as h:
        ex = await h.executor(wpb.TaskDefinition(id="sleepy"), capacity=1)
        row, _ = await h.engine.trigger(ENV, TriggerSpec(task_id="sleepy"))
        run_id = row["id"]
        assignment = await ex.next("assignment")
        ex.ack_and_start(assignment.attempt_id)
        await h.status_becomes(run_id, "EXECUTING")

        ex.send(wait=wpb.WaitRequest(attempt_id=assignment.attempt_id, seq=1, duration_ms=5_000))
        await h.status_becomes(run_id, "WAITING")
        await h.settled()
        assert len(ex.state.attempts) == 0, "a waiting run holds no slot"

        h.clock.advance(4.9)
        await h.settled()
        assert ex.nothing_sent(), "resumed before the duration ended"
        assert (await h.run(run_id)).status == "WAITING"

        h.clock.advance(0.2)
        resume = await ex.next("resume")
        assert resume.attempt_id == assignment.attempt_id
        assert [(r.seq, r.ok) for r in resume.results] == [(1, True)]
        await h.status_becomes(run_id, "EXECUTING")
