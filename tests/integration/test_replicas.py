"""Scheduler replicas on one PostgreSQL database: the lease, its fencing, forwarding from a
standby (unary calls, an executor's stream, a wait token's URL), and taking over; SQLite's
refusal of a second replica."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select, update

import runplane
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import run_service_pb2_grpc
from runplane_common.config import SchedulerSettings
from runplane_common.errors import FailedPrecondition
from runplane_scheduler.app import Scheduler, start_scheduler
from runplane_scheduler.keys import create_key
from runplane_scheduler.store import leases
from runplane_scheduler.store import tables as db
from runplane_scheduler.store.writer import Fenced
from tests.helpers.cluster import Cluster
from tests.helpers.metrics import scrape, value
from tests.helpers.registration import register_tasks
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.timeout(180), pytest.mark.postgres]


def _settings(database_url: str, nats_url: str, name: str, **extra: Any) -> SchedulerSettings:
    return SchedulerSettings(
        database_url=database_url,
        nats_url=nats_url,
        listen="127.0.0.1:0",
        replica_id=name,
        replica_lease=2.0,
        **extra,
    )


@pytest.fixture
async def pg_url(database_url: str) -> str:
    if not database_url.startswith("postgresql"):
        pytest.skip("replicas share a PostgreSQL database")
    return database_url


async def _lease(url: str) -> leases.Lease | None:
    engine = db.create_engine(url)
    try:
        return await leases.current(engine)
    finally:
        await engine.dispose()


async def test_a_lapsed_lease_is_taken_with_the_next_token_and_fences_the_old_holder(
    pg_url: str,
) -> None:
    engine = db.create_engine(pg_url)
    try:
        await db.upgrade(engine)
        mine, first = await leases.acquire(engine, "a", 30, "a:1", "http://a")
        assert mine and first is not None and first.token == 1
        # Held and unexpired: another replica stands by.
        taken, seen = await leases.acquire(engine, "b", 30, "b:1", "http://b")
        assert not taken and seen is not None and seen.holder == "a"
        assert await leases.renew(engine, first, 30) is not None
        async with engine.begin() as conn:
            assert await leases.fence(conn, first)
        # "a" is paused past its lease: "b" takes it, and everything of "a" is refused.
        async with engine.begin() as conn:
            await conn.execute(update(db.scheduler_leases).values(expires_at=0.0))
        taken, second = await leases.acquire(engine, "b", 30, "b:1", "http://b")
        assert taken and second is not None and (second.holder, second.token) == ("b", 2)
        assert await leases.renew(engine, first, 30) is None
        async with engine.begin() as conn:
            assert not await leases.fence(conn, first)
            assert await leases.fence(conn, second)
    finally:
        await engine.dispose()


@pytest.fixture
async def leader_and_standby(
    pg_url: str, nats_server: Any, tmp_path: Path
) -> AsyncIterator[tuple[Cluster, Scheduler]]:
    """The leader as a process (Cluster, no executor), a standby in this process."""
    cluster = Cluster(
        tmp_path, nats_server.url, pg_url, env={"RUNPLANE_REPLICA_LEASE_SECONDS": "2"}
    )
    await cluster.start(executor=False)
    standby = await start_scheduler(_settings(pg_url, nats_server.url, "standby"))
    try:
        yield cluster, standby
    finally:
        await standby.stop()
        await cluster.stop()


async def test_a_standby_forwards_calls_and_an_executors_stream_then_takes_over(
    leader_and_standby: tuple[Cluster, Scheduler],
) -> None:
    cluster, standby = leader_and_standby
    lease = await _lease(cluster.database_url)
    assert lease is not None and lease.grpc_address == cluster.api_url
    assert not standby.leadership.leading
    standby_url = f"127.0.0.1:{standby.port}"
    assert value(await scrape(standby.http_url), "runplane_scheduler_leader") == 0.0
    # An executor pointed at the standby: its session is forwarded to the leader.
    await cluster.add_executor(
        "executor-a", "examples.hello", env={"RUNPLANE_API_URL": standby_url}
    )
    client = runplane.Client(api_url=standby_url, secret_key=cluster.keys["dev"])
    handle = await client.tasks.trigger("hello-world", {"name": "standby"})
    run = await client.runs.poll(handle, timeout=60)
    assert run.status is runplane.RunStatus.COMPLETED
    assert run.output["message"] == "Hello, standby!"
    # A refusal comes back as the leader gave it: status, message and details.
    with pytest.raises(runplane.ApiError) as missing:
        await client.runs.retrieve("run_" + "0" * 26)
    assert missing.value.code is grpc.StatusCode.NOT_FOUND, missing.value
    with pytest.raises(runplane.ApiError) as bad:
        await client.tasks.trigger("hello-world", {"name": "x"}, tags=["x" * 200])
    assert bad.value.code is grpc.StatusCode.INVALID_ARGUMENT and bad.value.field, bad.value
    # The leader stops cleanly: it gives the lease up and the standby leads at once.
    await cluster.scheduler.stop()
    await eventually(lambda: _leads(standby), timeout=30, description="the standby leads")
    lease = await _lease(cluster.database_url)
    assert lease is not None and (lease.holder, lease.token) == ("standby", 2)
    # The executor, pointed at it, reconnects; runs triggered before and after complete.
    second = await client.tasks.trigger("hello-world", {"name": "again"})
    run = await client.runs.poll(second, timeout=60)
    assert run.status is runplane.RunStatus.COMPLETED
    assert value(await scrape(standby.http_url), "runplane_scheduler_leader") == 1.0


async def _leads(s: Scheduler) -> bool:
    return s.leadership.leading


async def test_a_leader_whose_lease_was_taken_writes_nothing_more(
    pg_url: str, nats_server: Any
) -> None:
    leader = await start_scheduler(_settings(pg_url, nats_server.url, "old"))
    try:
        assert leader.leadership.leading
        key = await create_key(leader.engine_db, "dev", execute=True)
        await register_tasks(f"127.0.0.1:{leader.port}", key)
        # Another replica takes the lease (as if "old" had been paused past it).
        async with leader.engine_db.begin() as conn:
            await conn.execute(update(db.scheduler_leases).values(expires_at=0.0))
        mine, _ = await leases.acquire(leader.engine_db, "new", 30, "new:1", "http://new")
        assert mine
        async with grpc.aio.insecure_channel(f"127.0.0.1:{leader.port}") as channel:
            stub = run_service_pb2_grpc.RunServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.TriggerRun(
                    rpb.TriggerRunRequest(task_id="not-deployed", payload="{}"),
                    metadata=(("authorization", f"Bearer {key}"),),
                    timeout=10,
                )
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value
        assert "lost its lease" in (refused.value.details() or ""), refused.value
        await eventually(
            lambda: _lost(leader), timeout=10, description="the old leader knows it lost"
        )
        async with leader.engine_db.connect() as conn:
            count = (await conn.execute(select(db.runs.c.id))).all()
        assert count == []
        assert Fenced.reason == "REPLICA_FENCED"
    finally:
        await leader.stop()


async def _lost(s: Scheduler) -> bool:
    return s.leadership.lost.is_set()


async def test_sqlite_refuses_a_second_replica(tmp_path: Path, nats_server: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'one.db'}"
    first = await start_scheduler(_settings(url, nats_server.url, "first"))
    try:
        with pytest.raises(FailedPrecondition, match="SQLite takes one scheduler replica"):
            await start_scheduler(_settings(url, nats_server.url, "second"))
    finally:
        await first.stop()
    # Once the first has stopped, the database is free again.
    again = await start_scheduler(_settings(url, nats_server.url, "again"))
    await again.stop()


async def test_a_wait_token_url_posted_to_a_standby_completes_on_the_leader(
    leader_and_standby: tuple[Cluster, Scheduler],
) -> None:
    cluster, standby = leader_and_standby
    client = runplane.Client(api_url=cluster.api_url, secret_key=cluster.keys["dev"])
    wait = runplane.WaitAPI(client)
    token = await wait.create_token(timeout="1h")
    # The token's URL names the leader; the same path on the standby's port is forwarded.
    path = token.url.split("/", 3)[3]
    request = urllib.request.Request(
        f"{standby.http_url}/{path}", data=b'{"ok": true}', method="POST"
    )
    # In a thread: the standby answering it runs on this event loop.
    with await asyncio.to_thread(urllib.request.urlopen, request, timeout=30) as answer:
        assert answer.status == 200
    completed = await wait.retrieve_token(token.id)
    assert completed.status == "COMPLETED"
