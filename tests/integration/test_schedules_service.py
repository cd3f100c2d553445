"""Schedules in a scheduler running in this process, against a real nats-server and a real database
(SQLite and PostgreSQL), over real gRPC on loopback.

The schedule clock runs 60 times faster than real time (``schedule_clock_speed``), so a minutely
cron ticks every second; everything else (firing, catch-up, the rows) is the production path.
Executors are stood in for by a WorkerService stream that registers a manifest and leaves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from sqlalchemy import func, select

import runplane
from runplane import ScheduledPayload
from runplane.v1 import worker_service_pb2 as wpb
from runplane.v1 import worker_service_pb2_grpc
from runplane_common.config import SchedulerSettings
from runplane_scheduler.app import Scheduler, start_scheduler
from runplane_scheduler.keys import create_key
from runplane_scheduler.schedules import ScaledClock
from runplane_scheduler.store import tables as db
from tests.helpers.wait import eventually

pytestmark = pytest.mark.timeout(120)

SPEED = 60.0
MINUTE = timedelta(minutes=1)
LONDON = ZoneInfo("Europe/London")


@pytest.fixture
def clock() -> ScaledClock:
    return ScaledClock(speed=SPEED, epoch_ms=time.time_ns() // 1_000_000)


async def _start(database_url: str, nats_url: str, clock: ScaledClock) -> Scheduler:
    return await start_scheduler(
        SchedulerSettings(
            database_url=database_url,
            nats_url=nats_url,
            listen="127.0.0.1:0",
            schedule_clock_speed=clock.speed,
            schedule_clock_epoch_ms=clock.epoch_ms,
        )
    )


@pytest.fixture
async def scheduler(
    database_url: str, nats_server: Any, clock: ScaledClock
) -> AsyncIterator[Scheduler]:
    s = await _start(database_url, nats_server.url, clock)
    yield s
    await s.stop()


async def _key(s: Scheduler) -> str:
    return await create_key(s.engine_db, "dev", execute=True)


def _client(s: Scheduler, key: str) -> runplane.Client:
    return runplane.Client(api_url=f"127.0.0.1:{s.port}", secret_key=key)


def _task(task_id: str, cron: str = "", timezone: str = "") -> wpb.TaskDefinition:
    definition = wpb.TaskDefinition(id=task_id)
    if cron:
        definition.schedule.cron = cron
        definition.schedule.timezone = timezone
    return definition


async def _register(s: Scheduler, key: str, *tasks: wpb.TaskDefinition) -> None:
    """Register a manifest as an executor would, then leave."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") as channel:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        leave = asyncio.Event()

        async def requests() -> AsyncIterator[wpb.ConnectRequest]:
            yield wpb.ConnectRequest(
                register=wpb.Register(manifest=wpb.Manifest(tasks=tasks), capacity=1)
            )
            await leave.wait()

        call = stub.Connect(requests(), metadata=(("authorization", f"Bearer {key}"),))
        try:
            first = await asyncio.wait_for(call.read(), 30)
            assert first.WhichOneof("message") == "registered"
        finally:
            leave.set()
            call.cancel()


async def _payloads(client: runplane.Client, task_id: str) -> list[ScheduledPayload]:
    """The payloads of the task's runs, oldest tick first."""
    runs = [run async for run in client.runs.list(task=task_id, page_size=100)]
    payloads = [ScheduledPayload.model_validate(run.payload) for run in runs]
    return sorted(payloads, key=lambda p: p.timestamp)


async def _count(s: Scheduler, table: Any) -> int:
    async with s.engine_db.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


def _check_payload(p: ScheduledPayload, kind: str) -> None:
    assert p.type == kind
    assert p.schedule_id.startswith("sched_")
    # The nominal tick: a whole minute, not when the run was made.
    assert p.timestamp.second == 0 and p.timestamp.microsecond == 0
    assert p.timestamp.tzinfo is not None
    assert p.upcoming == [p.timestamp + MINUTE * i for i in range(1, 6)]


