"""Eviction of waiting runs from executor memory (issue 7, W4): an executor with a low cap on
resident waits, or a short evict-after, drops waiting attempts; their runs resume by replay
from the journal with the right outputs, the same attempt number, children not triggered twice,
and the code before the wait run once per execution. Scheduler, realtime and NATS are real
processes; the executor under test runs in this process so its pool can be inspected."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import runplane
from runplane import RunStatus
from runplane_common.config import ExecutorSettings
from runplane_executor.app import Executor
from runplane_scheduler.store import tables as db
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

# The cluster's own executor provides other tasks: runs of tests.e2e.evict_tasks go to ours.
CLUSTER_TASKS = "examples.hello"

StartExecutor = Callable[..., Awaitable[Executor]]


@pytest.fixture
async def start_executor(cluster: Cluster) -> AsyncIterator[StartExecutor]:
    started: list[Executor] = []

    async def start(**settings: Any) -> Executor:
        executor = Executor(
            ExecutorSettings(
                modules=["tests.e2e.evict_tasks"],
                api_url=cluster.api_url,
                secret_key=cluster.worker_keys["dev"],
                processes=2,
                cancel_grace=1.0,
                **settings,
            )
        )
        started.append(executor)
        await executor.start()
        await eventually(lambda: executor.connected, 60, description="executor connected")
        return executor

    yield start
    for executor in started:
        await executor.stop()


async def _attempts(database_url: str, run_id: str) -> list[tuple[int, str]]:
    engine = db.create_engine(database_url)
    try:
        async with engine.connect() as conn:
            a = db.attempts.c
            rows = (
                await conn.execute(
                    select(a.number, a.status).where(a.run_id == run_id).order_by(a.created_at)
                )
            ).all()
        return [(r.number, r.status) for r in rows]
    finally:
        await engine.dispose()


async def _statuses(client: runplane.Client, run_ids: list[str]) -> list[RunStatus]:
    return [(await client.runs.retrieve(r)).status for r in run_ids]


def _executions(notes: Path, run_id: str) -> list[list[str]]:
    """The run's notes, one list per execution (each starts with its "start" line)."""
    out: list[list[str]] = []
    for line in (notes / run_id).read_text().splitlines():
        if line.startswith("start"):
            out.append([])
        out[-1].append(line)
    return out


async def test_a_cap_of_5_keeps_at_most_5_of_50_waiting_runs_resident_and_all_resume(
    cluster: Cluster, start_executor: StartExecutor, tmp_path: Path
) -> None:
    executor = await start_executor(max_resident_waits=5, evict_waits_after=0)
    client = cluster.client()
    wait = runplane.WaitAPI(client)
    token = await wait.create_token()
    tag = f"e-{uuid.uuid4().hex[:8]}"
    batch = await client.tasks.batch_trigger(
        "evict-parent",
        [
            {"payload": {"n": n, "token": token.id, "tag": tag, "dir": str(tmp_path)}}
            for n in range(50)
        ],
    )
    run_ids = [h.id for h in batch.runs]

    async def all_waiting() -> bool:
        statuses = await _statuses(client, run_ids)
        assert statuses.count(RunStatus.WAITING) == 50, statuses
        return executor.pool.waits.waiting + executor.pool.waits.evicted >= 50

    await eventually(all_waiting, 180, description="50 runs WAITING", interval=0.5)
    policy = executor.pool.waits
    await eventually(
        lambda: policy.waiting == policy.resident == 5, 30, description="5 settled, resident"
    )
    assert policy.high_water <= 5
    assert policy.evicted >= 45
    # Evicted attempts are gone from the pool (and their task processes).
    await eventually(lambda: executor.pool.running == 5, 30, description="5 attempts in memory")

    await wait.complete_token(token.id, {"go": 1})
    runs = [await client.runs.poll(r, interval=0.2, timeout=180) for r in run_ids]
    for n, run in enumerate(runs):
        assert run.status is RunStatus.COMPLETED, (run, cluster.logs())
        assert run.output == {"n": n, "child": {"double": 2 * n}, "token": {"go": 1}}
        assert run.attempt_count == 1
    assert policy.high_water <= 5
    children = [r async for r in client.runs.list(tag=tag, page_size=100)]
    assert len(children) == 50  # the replays found their child in the journal

    replayed = 0
    for run in runs:
        attempts = await _attempts(cluster.database_url, run.id)
        executions = _executions(tmp_path, run.id)
        # One execution per attempt row, each numbered 1: the lost ones are the evicted
        # executions, and the code before the wait ran once in each.
        assert [n for n, _ in attempts] == [1] * len(attempts)
        assert [s for _, s in attempts] == ["LOST"] * (len(attempts) - 1) + ["COMPLETED"]
        assert len(executions) == len(attempts)
        replayed += len(attempts) > 1
    assert replayed >= 45


