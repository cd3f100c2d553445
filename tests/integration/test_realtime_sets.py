"""Tag and batch subscriptions of the realtime service against a real nats-server and a fake
scheduler (``GetRun``, ``ListRuns`` and ``GetServerInfo`` over a dict). Batches are made by
setting ``Run.batch_id`` on the runs the tests publish."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runplane._realtime import subscribe_to_batch
from runplane.v1 import (
    meta_service_pb2,
    meta_service_pb2_grpc,
    realtime_service_pb2,
    realtime_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
)
from runplane_common import subjects
from runplane_common.config import RealtimeSettings
from runplane_common.grpcserver import bearer_token
from runplane_realtime.server import RealtimeService, serve
from tests.helpers.nats import NatsServer
from tests.helpers.realtime import (
    DEV,
    KEYS,
    LIFE,
    PROD,
    FakeScheduler,
    Subscriber,
    ensure_run_events_stream,
    publish,
    publish_when_back,
)

pytestmark = pytest.mark.timeout(60)

LONG = 60.0


def brun(run_id: str, version: int, batch: str = "batch_1", env: str = "env_dev") -> Any:
    return run_pb2.Run(
        id=run_id, version=version, status=LIFE[version - 1], environment_id=env, batch_id=batch
    )


class FakeSetScheduler(FakeScheduler):
    """``ListRuns`` by batch over the same dict, newest first, in pages."""

    async def ListRuns(self, request: Any, context: Any) -> Any:
        environment = KEYS.get(bearer_token(context.invocation_metadata()))
        if environment is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown secret key")
        found = sorted(
            (
                r
                for r in self.runs.values()
                if r.environment_id == environment
                and (not request.batch_id or r.batch_id == request.batch_id)
                and all(t in r.tags for t in request.tags)
            ),
            key=lambda r: r.id,
            reverse=True,
        )
        start = int(request.page_token or 0)
        size = request.page_size or 25
        page = found[start : start + size]
        more = start + size < len(found)
        return run_service_pb2.ListRunsResponse(
            runs=page, next_page_token=str(start + size) if more else ""
        )

    async def GetBatch(self, request: Any, context: Any) -> Any:
        """Every batch exists, in every environment (a batch here is only a runs' label)."""
        if KEYS.get(bearer_token(context.invocation_metadata())) is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown secret key")
        return run_service_pb2.GetBatchResponse(batch=run_service_pb2.Batch(id=request.batch_id))


class FakeMeta(meta_service_pb2_grpc.MetaServiceServicer):
    async def GetServerInfo(self, request: Any, context: Any) -> Any:
        environment = KEYS.get(bearer_token(context.invocation_metadata()))
        if environment is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown secret key")
        return meta_service_pb2.GetServerInfoResponse(environment_id=environment)


@pytest.fixture
async def scheduler() -> AsyncIterator[FakeSetScheduler]:
    fake = FakeSetScheduler()
    server = grpc.aio.server()
    run_service_pb2_grpc.add_RunServiceServicer_to_server(fake, server)
    meta_service_pb2_grpc.add_MetaServiceServicer_to_server(FakeMeta(), server)
    fake.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        yield fake
    finally:
        await server.stop(0)


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    async def quiet(_error: Exception) -> None:
        pass

    client: NATS = await nats.connect(
        nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, error_cb=quiet
    )
    context = client.jetstream()
    await ensure_run_events_stream(context)
    try:
        yield context
    finally:
        await client.close()


async def _realtime(
    nats_server: NatsServer, scheduler: FakeSetScheduler, reconcile: float = LONG
) -> RealtimeService:
    service = await serve(
        RealtimeSettings(
            nats_url=nats_server.url,
            api_url=scheduler.address,
            listen="127.0.0.1:0",
            reconcile_interval=reconcile,
        )
    )
    assert await service.link.wait_connected(15.0)
    return service


@pytest.fixture
async def realtime(
    nats_server: NatsServer, scheduler: FakeSetScheduler
) -> AsyncIterator[RealtimeService]:
    service = await _realtime(nats_server, scheduler)
    yield service
    await service.stop(grace=0)


@pytest.fixture
async def channel(realtime: RealtimeService) -> AsyncIterator[grpc.aio.Channel]:
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{realtime.port}")
    yield ch
    await ch.close()


async def raw_batch(
    channel: grpc.aio.Channel,
    batch_id: str = "batch_1",
    metadata: tuple[tuple[str, str], ...] = DEV,
    **resume: Any,
) -> AsyncIterator[Any]:
    stub = realtime_service_pb2_grpc.RealtimeServiceStub(channel)
    request = realtime_service_pb2.SubscribeToBatchRequest(batch_id=batch_id, **resume)
    async for response in stub.SubscribeToBatch(request, metadata=metadata):
        yield response


def _versions(sub: Subscriber, run_id: str) -> list[int]:
    return [item.run.version for item in sub.runs if item.run.id == run_id]


async def test_a_batch_subscription_lists_the_batch_then_follows_only_its_runs(
    js: JetStreamContext, scheduler: FakeSetScheduler, channel: grpc.aio.Channel
) -> None:
    scheduler.runs["run_a"] = brun("run_a", 2)
    scheduler.runs["run_x"] = brun("run_x", 1, batch="batch_2")
    sub = Subscriber(raw_batch(channel))
    try:
        await _eventually(lambda: _versions(sub, "run_a") == [2])
        # A new run of the batch, a change of a listed one, another batch, another environment.
        await publish(
            js,
            brun("run_b", 1),
            brun("run_a", 3),
            brun("run_x", 2, batch="batch_2"),
            brun("run_p", 1, env="env_prod"),
            brun("run_b", 2),
            brun("run_a", 4),
        )
        await _eventually(lambda: _versions(sub, "run_a") == [2, 3, 4])
        await _eventually(lambda: _versions(sub, "run_b") == [1, 2])
        assert {item.run.id for item in sub.runs} == {"run_a", "run_b"}
        cursors = [item.cursor for item in sub.runs]
        assert cursors == sorted(cursors) and cursors[0] > 0
    finally:
        await sub.cancel()


async def test_a_version_gap_in_a_batch_is_filled_from_the_scheduler(
    js: JetStreamContext, scheduler: FakeSetScheduler, channel: grpc.aio.Channel
) -> None:
    sub = await _ready(scheduler, raw_batch(channel))
    try:
        scheduler.runs["run_a"] = brun("run_a", 4)
        await publish(js, brun("run_a", 1))
        await _eventually(lambda: _versions(sub, "run_a") == [1])
        await publish(js, brun("run_a", 3))  # version 2 never arrives
        await _eventually(lambda: _versions(sub, "run_a") == [1, 4])
    finally:
        await sub.cancel()


async def test_a_resumed_batch_subscription_replays_what_it_missed(
    js: JetStreamContext, scheduler: FakeSetScheduler, channel: grpc.aio.Channel
) -> None:
    first = await _ready(scheduler, raw_batch(channel))
    await publish(js, brun("run_a", 1))
    await _eventually(lambda: _versions(first, "run_a") == [1])
    await first.cancel()
    cursor = first.runs[-1].cursor
    # While nobody listens the run moves on; the scheduler's list would only show the end.
    scheduler.runs["run_a"] = brun("run_a", 4)
    await publish(js, brun("run_a", 2), brun("run_a", 3), brun("run_a", 4))
    again = Subscriber(raw_batch(channel, after_versions={"run_a": 1}, resume_cursor=cursor))
    try:
        await _eventually(lambda: _versions(again, "run_a") == [2, 3, 4])
    finally:
        await again.cancel()


async def test_a_batch_subscription_follows_the_scheduler_through_a_nats_outage(
    js: JetStreamContext,
    nats_server: NatsServer,
    scheduler: FakeSetScheduler,
    realtime: RealtimeService,
) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{realtime.port}")
    seen: list[run_pb2.Run] = []

    async def follow() -> None:
        async for run in subscribe_to_batch(channel, DEV, "batch_1"):
            seen.append(run)

    scheduler.runs["run_0"] = brun("run_0", 1)  # listed: once seen, the consumer is in place
    sub = Subscriber(_wrap(follow()))
    try:
        await _eventually(lambda: [r.id for r in seen] == ["run_0"])
        await publish(js, brun("run_a", 1))
        await _eventually(lambda: [r.id for r in seen] == ["run_0", "run_a"])
        await nats_server.stop()
        scheduler.runs["run_a"] = brun("run_a", 4)  # the end never reaches NATS
        await _eventually(lambda: seen[-1].version == 4, timeout=30)
        await nats_server.start()
        await publish_when_back(js, brun("run_b", 1))
        await _eventually(lambda: seen[-1].id == "run_b", timeout=30)
        versions = [r.version for r in seen if r.id == "run_a"]
        assert versions == sorted(set(versions)) and versions[-1] == 4
    finally:
        await sub.cancel()
        await channel.close()


async def test_a_batch_of_another_environment_is_empty_and_a_bad_key_refused(
    js: JetStreamContext, scheduler: FakeSetScheduler, channel: grpc.aio.Channel
) -> None:
    scheduler.runs["run_a"] = brun("run_a", 1)
    scheduler.runs["run_q"] = brun("run_q", 1, env="env_prod")
    prod = Subscriber(raw_batch(channel, metadata=PROD))
    try:
        await _eventually(lambda: [i.run.id for i in prod.runs] == ["run_q"])
        await publish(js, brun("run_a", 2))
        await publish(js, brun("run_p", 1, env="env_prod"))
        await _eventually(lambda: [i.run.id for i in prod.runs] == ["run_q", "run_p"])
    finally:
        await prod.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in raw_batch(channel, metadata=(("authorization", "Bearer nope"),)):
            pass
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def _ready(scheduler: FakeSetScheduler, stream: AsyncIterator[Any]) -> Subscriber:
    """A subscriber that has received the batch's listed marker run: its consumer is in place."""
    scheduler.runs["run_0"] = brun("run_0", 1)
    sub = Subscriber(stream)
    await _eventually(lambda: _versions(sub, "run_0") == [1])
    return sub


async def _wrap(coro: Any) -> AsyncIterator[Any]:
    await coro
    return
    yield


async def _eventually(check: Any, timeout: float = 15.0) -> None:
    from tests.helpers.wait import eventually

    await eventually(check, timeout)


@pytest.fixture
async def http_realtime(
    nats_server: NatsServer, scheduler: FakeSetScheduler
) -> AsyncIterator[RealtimeService]:
    service = await serve(
        RealtimeSettings(
            nats_url=nats_server.url,
            api_url=scheduler.address,
            listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            reconcile_interval=LONG,
        )
    )
    assert service.http is not None
    service.http.keepalive = 0.2
    assert await service.link.wait_connected(15.0)
    yield service
    await service.stop(grace=0)


class SseReader:
    """An SSE response read line by line: events as (id, data), comments counted."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments = 0

    async def event(self) -> tuple[str, dict[str, Any]]:
        event_id, data = "", ""
        async for raw in self.response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                self.comments += 1
            elif line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data:
                parsed = json.loads(data)
                assert "error" not in parsed, parsed
                return event_id, parsed
        raise AssertionError("the stream ended")


async def test_sse_batch_resumes_from_last_event_id_and_keeps_idle_streams_alive(
    js: JetStreamContext, scheduler: FakeSetScheduler, http_realtime: RealtimeService
) -> None:
    scheduler.runs["run_0"] = brun("run_0", 1)
    url = f"http://127.0.0.1:{http_realtime.http_port}/realtime/v1/batches/batch_1"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, params={"token": "rp_dev_test"}) as response:
            assert response.status == 200
            sse = SseReader(response)
            _, listed = await sse.event()
            assert listed["id"] == "run_0"
            await publish(js, brun("run_a", 1))
            last_id, first = await sse.event()
            assert (first["id"], first["version"]) == ("run_a", 1)
            while sse.comments == 0:  # idle: keepalive comments, not silence
                await asyncio.wait_for(response.content.readline(), 10)
                sse.comments += 1
        # Missed while disconnected; Last-Event-ID (the cursor) replays it in order.
        await publish(js, brun("run_a", 2), brun("run_a", 3))
        async with session.get(
            url, headers={"Authorization": "Bearer rp_dev_test", "Last-Event-ID": last_id}
        ) as response:
            assert response.status == 200, await response.text()
            sse = SseReader(response)
            got = [(await sse.event())[1] for _ in range(2)]
            assert [(r["id"], r["version"]) for r in got] == [("run_a", 2), ("run_a", 3)]
        async with session.get(url, params={"token": "nope"}) as refused:
            assert refused.status == 401
            assert (await refused.json())["error"]["code"] == "UNAUTHENTICATED"


async def test_sse_resumed_from_last_event_id_alone_gets_no_run_twice_from_a_reconcile(
    js: JetStreamContext, nats_server: NatsServer, scheduler: FakeSetScheduler
) -> None:
    # An EventSource names no versions when it resumes, only its cursor: the periodic list must
    # not send again the runs it already has, but must still send a change whose event was lost.
    service = await serve(
        RealtimeSettings(
            nats_url=nats_server.url,
            api_url=scheduler.address,
            listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            reconcile_interval=0.3,
        )
    )
    try:
        assert service.http is not None
        service.http.keepalive = 0.2
        assert await service.link.wait_connected(15.0)
        url = f"http://127.0.0.1:{service.http_port}/realtime/v1/batches/batch_1"
        scheduler.runs["run_0"] = brun("run_0", 1)
        await publish(js, brun("run_0", 1))
        async with aiohttp.ClientSession() as session:
            async with session.get(url, params={"token": "rp_dev_test"}) as response:
                sse = SseReader(response)
                _, listed = await sse.event()
                assert (listed["id"], listed["version"]) == ("run_0", 1)
                scheduler.runs["run_a"] = brun("run_a", 1)
                await publish(js, brun("run_a", 1))
                last_id, first = await sse.event()
                assert (first["id"], first["version"]) == ("run_a", 1)
            scheduler.runs["run_a"] = brun("run_a", 2)
            await publish(js, brun("run_a", 2))
            headers = {"Authorization": "Bearer rp_dev_test", "Last-Event-ID": last_id}
            async with session.get(url, headers=headers) as response:
                sse = SseReader(response)
                _, replayed = await sse.event()
                assert (replayed["id"], replayed["version"]) == ("run_a", 2)
                # Several reconcile intervals: nothing but keepalives (run_0 and run_a at v1
                # are the client's already).
                await asyncio.sleep(1.5)
                # run_b's first event is lost (unreadable); the next event read past it.
                scheduler.runs["run_b"] = brun("run_b", 1)
                await js.publish(subjects.run_event("env_dev", "run_b"), b"\xff not an event")
                scheduler.runs["run_a"] = brun("run_a", 3)
                await publish(js, brun("run_a", 3))
                got = [(await sse.event())[1] for _ in range(2)]
                assert [(r["id"], r["version"]) for r in got] == [("run_a", 3), ("run_b", 1)]
                assert sse.comments > 0
    finally:
        await service.stop(grace=0)


async def test_two_realtime_replicas_each_feed_their_own_subscribers_from_their_own_consumer(
    nats_server: NatsServer, js: JetStreamContext, scheduler: FakeSetScheduler
) -> None:
    """Replicas behind one address share nothing: each has one consumer of the environment's
    events for all of its subscribers, and every subscriber of either gets every version."""
    replicas = [await _realtime(nats_server, scheduler) for _ in range(2)]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{r.port}") for r in replicas]
    subs: list[Subscriber] = []
    try:
        scheduler.runs["run_0"] = brun("run_0", 1)
        subs = [Subscriber(raw_batch(channels[i % 2])) for i in range(6)]
        await _eventually(lambda: all(_versions(s, "run_0") == [1] for s in subs))
        for v in range(1, 5):
            await publish(js, brun("run_a", v), brun("run_x", v, batch="batch_2"), brun("run_b", v))
        for sub in subs:
            await _eventually(lambda s=sub: _versions(s, "run_b") == [1, 2, 3, 4])
            assert _versions(sub, "run_a") == [1, 2, 3, 4]
            assert {item.run.id for item in sub.runs} == {"run_0", "run_a", "run_b"}
        for replica in replicas:
            assert len(replica.realtime.hubs) == 1
            assert replica.realtime.hubs.readers == 3
        info = await js.stream_info(subjects.RUN_EVENTS_STREAM)
        assert info.state.consumer_count == 2  # one per replica, not one per subscriber
    finally:
        for sub in subs:
            await sub.cancel()
        for channel in channels:
            await channel.close()
        for replica in replicas:
            await replica.stop(grace=0)
