"""A failed attempt is retried after the policy's back-off, measured on the engine's clock."""

from __future__ import annotations

from pathlib import Path

from runplane.v1 import worker_service_pb2 as wpb
from runplane_scheduler.specs import TriggerSpec
from tests.helpers.engine import ENV, engine_on_sqlite

POLICY = wpb.RetryPolicy(
    max_attempts=3, factor=2.0, min_timeout_seconds=2.0, max_timeout_seconds=60.0
)
TASK = wpb.TaskDefinition(id="flaky", retry=POLICY)


async def test_a_failed_attempt_is_retried_after_its_backoff(tmp_path: Path) -> None:
    async with engine_on_sqlite(tmp_path) as h:
        ex = await h.executor(TASK)
        row, _ = await h.engine.trigger(ENV, TriggerSpec(task_id="flaky"))
        run_id = row["id"]

        first = await ex.next("assignment")
        assert first.attempt_number == 1
        ex.ack_and_start(first.attempt_id)
        ex.fail(first.attempt_id)
        retrying = await h.status_becomes(run_id, "EXECUTING")
        await h.settled()
        assert (await h.run(run_id)).current_attempt_id is None, retrying

        # Back-off after attempt 1: min_timeout * factor**0 = 2 s.
        h.clock.advance(1.9)
        await h.settled()
        assert ex.nothing_sent(), "retried before its back-off ended"
        h.clock.advance(0.2)
        second = await ex.next("assignment")
        assert second.attempt_number == 2
        assert second.attempt_id != first.attempt_id

        # After attempt 2: 2 s * 2 = 4 s.
        ex.ack_and_start(second.attempt_id)
        ex.fail(second.attempt_id)
        await h.settled()
        h.clock.advance(3.9)
        await h.settled()
        assert ex.nothing_sent(), "retried before its back-off ended"
        h.clock.advance(0.2)
        third = await ex.next("assignment")
        assert third.attempt_number == 3

        # The third failure is the last (max_attempts 3).
        ex.ack_and_start(third.attempt_id)
        ex.fail(third.attempt_id, "still broken")
        failed = await h.status_becomes(run_id, "FAILED")
        assert failed.attempt_count == 3
        assert "still broken" in failed.error