async def test_a_token_wait_evicted_after_evict_after_resumes_by_replay_with_its_hooks(
    cluster: Cluster, start_executor: StartExecutor, tmp_path: Path
) -> None:
    executor = await start_executor(max_resident_waits=0, evict_waits_after=1)
    client = cluster.client()
    wait = runplane.WaitAPI(client)
    token = await wait.create_token()
    tag = f"t-{uuid.uuid4().hex[:8]}"
    handle = await client.tasks.trigger(
        "evict-parent", {"n": 4, "token": token.id, "tag": tag, "dir": str(tmp_path)}
    )
    policy = executor.pool.waits
    await eventually(lambda: policy.evicted >= 1, 60, description="the token wait evicted")
    await eventually(lambda: executor.pool.running == 0, 30, description="no attempt in memory")
    assert (await client.runs.retrieve(handle.id)).status is RunStatus.WAITING

    await wait.complete_token(token.id, "approved")
    run = await client.runs.poll(handle.id, interval=0.2, timeout=120)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == {"n": 4, "child": {"double": 8}, "token": "approved"}
    assert run.attempt_count == 1
    assert await _attempts(cluster.database_url, handle.id) == [(1, "LOST"), (1, "COMPLETED")]
    assert len([r async for r in client.runs.list(tag=tag)]) == 1
    assert f"run {handle.id} resumes by replay" in cluster.scheduler.log()
    # The evicted execution ran cleanup only (no on_failure, on_cancel or on_resume); the
    # replay saw its journaled child again and then the token's result.
    assert _executions(tmp_path, handle.id) == [
        [
            "start attempt=1",
            "on_wait:children",
            "on_resume:children",
            "on_wait:token",
            "cleanup",
        ],
        [
            "start attempt=1",
            "on_wait:children",
            "on_resume:children",
            "on_wait:token",
            "on_resume:token",
            "on_success",
            "cleanup",
        ],
    ]


async def test_a_long_duration_wait_is_evicted_once_settled_and_a_short_one_stays(
    cluster: Cluster, start_executor: StartExecutor, tmp_path: Path
) -> None:
    executor = await start_executor(max_resident_waits=0, evict_waits_after=2)
    client = cluster.client()
    short = await client.tasks.trigger(
        "evict-parent", {"n": 1, "seconds": 1.5, "tag": "short", "dir": str(tmp_path)}
    )
    long = await client.tasks.trigger(
        "evict-parent", {"n": 2, "seconds": 6, "tag": "long", "dir": str(tmp_path)}
    )
    done = [await client.runs.poll(h.id, interval=0.2, timeout=120) for h in (short, long)]
    assert [r.status for r in done] == [RunStatus.COMPLETED] * 2, cluster.logs()
    assert done[1].output == {"n": 2, "child": {"double": 4}, "token": None}
    assert await _attempts(cluster.database_url, short.id) == [(1, "COMPLETED")]
    assert await _attempts(cluster.database_url, long.id) == [(1, "LOST"), (1, "COMPLETED")]
    assert executor.pool.waits.evicted == 1


async def test_an_evicted_run_resumes_after_a_scheduler_restart(
    cluster: Cluster, start_executor: StartExecutor, tmp_path: Path
) -> None:
    """The restarted scheduler loads the run as suspended in this executor: its resume reaches
    the executor, which reports the attempt lost, and the run is replayed without a retry."""
    executor = await start_executor(max_resident_waits=0, evict_waits_after=1)
    client = cluster.client()
    wait = runplane.WaitAPI(client)
    token = await wait.create_token()
    tag = f"r-{uuid.uuid4().hex[:8]}"
    handle = await client.tasks.trigger(
        "evict-parent", {"n": 3, "token": token.id, "tag": tag, "dir": str(tmp_path)}
    )
    await eventually(lambda: executor.pool.waits.evicted >= 1, 60, description="evicted")
    await eventually(lambda: executor.pool.running == 0, 30, description="no attempt in memory")
    await cluster.restart_scheduler()
    await wait.complete_token(token.id, "after restart")
    run = await client.runs.poll(handle.id, interval=0.2, timeout=120)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == {"n": 3, "child": {"double": 6}, "token": "after restart"}
    assert run.attempt_count == 1
    assert await _attempts(cluster.database_url, handle.id) == [(1, "LOST"), (1, "COMPLETED")]
    assert len([r async for r in client.runs.list(tag=tag)]) == 1
