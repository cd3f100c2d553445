"""The Node worker (clients/node, ``startWorker``) beside a Python executor on a real cluster:
Node tasks triggered from Python, a Python child a Node task waits for, a Node worker killed
mid-wait and the run resumed by replay, and a token completed from Python."""

from __future__ import annotations

import pytest

import runplane
from runplane import RunStatus
from tests.helpers.cluster import Cluster
from tests.helpers.node import FIXTURE_WORKER, start_node_worker
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CLUSTER_TASKS = "tests.e2e.node_tasks"


async def _final(client: runplane.Client, run_id: str, timeout: float = 60) -> runplane.Run:
    return await client.runs.poll(run_id, interval=0.1, timeout=timeout)


async def _status_is(client: runplane.Client, run_id: str, status: RunStatus) -> bool:
    return (await client.runs.retrieve(run_id)).status is status


async def test_node_tasks_triggered_from_python_complete_with_logs_and_metadata(
    cluster: Cluster,
) -> None:
    worker = await start_node_worker(cluster, "node-worker")
    client = cluster.client()
    payload = {"a": [1, "two", None], "b": {"c": 3.5}}
    echo = await client.tasks.trigger("conformance-echo", payload)
    run = await _final(client, echo.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == payload
    logged = await client.tasks.trigger("conformance-log", None)
    run = await _final(client, logged.id)
    assert (run.status, run.output) == (RunStatus.COMPLETED, "ok")
    assert run.metadata == {"step": 1}
    lines = [line async for line in client.runs.logs(logged.id)]
    assert [(line.level, line.message) for line in lines] == [("info", "hello")]
    # SIGTERM: it stops and exits 0.
    await worker.stop()
    assert worker.process is not None and worker.process.returncode == 0, worker.log()


async def test_a_node_task_waits_for_a_python_child_with_trigger_and_wait(
    cluster: Cluster,
) -> None:
    await start_node_worker(cluster, "node-fixture-worker", FIXTURE_WORKER)
    client = cluster.client()
    handle = await client.tasks.trigger("node-parent", {"n": 21})
    run = await _final(client, handle.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    child_id = run.output["childId"]
    assert run.output["child"] == {"doubled": 42, "parent": handle.id}
    child = await client.runs.retrieve(child_id)
    assert (child.task_id, child.parent_run_id, child.tags) == (
        "py-child",
        handle.id,
        ["from-node"],
    )


async def test_a_node_worker_killed_mid_wait_is_replaced_and_the_run_resumes_by_replay(
    cluster: Cluster,
) -> None:
    worker = await start_node_worker(cluster, "node-worker", RUNPLANE_VERSION="node-conformance")
    client = cluster.client()
    handle = await client.tasks.trigger("conformance-wait", {"seconds": 3})
    await eventually(
        lambda: _status_is(client, handle.id, RunStatus.WAITING), 30, description="WAITING"
    )
    worker.kill()
    # The same version again, as a new process: the run replays on it from the top, and its
    # first wait (seq 1) answers at once from the journal.
    await start_node_worker(cluster, "node-worker-2", RUNPLANE_VERSION="node-conformance")
    run = await _final(client, handle.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == {"waited": 3}
    assert run.attempt_count == 1  # a replay is not a retry


async def test_a_replayed_node_run_skips_its_completed_waits(cluster: Cluster) -> None:
    worker = await start_node_worker(cluster, "node-fixture-worker", FIXTURE_WORKER)
    client = cluster.client()
    handle = await client.tasks.trigger("node-two-waits", {"seconds": 2})
    await eventually(
        lambda: _status_is(client, handle.id, RunStatus.WAITING), 30, description="WAITING"
    )
    worker.kill()
    await start_node_worker(cluster, "node-fixture-worker-2", FIXTURE_WORKER)
    run = await _final(client, handle.id)
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"attempt": 1}), cluster.logs()
    timeline = await client.runs.timeline(handle.id)
    assert [w.kind for w in timeline.waits] == ["DURATION", "DURATION"]


async def test_a_token_completed_from_python_resumes_the_node_task(cluster: Cluster) -> None:
    await start_node_worker(cluster, "node-worker")
    client = cluster.client()
    waits = runplane.WaitAPI(client)
    token = await waits.create_token(timeout="10m")
    handle = await client.tasks.trigger("conformance-token", {"token_id": token.id})
    await eventually(
        lambda: _status_is(client, handle.id, RunStatus.WAITING), 30, description="WAITING"
    )
    await waits.complete_token(token.id, {"approved": True})
    run = await _final(client, handle.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == {"token": {"approved": True}}


async def test_cancelling_a_node_run_stops_its_plain_sleep(cluster: Cluster) -> None:
    await start_node_worker(cluster, "node-worker")
    client = cluster.client()
    handle = await client.tasks.trigger("conformance-sleep", {"seconds": 60})
    await eventually(
        lambda: _status_is(client, handle.id, RunStatus.EXECUTING), 30, description="EXECUTING"
    )
    await client.runs.cancel(handle.id)
    run = await _final(client, handle.id, timeout=20)
    assert run.status is RunStatus.CANCELED
    # The worker reported the attempt canceled and takes new work.
    done = await client.tasks.trigger("conformance-echo", 7)
    assert (await _final(client, done.id)).output == 7


async def test_a_node_worker_reconnects_after_a_scheduler_restart_and_keeps_its_attempt(
    cluster: Cluster,
) -> None:
    await start_node_worker(cluster, "node-worker")
    client = cluster.client()
    handle = await client.tasks.trigger("conformance-sleep", {"seconds": 3})
    await eventually(
        lambda: _status_is(client, handle.id, RunStatus.EXECUTING), 30, description="EXECUTING"
    )
    await cluster.restart_scheduler()
    # It registers again with its executor id, session token and the running attempt, whose
    # result (sent then, or buffered while the stream was down) completes the run.
    run = await _final(client, handle.id)
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"slept": 3}), cluster.logs()
    assert run.attempt_count == 1


async def test_a_node_task_past_its_max_duration_ends_timed_out(cluster: Cluster) -> None:
    await start_node_worker(cluster, "node-fixture-worker", FIXTURE_WORKER)
    client = cluster.client()
    handle = await client.tasks.trigger("node-overrun", {"seconds": 30})
    run = await _final(client, handle.id, timeout=30)
    assert run.status is RunStatus.TIMED_OUT, cluster.logs()
    assert run.attempt_count == 1  # never retried