async def test_a_declarative_schedule_is_synced_on_registration_fires_and_is_deactivated(
    scheduler: Scheduler, clock: ScaledClock
) -> None:
    key = await _key(scheduler)
    client = _client(scheduler, key)
    await _register(
        scheduler,
        key,
        _task("every-minute", "* * * * *"),
        _task("nightly", "30 2 * * *", "Europe/London"),
        _task("plain"),
    )
    found = {s.task_id: s async for s in client.schedules.list()}
    assert set(found) == {"every-minute", "nightly"}
    minutely, nightly = found["every-minute"], found["nightly"]
    assert minutely.type == "DECLARATIVE" and minutely.active
    assert (nightly.cron, nightly.timezone) == ("30 2 * * *", "Europe/London")
    assert nightly.next_run is not None
    assert nightly.next_run.astimezone(LONDON).strftime("%H:%M") in ("02:30", "03:30")

    async def two_ticks() -> list[ScheduledPayload]:
        payloads = await _payloads(client, "every-minute")
        assert len(payloads) >= 2
        return payloads

    first, second = (await eventually(two_ticks, 60))[:2]
    for p in (first, second):
        _check_payload(p, "DECLARATIVE")
        assert p.schedule_id == minutely.id
        assert p.timezone == "UTC" and p.external_id is None
    assert second.timestamp == first.timestamp + MINUTE
    assert second.last_timestamp == first.timestamp

    # The next registration no longer declares them: "every-minute" lost its cron, "nightly" its
    # task; with no other executor providing it, both are deactivated.
    await _register(scheduler, key, _task("every-minute"), _task("plain"))
    after = {s.task_id: s async for s in client.schedules.list()}
    assert not after["every-minute"].active and not after["nightly"].active
    assert after["every-minute"].next_run is None
    fired = len(await _payloads(client, "every-minute"))
    stop_at = clock.now_ms() + 3 * 60_000
    await eventually(lambda: clock.now_ms() > stop_at, 30)
    # At most a tick that was already firing when it was deactivated; an active schedule would
    # have fired three more times.
    assert len(await _payloads(client, "every-minute")) <= fired + 1

    # Declared again, it is active again (the same schedule).
    await _register(scheduler, key, _task("every-minute", "*/5 * * * *"))
    again = await client.schedules.retrieve(minutely.id)
    assert again.active and again.cron == "*/5 * * * *"


async def test_imperative_create_with_one_deduplication_key_twice_gives_one_schedule(
    scheduler: Scheduler,
) -> None:
    key = await _key(scheduler)
    client = _client(scheduler, key)
    await _register(scheduler, key, _task("report"), _task("other"))
    first = await client.schedules.create(
        task="report",
        cron="0 9 * * 1-5",
        timezone="America/New_York",
        external_id="user-42",
        deduplication_key="user-42-report",
    )
    second = await client.schedules.create(
        task="other",
        cron="0 * * * *",
        timezone="Australia/Sydney",
        external_id="user-42b",
        deduplication_key="user-42-report",
    )
    assert second.id == first.id
    assert (second.task_id, second.cron, second.timezone, second.external_id) == (
        "other",
        "0 * * * *",
        "Australia/Sydney",
        "user-42b",
    )
    assert second.type == "IMPERATIVE" and second.deduplication_key == "user-42-report"
    assert [s.id async for s in client.schedules.list()] == [first.id]
    assert await _count(scheduler, db.schedules) == 1

    # Without a key each create is a new schedule.
    a = await client.schedules.create(task="report", cron="0 0 * * *")
    b = await client.schedules.create(task="report", cron="0 0 * * *")
    assert a.id != b.id
    assert [s.id async for s in client.schedules.list(task="report")] == [a.id, b.id]

    # Update, deactivate, activate, delete.
    updated = await client.schedules.update(a, cron="15 3 L * *", external_id="x")
    assert (updated.cron, updated.external_id, updated.timezone) == ("15 3 L * *", "x", "UTC")
    assert updated.next_run is not None and updated.next_run.strftime("%H:%M") == "03:15"
    off = await client.schedules.deactivate(a)
    assert not off.active and off.next_run is None
    on = await client.schedules.activate(a.id)
    assert on.active and on.next_run == updated.next_run
    await client.schedules.delete(b)
    with pytest.raises(runplane.NotFoundError):
        await client.schedules.retrieve(b.id)
    zones = await client.schedules.timezones()
    assert {"UTC", "Europe/London", "America/New_York", "Australia/Sydney"} <= set(zones)
    assert "UTC" not in await client.schedules.timezones(exclude_utc=True)

    # A declarative schedule changes only in code.
    await _register(scheduler, key, _task("coded", "0 0 * * *"))
    (coded,) = [s async for s in client.schedules.list(task="coded")]
    with pytest.raises(runplane.FailedPreconditionError):
        await client.schedules.update(coded, cron="0 1 * * *")
    with pytest.raises(runplane.FailedPreconditionError):
        await client.schedules.delete(coded)


