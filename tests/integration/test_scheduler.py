"""The scheduler in this process against a real nats-server and a real database (SQLite and
PostgreSQL), driven over real gRPC on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import nats
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import func, select

import runplane
from runplane.v1 import run_pb2, run_service_pb2_grpc
from runplane.v1 import run_service_pb2 as rpb
from runplane_common.config import SchedulerSettings
from runplane_scheduler.app import Scheduler, start_scheduler
from runplane_scheduler.keys import create_key
from runplane_scheduler.store import tables as db
from tests.helpers.events import stream_events
from tests.helpers.registration import register_tasks
from tests.helpers.wait import eventually

pytestmark = pytest.mark.timeout(90)


async def _start(database_url: str, nats_url: str) -> Scheduler:
    return await start_scheduler(
        SchedulerSettings(database_url=database_url, nats_url=nats_url, listen="127.0.0.1:0")
    )


@pytest.fixture
async def scheduler(database_url: str, nats_server: Any) -> AsyncIterator[Scheduler]:
    s = await _start(database_url, nats_server.url)
    yield s
    await s.stop()


async def _client(s: Scheduler, env: str = "dev") -> runplane.Client:
    """A client of ``env``, where the tasks these tests trigger are known and nobody runs them."""
    key = await create_key(s.engine_db, env, execute=True)
    await register_tasks(f"127.0.0.1:{s.port}", key)
    return runplane.Client(api_url=f"127.0.0.1:{s.port}", secret_key=key)


async def _count(s: Scheduler, table: Any) -> int:
    async with s.engine_db.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def test_trigger_writes_the_run_and_publishes_its_event(
    scheduler: Scheduler, nats_server: Any
) -> None:
    client = await _client(scheduler)
    handle = await client.tasks.trigger(
        "not-deployed", {"n": 1}, tags=["user:42"], metadata={"step": 0}, idempotency_key="k1"
    )
    run = await client.runs.retrieve(handle)
    # No executor provides the task yet.
    assert run.status is runplane.RunStatus.PENDING_VERSION
    assert run.payload == {"n": 1}
    assert run.tags == ["user:42"]
    assert run.metadata == {"step": 0}
    assert run.version == 1
    await eventually(lambda: _outbox_empty(scheduler), timeout=20, description="outbox relayed")
    events = await stream_events(nats_server.url)
    assert [(e.type, e.run.id, e.run.version) for e in events] == [("created", handle.id, 1)]
    assert events[0].run.status == run_pb2.RUN_STATUS_PENDING_VERSION
    again = await client.tasks.trigger("not-deployed", {"n": 2}, idempotency_key="k1")
    assert again.id == handle.id and again.is_cached
    tagged = [r.id async for r in client.runs.list(tag="user:42")]
    assert tagged == [handle.id]


async def _outbox_empty(s: Scheduler) -> bool:
    return await _count(s, db.outbox) == 0


async def test_list_runs_pages_newest_first_with_filters(scheduler: Scheduler) -> None:
    client = await _client(scheduler)
    ids = [(await client.tasks.trigger("a" if i % 2 else "b", {"i": i})).id for i in range(7)]
    listed = [r.id async for r in client.runs.list(page_size=2)]
    assert listed == list(reversed(ids))
    only_a = [r.id async for r in client.runs.list(task="a", page_size=3)]
    assert only_a == [i for n, i in reversed(list(enumerate(ids))) if n % 2]
    assert [r.id async for r in client.runs.list(limit=3)] == list(reversed(ids))[:3]
    pending = [r async for r in client.runs.list(status="PENDING_VERSION")]
    assert len(pending) == 7
    assert [r async for r in client.runs.list(status="COMPLETED")] == []


async def test_a_page_token_goes_only_with_the_filters_it_was_issued_for(
    scheduler: Scheduler,
) -> None:
    client = await _client(scheduler)
    for i in range(5):
        await client.tasks.trigger("a", {"i": i}, tags=["t1"])
    key = await create_key(scheduler.engine_db, "dev")
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}") as channel:
        stub = run_service_pb2_grpc.RunServiceStub(channel)
        first = await stub.ListRuns(
            rpb.ListRunsRequest(task_ids=["a"], page_size=2), metadata=metadata
        )
        token = first.next_page_token
        assert token
        # The same filters with another page size: the next runs.
        rest = await stub.ListRuns(
            rpb.ListRunsRequest(task_ids=["a"], page_size=10, page_token=token), metadata=metadata
        )
        assert len(first.runs) + len(rest.runs) == 5
        assert not {r.id for r in first.runs} & {r.id for r in rest.runs}
        # Other filters: refused, naming the token.
        for other in (
            rpb.ListRunsRequest(task_ids=["b"], page_size=2, page_token=token),
            rpb.ListRunsRequest(page_size=2, page_token=token),
            rpb.ListRunsRequest(task_ids=["a"], tags=["t1"], page_size=2, page_token=token),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ListRuns(other, metadata=metadata)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _field_of(raised.value) == "page_token"
            assert "other filters" in (raised.value.details() or "")


async def test_cancel_a_pending_run(scheduler: Scheduler) -> None:
    client = await _client(scheduler)
    handle = await client.tasks.trigger("nobody-runs-this")
    run = await client.runs.cancel(handle)
    assert run.status is runplane.RunStatus.CANCELED and run.is_cancelled
    assert run.finished_at is not None
    # Cancelling again is harmless and changes nothing.
    again = await client.runs.cancel(handle)
    assert again.status is runplane.RunStatus.CANCELED and again.version == run.version


async def test_relay_resumes_after_a_crash_between_commit_and_publish(
    database_url: str, nats_server: Any
) -> None:
    first = await _start(database_url, nats_server.url)
    await first.relay.connected.wait()
    client = await _client(first)
    await eventually(lambda: _outbox_empty(first), timeout=20, description="outbox relayed")
    await nats_server.stop()
    ids = [(await client.tasks.trigger("t", {"i": i})).id for i in range(5)]
    assert await _count(first, db.outbox) == 5  # committed, not yet published
    await first.stop()

    await nats_server.start()
    # The crash came after publishing two events but before deleting their outbox rows.
    engine = db.create_engine(database_url)
    async with engine.connect() as conn:
        rows = (await conn.execute(select(db.outbox).order_by(db.outbox.c.event_id).limit(2))).all()
    await engine.dispose()
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    for r in rows:
        await js.publish(r.subject, r.data, headers={"Nats-Msg-Id": r.event_id})
    await nc.close()

    second = await _start(database_url, nats_server.url)
    try:
        await eventually(lambda: _outbox_empty(second), timeout=30, description="outbox drained")
        events = await stream_events(nats_server.url)
        assert sorted(e.run.id for e in events) == sorted(ids)  # none lost, none twice
        assert len({e.event_id for e in events}) == 5
    finally:
        await second.stop()


def _field_of(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return bad.field_violations[0].field


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("TriggerRun", rpb.TriggerRunRequest(task_id="", payload="{}"), "task_id"),
        ("TriggerRun", rpb.TriggerRunRequest(task_id="hello", payload="{not json"), "payload"),
        ("TriggerRun", rpb.TriggerRunRequest(task_id="bad id!", payload="1"), "task_id"),
        (
            "TriggerRun",
            rpb.TriggerRunRequest(task_id="t", options=rpb.TriggerOptions(metadata="[1]")),
            "options.metadata",
        ),
        (
            "TriggerRun",
            rpb.TriggerRunRequest(task_id="t", options=rpb.TriggerOptions(tags=["x"] * 11)),
            "options.tags",
        ),
        (
            "TriggerRun",
            rpb.TriggerRunRequest(task_id="t", options=rpb.TriggerOptions(max_attempts=-1)),
            "options.max_attempts",
        ),
        ("ListRuns", rpb.ListRunsRequest(statuses=[99]), "statuses[0]"),
        ("ListRuns", rpb.ListRunsRequest(page_size=-3), "page_size"),
        ("ListRuns", rpb.ListRunsRequest(page_token="%%%"), "page_token"),
        ("GetRun", rpb.GetRunRequest(run_id=""), "run_id"),
        ("CancelRun", rpb.CancelRunRequest(run_id="batch_1"), "run_id"),
    ],
)
async def test_invalid_requests_name_the_field_and_write_nothing(
    scheduler: Scheduler, method: str, request_: Any, field: str
) -> None:
    key = await create_key(scheduler.engine_db, "dev")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}") as channel:
        stub = run_service_pb2_grpc.RunServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await getattr(stub, method)(request_, metadata=(("authorization", f"Bearer {key}"),))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field.split("[")[0] in raised.value.details()
    assert _field_of(raised.value) == field
    assert await _count(scheduler, db.runs) == 0
    assert await _count(scheduler, db.outbox) == 0


async def test_the_sdk_raises_typed_errors(scheduler: Scheduler) -> None:
    client = await _client(scheduler)
    with pytest.raises(runplane.InvalidArgumentError) as raised:
        await client.tasks.trigger("", {})
    assert raised.value.field == "task_id"
    with pytest.raises(runplane.NotFoundError):
        await client.runs.retrieve("run_00000000000000000000000000")
    nokey = runplane.Client(api_url=f"127.0.0.1:{scheduler.port}", secret_key="nope")
    with pytest.raises(runplane.UnauthenticatedError):
        await nokey.runs.retrieve("run_00000000000000000000000000")
