"""Durable waits under faults (issue 4): an executor killed while its run waits, a scheduler
killed during a wait, and 2,000 runs waiting at once on one executor. Real processes, NATS,
SQLite and PostgreSQL. The cluster's lease timeout is 3 s."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

import runplane
from runplane import RunStatus
from runplane_cli.dev import wait_serving
from runplane_scheduler.store import tables as db
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture
async def cluster(tmp_path: Path, nats_server, database_url: str) -> AsyncIterator[Cluster]:  # type: ignore[no-untyped-def]
    c = Cluster(tmp_path, nats_server.url, database_url, tasks="examples.waits")
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def _final(client: runplane.Client, run_id: str, timeout: float = 120) -> runplane.Run:
    return await client.runs.poll(run_id, interval=0.1, timeout=timeout)


async def _journaled(database_url: str, run_id: str, seq: int) -> bool:
    engine = db.create_engine(database_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    select(db.waitpoints.c.id).where(
                        db.waitpoints.c.run_id == run_id, db.waitpoints.c.seq == seq
                    )
                )
            ).first()
        return row is not None
    finally:
        await engine.dispose()


async def _status_counts(database_url: str, task_id: str) -> dict[str, int]:
    engine = db.create_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(db.runs.c.status, func.count())
                    .where(db.runs.c.task_id == task_id)
                    .group_by(db.runs.c.status)
                )
            ).all()
        return {r[0]: r[1] for r in rows}
    finally:
        await engine.dispose()


async def test_kill_9_of_the_executor_while_a_run_waits_on_a_token(cluster: Cluster) -> None:
    client = cluster.client()
    wait = runplane.WaitAPI(client)
    tag = f"k-{uuid.uuid4().hex[:8]}"
    token = await wait.create_token(timeout="10m")
    handle = await client.tasks.trigger("child-then-token", {"token": token.id, "tag": tag})

    async def waiting_on_the_token() -> bool:
        run = await client.runs.retrieve(handle.id)
        return run.status is RunStatus.WAITING and await _journaled(
            cluster.database_url, handle.id, 2
        )

    await eventually(waiting_on_the_token, 60, description="the run waits on the token")
    cluster.executor.kill()
    await wait.complete_token(token.id, {"approved": True})
    await cluster.start_executor()
    run = await _final(client, handle.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == {"child": {"n": 21, "double": 42}, "token": {"approved": True}}
    children = [r async for r in client.runs.list(tag=tag)]
    assert len(children) == 1, children  # the replay found the child in the journal
    assert children[0].parent_run_id == handle.id
    assert f"run {handle.id} resumes by replay" in cluster.scheduler.log()


async def test_a_task_process_dying_under_a_waiting_run_resumes_it_by_replay(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.client()
    wait = runplane.WaitAPI(client)
    tag = f"p-{uuid.uuid4().hex[:8]}"
    pid_file = tmp_path / "pid"
    token = await wait.create_token()
    handle = await client.tasks.trigger(
        "pid-then-token", {"token": token.id, "tag": tag, "pid_file": str(pid_file)}
    )

    async def waiting_on_the_token() -> bool:
        run = await client.runs.retrieve(handle.id)
        return run.status is RunStatus.WAITING and await _journaled(
            cluster.database_url, handle.id, 2
        )

    await eventually(waiting_on_the_token, 60, description="the run waits on the token")
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    await eventually(
        lambda: (
            "task process 0 exited" in cluster.executor.log()
            or "task process 1 exited" in cluster.executor.log()
        ),
        30,
        description="the executor noticed its task process died",
    )
    await wait.complete_token(token.id, 9)
    run = await _final(client, handle.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == {"child": {"n": 5, "double": 10}, "token": 9}
    assert len([r async for r in client.runs.list(tag=tag)]) == 1
    assert f"run {handle.id} resumes by replay" in cluster.scheduler.log()


async def test_a_scheduler_killed_during_a_wait_loses_nothing(cluster: Cluster) -> None:
    client = cluster.client()
    wait = runplane.WaitAPI(client)
    token = await wait.create_token()
    sleeper = await client.tasks.trigger("sleeper", {"seconds": 3})
    waiter = await client.tasks.trigger("token-waiter", {"token": token.id})
    for handle in (sleeper, waiter):
        await eventually(
            lambda h=handle: _is_waiting(client, h.id), 60, description=f"{handle.id} waits"
        )
    cluster.scheduler.kill()
    cluster.scheduler.start()
    await wait_serving(cluster.api_url, 60)
    await wait.complete_token(token.id, "go")
    run = await _final(client, sleeper.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output["after"] - run.output["before"] >= 3
    run = await _final(client, waiter.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == {"ok": True, "output": "go"}


async def _is_waiting(client: runplane.Client, run_id: str) -> bool:
    return (await client.runs.retrieve(run_id)).status is RunStatus.WAITING


@pytest.mark.timeout(900)
async def test_2000_runs_waiting_at_once_on_one_executor_all_resume(cluster: Cluster) -> None:
    client = cluster.client()
    wait = runplane.WaitAPI(client)
    token = await wait.create_token()
    for _ in range(2):
        await client.tasks.batch_trigger(
            "token-waiter", [{"payload": {"token": token.id}} for _ in range(1000)]
        )

    async def all_waiting() -> dict[str, int]:
        counts = await _status_counts(cluster.database_url, "token-waiter")
        assert counts.get("WAITING") == 2000, counts
        return counts

    await eventually(all_waiting, 400, description="2000 runs WAITING", interval=1)
    await wait.complete_token(token.id, {"n": 7})

    async def all_completed() -> dict[str, int]:
        counts = await _status_counts(cluster.database_url, "token-waiter")
        assert counts.get("COMPLETED") == 2000, counts
        return counts

    await eventually(all_completed, 400, description="2000 runs COMPLETED", interval=1)
    outputs = {r.output["output"]["n"] async for r in client.runs.list(task="token-waiter")}
    assert outputs == {7}
