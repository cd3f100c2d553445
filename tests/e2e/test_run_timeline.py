"""``runs.timeline``: a run's waterfall read back from the scheduler's database (SQLite and
PostgreSQL) after real attempts, waits, a child run and log lines."""

from __future__ import annotations

import pytest

import runplane
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CLUSTER_TASKS = "tests.e2e.dashboard_tasks"


async def test_a_runs_timeline_has_its_queue_time_attempt_waits_child_and_logs(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    waits = runplane.WaitAPI(client)
    token = await waits.create_token(timeout="10m")
    parent = await client.tasks.trigger("dash-parent", {"token": token.id})

    async def waiting_for_the_token() -> bool:
        timeline = await client.runs.timeline(parent.id)
        return any(w.kind == "TOKEN" and w.finished_at is None for w in timeline.waits)

    await eventually(waiting_for_the_token, 60, description="the parent waits for its token")
    await waits.complete_token(token.id, {"ok": True})
    done = await client.runs.poll(parent.id, interval=0.1, timeout=60)
    assert done.is_success, done.error

    async def all_logs_stored() -> runplane.RunTimeline | None:
        timeline = await client.runs.timeline(parent.id)
        return timeline if len(timeline.logs) == 3 else None

    timeline = await eventually(all_logs_stored, 30, description="the parent's three log lines")
    assert timeline.run.id == parent.id and timeline.run.is_success
    assert [i.kind for i in timeline.queue_intervals][:1] == ["QUEUED"]
    first = timeline.queue_intervals[0]
    assert first.started_at is not None and first.finished_at is not None
    assert first.started_at <= first.finished_at

    assert timeline.attempts, timeline
    attempt = timeline.attempts[0]
    assert attempt.number == 1 and attempt.started_at is not None
    last = timeline.attempts[-1]
    assert last.status == "COMPLETED" and last.finished_at is not None

    assert [w.kind for w in timeline.waits] == ["DURATION", "BATCH", "TOKEN"]
    assert all(w.status == "COMPLETED" and w.finished_at is not None for w in timeline.waits)
    duration, children, token_wait = timeline.waits
    assert duration.due_at is not None
    assert token_wait.target == token.id

    [child] = timeline.children
    assert child.task_id == "dash-child" and child.parent_run_id == parent.id
    assert children.child_run_ids == [child.id]

    assert [e.message for e in timeline.logs] == [
        "parent starting",
        "the child is done; waiting for the token",
        "token completed",
    ]
    assert not timeline.logs_truncated

    # Another environment's key does not find it.
    prod = cluster.client("prod")
    with pytest.raises(runplane.NotFoundError, match=parent.id):
        await prod.runs.timeline(parent.id)
    await prod.close()
    await client.close()
