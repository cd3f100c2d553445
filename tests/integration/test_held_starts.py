"""An attempt's start reported with its result (the executor held it back) against the real
scheduler, over a hand-driven worker stream: one write records both, and the run's events are
the same as when the start is reported on its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from sqlalchemy import select

import runplane
from runplane.v1 import events_pb2, worker_service_pb2_grpc
from runplane.v1 import worker_service_pb2 as wpb
from runplane_common.config import SchedulerSettings
from runplane_scheduler.app import Scheduler, start_scheduler
from runplane_scheduler.keys import create_key
from runplane_scheduler.store import tables as db
from tests.helpers.events import stream_events
from tests.helpers.wait import eventually

pytestmark = pytest.mark.timeout(90)

TASK = "held-start"


class Worker:
    """A worker stream driven by the test: it registers TASK and hands over assignments."""

    def __init__(self, scheduler: Scheduler, key: str) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}")
        self.outgoing: asyncio.Queue[wpb.ConnectRequest | None] = asyncio.Queue()
        self.assignments: asyncio.Queue[wpb.Assignment] = asyncio.Queue()
        self.registered = asyncio.Event()
        register = wpb.Register(
            executor_id="exec_test",
            manifest=wpb.Manifest(tasks=[wpb.TaskDefinition(id=TASK)], version="1"),
            capacity=4,
        )
        self.outgoing.put_nowait(wpb.ConnectRequest(register=register))
        self.call = worker_service_pb2_grpc.WorkerServiceStub(self.channel).Connect(
            self._requests(), metadata=(("authorization", f"Bearer {key}"),)
        )
        self.reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[wpb.ConnectRequest]:
        while (message := await self.outgoing.get()) is not None:
            yield message

    async def _read(self) -> None:
        async for response in self.call:
            if response.HasField("registered"):
                self.registered.set()
            elif response.HasField("assignment"):
                self.assignments.put_nowait(response.assignment)

    def send(self, **message: Any) -> None:
        self.outgoing.put_nowait(wpb.ConnectRequest(**message))

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.channel.close()


@pytest.fixture
async def setup(
    database_url: str, nats_server: Any
) -> AsyncIterator[tuple[Scheduler, runplane.Client, Worker]]:
    scheduler = await start_scheduler(
        SchedulerSettings(database_url=database_url, nats_url=nats_server.url, listen="127.0.0.1:0")
    )
    key = await create_key(scheduler.engine_db, "dev", execute=True)
    worker = Worker(scheduler, key)
    await asyncio.wait_for(worker.registered.wait(), 10)
    client = runplane.Client(api_url=f"127.0.0.1:{scheduler.port}", secret_key=key)
    yield scheduler, client, worker
    await worker.close()
    await scheduler.stop()


async def _finished(client: runplane.Client, run_id: str) -> runplane.Run:
    async def final() -> runplane.Run | None:
        run = await client.runs.retrieve(run_id)
        return run if run.status.is_final else None

    run: runplane.Run = await eventually(final, 10, description=f"run {run_id} finishes")
    return run


async def _events_of(nats_url: str, run_id: str, count: int) -> list[events_pb2.RunEvent]:
    async def events() -> list[events_pb2.RunEvent] | None:
        found = [e for e in await stream_events(nats_url) if e.run.id == run_id]
        return found if len(found) >= count else None

    found: list[events_pb2.RunEvent] = await eventually(
        events, 10, description=f"{count} events of run {run_id}"
    )
    return found


async def _attempt(scheduler: Scheduler, attempt_id: str) -> Any:
    async with scheduler.engine_db.connect() as conn:
        return (await conn.execute(select(db.attempts).where(db.attempts.c.id == attempt_id))).one()


def _result(attempt_id: str, started_at: int | None) -> wpb.AttemptResult:
    result = wpb.AttemptResult(attempt_id=attempt_id, output='{"ok": true}')
    if started_at is not None:
        result.started_at.FromMilliseconds(started_at)
    return result


async def test_a_result_carrying_its_start_records_both_with_the_usual_events(
    setup: tuple[Scheduler, runplane.Client, Worker], nats_server: Any
) -> None:
    scheduler, client, worker = setup
    handle = await client.tasks.trigger(TASK, {"n": 1})
    assignment = await asyncio.wait_for(worker.assignments.get(), 10)
    assigned = await client.runs.retrieve(handle)
    started_at = int(assigned.updated_at.timestamp() * 1000) + 3
    writes = scheduler.engine.store.writer.ops

    worker.send(result=_result(assignment.attempt_id, started_at))
    run = await _finished(client, handle.id)

    assert run.status is runplane.RunStatus.COMPLETED
    assert run.output == {"ok": True}
    assert run.attempt_count == 1
    assert run.started_at is not None
    assert int(run.started_at.timestamp() * 1000) == started_at
    assert run.version == assigned.version + 2
    assert scheduler.engine.store.writer.ops == writes + 1  # start and end in one write

    attempt = await _attempt(scheduler, assignment.attempt_id)
    assert attempt.status == "COMPLETED"
    assert attempt.started_at == started_at
    assert attempt.finished_at >= started_at

    events = await _events_of(nats_server.url, handle.id, 4)
    assert [e.type for e in events[-2:]] == ["started", "completed"]
    started, completed = events[-2].run, events[-1].run
    assert [started.version, completed.version] == [assigned.version + 1, assigned.version + 2]
    assert runplane.Run.from_pb(started).status is runplane.RunStatus.EXECUTING
    assert started.output == ""
    assert not started.HasField("finished_at")
    assert started.attempt_count == 1
    assert runplane.Run.from_pb(completed).status is runplane.RunStatus.COMPLETED


async def test_a_result_without_a_start_is_recorded_after_a_start_at_receipt(
    setup: tuple[Scheduler, runplane.Client, Worker], nats_server: Any
) -> None:
    scheduler, client, worker = setup
    handle = await client.tasks.trigger(TASK, {"n": 2})
    assignment = await asyncio.wait_for(worker.assignments.get(), 10)

    worker.send(result=_result(assignment.attempt_id, None))
    run = await _finished(client, handle.id)

    assert run.status is runplane.RunStatus.COMPLETED
    assert run.attempt_count == 1
    events = await _events_of(nats_server.url, handle.id, 4)
    assert [e.type for e in events[-2:]] == ["started", "completed"]
    attempt = await _attempt(scheduler, assignment.attempt_id)
    assert attempt.started_at is not None
    assert attempt.finished_at >= attempt.started_at


async def test_a_start_reported_on_its_own_keeps_the_executors_time(
    setup: tuple[Scheduler, runplane.Client, Worker],
) -> None:
    scheduler, client, worker = setup
    handle = await client.tasks.trigger(TASK, {"n": 3})
    assignment = await asyncio.wait_for(worker.assignments.get(), 10)
    assigned = await client.runs.retrieve(handle)
    started_at = int(assigned.updated_at.timestamp() * 1000) + 1

    started = wpb.AttemptStarted(attempt_id=assignment.attempt_id)
    started.started_at.FromMilliseconds(started_at)
    worker.send(started=started)

    async def executing() -> bool:
        return (await client.runs.retrieve(handle)).status is runplane.RunStatus.EXECUTING

    await eventually(executing, 10, description="the reported start is recorded")
    # A result after a reported start carries no start of its own.
    worker.send(result=_result(assignment.attempt_id, None))
    run = await _finished(client, handle.id)

    assert run.status is runplane.RunStatus.COMPLETED
    assert run.started_at is not None
    assert int(run.started_at.timestamp() * 1000) == started_at
    assert (await _attempt(scheduler, assignment.attempt_id)).started_at == started_at


async def test_a_start_from_the_future_is_taken_as_now(
    setup: tuple[Scheduler, runplane.Client, Worker],
) -> None:
    scheduler, client, worker = setup
    handle = await client.tasks.trigger(TASK, {"n": 4})
    assignment = await asyncio.wait_for(worker.assignments.get(), 10)

    far = 4_000_000_000_000  # year 2096: a skewed executor clock
    worker.send(result=_result(assignment.attempt_id, far))
    run = await _finished(client, handle.id)

    assert run.status is runplane.RunStatus.COMPLETED
    attempt = await _attempt(scheduler, assignment.attempt_id)
    assert attempt.started_at < far
    assert attempt.started_at <= attempt.finished_at
    assert run.duration_ms >= 0