@pytest.mark.parametrize(
    ("options", "field", "named"),
    [
        ({"cron": "61 * * * *"}, "cron", "minute '61'"),
        ({"cron": "* * * *"}, "cron", "5 fields"),
        ({"cron": "0 0 * * FUNDAY"}, "cron", "day-of-week 'FUNDAY'"),
        ({"timezone": "Mars/Olympus_Mons"}, "timezone", "Mars/Olympus_Mons"),
        ({"task": "no-such-task"}, "task_id", "no-such-task"),
        ({"external_id": "x" * 300}, "external_id", "300 characters"),
    ],
)
async def test_bad_cron_time_zone_or_task_is_rejected_naming_the_field_and_writes_nothing(
    scheduler: Scheduler, options: dict[str, str], field: str, named: str
) -> None:
    key = await _key(scheduler)
    client = _client(scheduler, key)
    await _register(scheduler, key, _task("report"))
    request = {"task": "report", "cron": "0 * * * *", "deduplication_key": "k", **options}
    with pytest.raises(runplane.InvalidArgumentError) as caught:
        await client.schedules.create(**request)
    assert caught.value.field == field
    assert named in caught.value.message
    assert await _count(scheduler, db.schedules) == 0


async def test_a_bad_declared_schedule_refuses_the_registration_and_writes_nothing(
    scheduler: Scheduler,
) -> None:
    key = await _key(scheduler)
    tasks_before = await _count(scheduler, db.task_definitions)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _register(scheduler, key, _task("ok"), _task("bad", "0 25 * * *"))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "register.manifest.tasks[1].schedule.cron" in (caught.value.details() or "")
    assert "hour '25'" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _register(scheduler, key, _task("bad", "0 1 * * *", "Nowhere/Town"))
    assert "register.manifest.tasks[0].schedule.timezone" in (caught.value.details() or "")
    assert await _count(scheduler, db.schedules) == 0
    assert await _count(scheduler, db.task_definitions) == tasks_before


async def test_a_scheduler_stopped_over_several_ticks_makes_one_catch_up_run(
    database_url: str, nats_server: Any, clock: ScaledClock
) -> None:
    first = await _start(database_url, nats_server.url, clock)
    try:
        key = await _key(first)
        await _register(first, key, _task("tick"))
        client = _client(first, key)
        schedule = await client.schedules.create(
            task="tick", cron="* * * * *", external_id="ext-1", deduplication_key="tick"
        )
        await eventually(lambda: _at_least(client, "tick", 2), 60)
        await client.close()
    finally:
        await first.stop()

    engine = db.create_engine(database_url)
    try:
        async with engine.connect() as conn:
            last_fired = (
                await conn.execute(
                    select(db.schedules.c.last_run_at).where(db.schedules.c.id == schedule.id)
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    # Down for at least four ticks (on the schedule clock).
    await eventually(lambda: clock.now_ms() > last_fired + 4 * 60_000, 30)

    second = await _start(database_url, nats_server.url, clock)
    try:
        client = _client(second, key)
        last = datetime.fromtimestamp(last_fired / 1000, tz=UTC)

        async def resumed() -> list[ScheduledPayload]:
            payloads = await _payloads(client, "tick")
            assert any(p.timestamp > last for p in payloads)
            return payloads

        payloads = await eventually(resumed, 60)
        before = [p for p in payloads if p.timestamp <= last]
        after = [p for p in payloads if p.timestamp > last]
        catch_up = after[0]
        # One run for the missed ticks: the latest of them, not one per tick.
        assert catch_up.timestamp >= last + 4 * MINUTE
        assert catch_up.last_timestamp == last
        _check_payload(catch_up, "IMPERATIVE")
        assert (catch_up.schedule_id, catch_up.external_id) == (schedule.id, "ext-1")
        # Before the stop, every tick fired once; none fired twice across the restart.
        assert [p.timestamp for p in before] == [
            before[0].timestamp + MINUTE * i for i in range(len(before))
        ]
        stamps = [p.timestamp for p in payloads]
        assert len(stamps) == len(set(stamps))
        await client.close()
    finally:
        await second.stop()


async def _at_least(client: runplane.Client, task_id: str, n: int) -> bool:
    return len(await _payloads(client, task_id)) >= n
