"""Fault injection under load, each followed by a ledger check (``tests.helpers.load``).

Every test triggers a bounded load at a fixed rate (quick runs and 1-2 s sleeps of
``fault-echo``, each trigger retried with its own idempotency key until the API takes it), injects
one fault mid-load, and then checks the ledger: every run completed once with its own output,
JetStream holds each of its versions once and in order, and the subscribers saw them end final.

The cluster's lease timeout is 3 s, so a lost executor is noticed in about 3 s.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import nats
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

import runplane
from runplane import RunStatus
from runplane_cli.dev import wait_serving
from runplane_common import subjects
from runplane_common.config import SchedulerSettings
from runplane_scheduler.app import Scheduler, start_scheduler
from runplane_scheduler.keys import create_key
from runplane_scheduler.store import tables as db
from tests.helpers.cluster import Cluster
from tests.helpers.load import TASK, Load, load_with_fault
from tests.helpers.nats import NatsServer
from tests.helpers.private_postgres import PrivatePostgres
from tests.helpers.registration import register_in

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


# -- faults --------------------------------------------------------------------------------------


async def test_kill_9_of_the_executor_mid_load(cluster: Cluster, nats_server: NatsServer) -> None:
    async def fault(load: Load) -> None:
        cluster.executor.kill()
        await cluster.start_executor()

    _, runs = await load_with_fault(cluster, nats_server.url, fault)
    assert any(r.attempt_count > 1 for r in runs.values()), "the kill interrupted no attempt"


async def test_kill_9_of_the_scheduler_mid_load(cluster: Cluster, nats_server: NatsServer) -> None:
    async def fault(load: Load) -> None:
        cluster.scheduler.kill()
        cluster.scheduler.start()
        await wait_serving(cluster.api_url, 60)

    load, _ = await load_with_fault(cluster, nats_server.url, fault)
    assert load.retried, "no trigger met the scheduler down: the fault came too late"


async def test_kill_9_of_the_realtime_service_mid_load(
    cluster: Cluster, nats_server: NatsServer
) -> None:
    async def fault(load: Load) -> None:
        await asyncio.sleep(0.5)  # the watched subscriptions are streaming
        cluster.realtime.kill()
        load.went_down()
        await asyncio.sleep(0.5)
        cluster.realtime.start()
        await wait_serving(cluster.realtime_url, 60)

    load, _ = await load_with_fault(cluster, nats_server.url, fault)
    # Down for 0.5 s at least: whatever came later came through a resumed subscription.
    assert load.watched_across_outage(after=0.3), "no subscription resumed after the kill"


async def test_nats_stopped_and_restarted_mid_load(
    cluster: Cluster, nats_server: NatsServer
) -> None:
    async def fault(load: Load) -> None:
        await nats_server.stop()
        load.went_down()
        await asyncio.sleep(2.0)
        await nats_server.start()

    load, _ = await load_with_fault(cluster, nats_server.url, fault)
    assert load.watched_across_outage(), "no subscription was open through the outage"


@pytest.mark.postgres
async def test_postgresql_restarted_mid_load(
    pg_cluster: Cluster, nats_server: NatsServer, private_postgres: PrivatePostgres
) -> None:
    async def fault(load: Load) -> None:
        await private_postgres.restart(down_for=1.5)

    load, _ = await load_with_fault(pg_cluster, nats_server.url, fault)
    assert load.retried, "no trigger met the database down: the fault came too late"


# -- the load gate -------------------------------------------------------------------------------


async def test_load_gate_trigger_to_start_latency(cluster: Cluster) -> None:
    """50 triggers a second for 10 s: the average run starts within 1 s of its trigger."""
    client = cluster.client()
    load = Load(client, count=500, rate=50.0, sleeps=lambda i: 0.0)
    try:
        start = time.monotonic()
        await load.run()
        triggering = time.monotonic() - start
        runs = await load.finished(timeout=120)
    finally:
        await client.close()
    assert all(r.status is RunStatus.COMPLETED for r in runs.values())
    latencies = sorted(
        (r.started_at - r.created_at).total_seconds()
        for r in runs.values()
        if r.started_at is not None and r.created_at is not None
    )
    assert len(latencies) == load.count
    mean = statistics.fmean(latencies)
    p95 = latencies[int(0.95 * len(latencies))]
    summary = (
        f"{load.count} triggers in {triggering:.1f}s; trigger-to-start mean {mean * 1000:.0f} ms, "
        f"p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms"
    )
    print(summary)
    assert triggering < 15, f"the triggers themselves could not keep up: {summary}"
    assert mean < 1.0, summary


# -- the scheduler while PostgreSQL is down ------------------------------------------------------


async def _scheduler_on(
    private_postgres: PrivatePostgres, nats_server: NatsServer
) -> tuple[Scheduler, runplane.Client]:
    scheduler = await start_scheduler(
        SchedulerSettings(
            database_url=private_postgres.url, nats_url=nats_server.url, listen="127.0.0.1:0"
        )
    )
    key = await create_key(scheduler.engine_db, "dev")
    await register_in(scheduler, "dev", (TASK,))  # known, with nobody to run it
    return scheduler, runplane.Client(api_url=f"127.0.0.1:{scheduler.port}", secret_key=key)


@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_the_scheduler_serves_again_once_postgresql_is_back(
    private_postgres: PrivatePostgres, nats_server: NatsServer
) -> None:
    scheduler, client = await _scheduler_on(private_postgres, nats_server)
    try:
        before = await client.tasks.trigger(TASK, {"i": 0})
        await asyncio.to_thread(private_postgres.stop)
        with pytest.raises(runplane.ApiError):
            await client.tasks.trigger(TASK, {"i": 1})
        await asyncio.to_thread(private_postgres.start)
        deadline = time.monotonic() + 20
        while True:  # the pool's first connections after the restart may still fail
            try:
                after = await client.tasks.trigger(TASK, {"i": 2})
                break
            except runplane.ApiError:
                assert time.monotonic() < deadline, "the scheduler never recovered"
                await asyncio.sleep(0.2)
        assert (await client.runs.retrieve(before)).payload == {"i": 0}
        assert (await client.runs.retrieve(after)).payload == {"i": 2}
        ids = [r.id async for r in client.runs.list()]
        assert ids == [after.id, before.id], "the refused trigger made a run"
    finally:
        await client.close()
        await scheduler.stop()


@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_the_api_answers_unavailable_while_postgresql_is_down(
    private_postgres: PrivatePostgres, nats_server: NatsServer
) -> None:
    scheduler, client = await _scheduler_on(private_postgres, nats_server)
    try:
        handle = await client.tasks.trigger(TASK, {"i": 0})
        await asyncio.to_thread(private_postgres.stop)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "TriggerRun": lambda: client.tasks.trigger(TASK, {"i": 1}),
            "GetRun": lambda: client.runs.retrieve(handle),
            "CancelRun": lambda: client.runs.cancel(handle),
            "ListRuns": lambda: anext(aiter(client.runs.list())),
        }
        codes = {}
        for name, call in calls.items():
            try:
                await call()
                codes[name] = "OK"
            except runplane.ApiError as error:
                codes[name] = error.code.name
        assert codes == dict.fromkeys(calls, "UNAVAILABLE")
    finally:
        await client.close()
        await scheduler.stop()


@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_the_api_answers_unavailable_while_postgresql_shuts_down(
    private_postgres: PrivatePostgres, nats_server: NatsServer
) -> None:
    scheduler, client = await _scheduler_on(private_postgres, nats_server)
    holder = db.create_engine(private_postgres.url)
    try:
        handle = await client.tasks.trigger(TASK, {"i": 0})
        async with holder.connect() as held:  # keeps the smart shutdown from finishing
            await held.execute(select(1))
            await asyncio.to_thread(private_postgres.begin_smart_shutdown)
            await asyncio.sleep(0.5)
            await scheduler.engine_db.dispose()  # every call now needs a new connection
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "TriggerRun": lambda: client.tasks.trigger(TASK, {"i": 1}),
                "GetRun": lambda: client.runs.retrieve(handle),
                "CancelRun": lambda: client.runs.cancel(handle),
                "ListRuns": lambda: anext(aiter(client.runs.list())),
            }
            codes = {}
            for name, call in calls.items():
                try:
                    await call()
                    codes[name] = "OK"
                except runplane.ApiError as error:
                    codes[name] = f"{error.code.name}: {error.message[:120]}"
        # A session the server already had may still serve a call; no call may answer otherwise.
        assert any(code != "OK" for code in codes.values()), "the shutdown refused nothing"
        assert all(code == "OK" or code.startswith("UNAVAILABLE") for code in codes.values()), codes
    finally:
        await holder.dispose()
        await client.close()
        await scheduler.stop()


async def _outbox_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return len((await conn.execute(select(db.outbox.c.event_id))).all())


@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_the_relay_survives_a_database_outage_while_catching_up(
    private_postgres: PrivatePostgres, nats_server: NatsServer
) -> None:
    """At start the relay reads the outbox to catch up; the database failing under that read
    must not stop it for good."""
    await nats_server.stop()  # the relay waits for NATS before it reads the outbox
    scheduler, client = await _scheduler_on(private_postgres, nats_server)
    try:
        first = await client.tasks.trigger(TASK, {"i": 0})
        await asyncio.to_thread(private_postgres.stop)
        await nats_server.start()
        await asyncio.sleep(3.0)  # the relay connects and tries to catch up, against no database
        await asyncio.to_thread(private_postgres.start)
        deadline = time.monotonic() + 20
        while True:
            try:
                second = await client.tasks.trigger(TASK, {"i": 1})
                break
            except runplane.ApiError:
                assert time.monotonic() < deadline, "the scheduler never recovered"
                await asyncio.sleep(0.2)
        deadline = time.monotonic() + 10
        while (left := await _outbox_rows(scheduler.engine_db)) > 0:
            relay = getattr(scheduler.relay, "_task", None)  # for the message only
            assert time.monotonic() < deadline, f"{left} events never left the outbox; {relay}"
            await asyncio.sleep(0.2)
        nc = await nats.connect(nats_server.url)
        try:
            info = await nc.jetstream().stream_info(subjects.RUN_EVENTS_STREAM)
        finally:
            await nc.close()
        assert info.state.messages == 2, f"{first.id} and {second.id} created; {info.state}"
    finally:
        await client.close()
        await scheduler.stop()
