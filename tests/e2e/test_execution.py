"""End to end: what happens when an attempt runs (hooks, catch_error, retries, max_duration,
machines, ctx), against real services, nats-server and databases. Tasks: examples/execution.py."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from runplane import Run, RunStatus
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


CLUSTER_TASKS = "examples.execution"


async def finished(cluster: Cluster, run_id: str) -> Run:
    return await cluster.client().runs.poll(run_id, interval=0.1, timeout=120)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_hooks_fire_in_order_and_a_failing_on_success_does_not_fail_the_run(
    cluster: Cluster, tmp_path: Path
) -> None:
    path = tmp_path / "calls.txt"
    handle = await cluster.client().tasks.trigger("hooked", {"path": str(path), "succeed_on": 2})
    run = await finished(cluster, handle.id)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == {"init": "initialised"}
    assert run.attempt_count == 2
    assert lines(path) == [
        "global_middleware:1", "middleware:1", "init:1", "on_start:1",
        "global_on_start_attempt:1", "on_start_attempt:1", "run:1",
        "catch_error:1", "cleanup:1",
        "global_middleware:2", "middleware:2", "init:2",
        "global_on_start_attempt:2", "on_start_attempt:2", "run:2", "middleware_after:2",
        "global_on_success:2", "on_success:2", "on_complete(ok):2", "cleanup:2",
    ]  # fmt: skip
    # The failing on_success was logged to the run's logs.
    logs = [e async for e in cluster.client().runs.logs(handle.id)]
    assert any(e.level == "error" and "on_success" in e.message for e in logs), logs


async def test_on_failure_and_on_complete_fire_only_after_the_last_attempt(
    cluster: Cluster, tmp_path: Path
) -> None:
    path = tmp_path / "calls.txt"
    handle = await cluster.client().tasks.trigger("hooked", {"path": str(path)})
    run = await finished(cluster, handle.id)
    assert run.status is RunStatus.FAILED
    assert run.attempt_count == 2
    calls = lines(path)
    assert [c for c in calls if c.startswith(("on_failure", "on_complete"))] == [
        "on_failure(RuntimeError):2",
        "on_complete(error):2",
    ]
    assert calls[-1] == "cleanup:2"
    assert calls.count("catch_error:1") == 1 and "on_start:2" not in calls


async def test_abort_fails_at_once_without_retry_and_calls_on_failure(
    cluster: Cluster, tmp_path: Path
) -> None:
    path = tmp_path / "calls.txt"
    handle = await cluster.client().tasks.trigger("hooked", {"path": str(path), "abort": True})
    run = await finished(cluster, handle.id)
    assert run.status is RunStatus.FAILED
    assert run.attempt_count == 1
    assert run.error is not None and run.error.type == "AbortTaskRunError"
    assert "on_failure(AbortTaskRunError):1" in lines(path)


async def test_catch_error_can_skip_retrying_and_replace_the_error(cluster: Cluster) -> None:
    handle = await cluster.client().tasks.trigger("caught", {"skip": True})
    run = await finished(cluster, handle.id)
    assert run.status is RunStatus.FAILED
    assert run.attempt_count == 1
    assert run.error is not None
    assert (run.error.type, run.error.message) == ("ValueError", "replaced by catch_error")


async def test_catch_error_retry_delay_replaces_the_policy_backoff(cluster: Cluster) -> None:
    client = cluster.client()
    # The policy's back-off is 0.01 s; catch_error asks for 1.5 s.
    handle = await client.tasks.trigger("caught", {"retry_delay": 1.5})
    history = [run async for run in client.runs.subscribe_to_run(handle)]
    assert history[-1].status is RunStatus.FAILED
    assert history[-1].attempt_count == 2
    waits = [
        (after.updated_at - before.updated_at).total_seconds()
        for before, after in itertools.pairwise(history)
        if before.status is RunStatus.EXECUTING
        and after.status is RunStatus.QUEUED
        and before.updated_at is not None
        and after.updated_at is not None
    ]
    assert len(waits) == 1
    assert waits[0] >= 1.5 - 0.01


async def test_attempts_start_after_the_retry_formulas_delays(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("backoff", {})
    history = [run async for run in client.runs.subscribe_to_run(handle)]
    assert history[-1].status is RunStatus.FAILED
    assert history[-1].attempt_count == 3
    # An attempt starts when the run becomes EXECUTING from DEQUEUED; between two of them lies
    # the back-off min(5, 0.3 * 2**(n-1)) of failed attempt n (randomize off).
    starts = [
        after.updated_at
        for before, after in itertools.pairwise(history)
        if before.status is RunStatus.DEQUEUED and after.status is RunStatus.EXECUTING
    ]
    assert len(starts) == 3
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]  # type: ignore[operator]
    assert gaps[0] >= 0.3 - 0.01
    assert gaps[1] >= 0.6 - 0.01


async def test_cancelling_an_executing_run_calls_on_cancel(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.client()
    path = tmp_path / "calls.txt"
    handle = await client.tasks.trigger("cancellable", {"path": str(path)})
    await eventually(lambda: "run:1" in lines(path), timeout=60)
    await client.runs.cancel(handle)
    await eventually(lambda: "on_cancel:1" in lines(path), timeout=30)
    assert (await client.runs.retrieve(handle)).status is RunStatus.CANCELED


@pytest.mark.parametrize("task_id", ["spin", "spin-def", "slow"])
async def test_max_duration_ends_the_run_timed_out_without_retry(
    cluster: Cluster, tmp_path: Path, task_id: str
) -> None:
    path = tmp_path / "calls.txt"
    client = cluster.client()
    handle = await client.tasks.trigger(task_id, {"path": str(path)})
    # Neighbours: some share the task process that is killed to stop the attempt; they run
    # again (without counting as a retry) and complete.
    neighbours = [await client.tasks.trigger("quick", {"n": n, "seconds": 1}) for n in range(4)]
    run = await finished(cluster, handle.id)
    assert run.status is RunStatus.TIMED_OUT
    assert run.attempt_count == 1  # retry.max_attempts is 3: never retried
    assert run.error is not None and run.error.type == "MaxDurationExceededError"
    if task_id == "slow":
        # ctx.signal fired with reason "timeout"; a timed-out attempt calls no further hooks.
        assert lines(path)[-1] == "signal(timeout):1"
        assert not any(c.startswith(("cleanup", "on_failure")) for c in lines(path))
    for n, neighbour in enumerate(neighbours):
        done = await finished(cluster, neighbour.id)
        assert done.status is RunStatus.COMPLETED
        assert done.output == {"machine": "small-1x", "n": n}


async def test_a_run_past_its_machines_memory_crashes_while_others_complete(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    hog = await client.tasks.trigger("hog", {"mb": 600})
    others = [await client.tasks.trigger("quick", {"n": n, "seconds": 0.5}) for n in range(4)]
    run = await finished(cluster, hog.id)
    assert run.status is RunStatus.CRASHED
    assert run.attempt_count == 1  # out-of-memory is not retried without retry.out_of_memory
    assert run.error is not None and run.error.type == "OutOfMemoryError"
    assert "micro" in run.error.message
    for n, handle in enumerate(others):
        done = await finished(cluster, handle.id)
        assert done.status is RunStatus.COMPLETED
        assert done.output == {"machine": "small-1x", "n": n}


async def test_a_run_within_its_machines_memory_completes(cluster: Cluster) -> None:
    run = await finished(cluster, (await cluster.client().tasks.trigger("hog", {"mb": 50})).id)
    assert run.status is RunStatus.COMPLETED
    assert run.output == "50 MB on micro"


async def test_out_of_memory_is_retried_on_the_named_machine(cluster: Cluster) -> None:
    handle = await cluster.client().tasks.trigger("hog-retry", {"mb": 400})
    run = await finished(cluster, handle.id)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.attempt_count == 2
    assert run.output == "400 MB on small-2x"


async def test_ctx_carries_the_run_attempt_task_queue_environment_and_machine(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger(
        "ctx-report", {}, tags=["a", "b"], idempotency_key="ctx-1", priority=5, max_attempts=4
    )
    run = await finished(cluster, handle.id)
    assert run.status is RunStatus.COMPLETED
    out = run.output
    assert out["run"]["id"] == handle.id
    assert out["run"]["tags"] == ["a", "b"]
    assert out["run"]["is_test"] is False
    assert out["run"]["is_replay"] is False
    assert out["run"]["idempotency_key"] == "ctx-1"
    assert out["run"]["max_attempts"] == 4
    assert out["run"]["priority"] == 5
    assert out["run"]["created_at"] == run.created_at.isoformat()  # type: ignore[union-attr]
    assert out["run"]["started_at"] is not None
    assert out["run"]["parent_run_id"] is None and out["run"]["root_run_id"] is None
    assert out["run"]["batch_id"] is None
    assert out["attempt"]["number"] == 1 and out["attempt"]["id"].startswith("attempt_")
    assert out["task"] == {"id": "ctx-report"}
    assert out["queue"] == {"name": "task/ctx-report"}
    assert out["environment"] == {
        "id": run.raw.environment_id,
        "slug": "dev",
        "type": "DEVELOPMENT",
    }
    assert out["machine"] == {"name": "small-1x", "cpu": 0.5, "memory": 0.5}


async def test_out_of_memory_neighbours_keep_running_in_parallel(cluster: Cluster) -> None:
    client = cluster.client()
    handles = await asyncio.gather(
        client.tasks.trigger("hog", {"mb": 600}), client.tasks.trigger("hog", {"mb": 10})
    )
    big, small = [await finished(cluster, h.id) for h in handles]
    assert big.status is RunStatus.CRASHED
    assert small.status is RunStatus.COMPLETED
