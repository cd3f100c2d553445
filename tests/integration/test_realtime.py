"""The realtime service against a real nats-server and a fake scheduler.

The fake scheduler is a real gRPC server answering ``RunService.GetRun`` from a dict, the one
call the realtime service makes upstream; the tests publish the RunEvents the scheduler would.
Each run's snapshot and its events are set separately, so a test can tell which one a subscriber
was sent: most tests use a long ``reconcile_interval`` so that only the path under test can
produce what they expect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

import runplane
from runplane._realtime import subscribe_to_run
from runplane.v1 import (
    realtime_service_pb2,
    realtime_service_pb2_grpc,
    run_pb2,
    run_service_pb2_grpc,
)
from runplane_common import subjects
from runplane_common.config import RealtimeSettings
from runplane_realtime.server import SERVICE_NAME, RealtimeService, serve
from tests.helpers.nats import NatsServer
from tests.helpers.ports import free_port
from tests.helpers.realtime import (
    COMPLETED,
    DEV,
    EXECUTING,
    FAILED,
    LIFE,
    PROD,
    FakeScheduler,
    Subscriber,
    ensure_run_events_stream,
    publish,
    publish_when_back,
)
from tests.helpers.wait import eventually

pytestmark = pytest.mark.timeout(60)

LONG = 60.0  # a reconcile interval no test waits out


def run(
    version: int, status: int | None = None, run_id: str = "run_1", env: str = "env_dev"
) -> Any:
    """Version ``version`` of a run, by default with its status from LIFE."""
    if status is None:
        status = LIFE[version - 1]
    return run_pb2.Run(id=run_id, version=version, status=status, environment_id=env)


async def raw(
    channel: grpc.aio.Channel,
    run_id: str = "run_1",
    metadata: tuple[tuple[str, str], ...] = DEV,
    after_version: int = 0,
    keep_open: bool = False,
) -> AsyncIterator[Any]:
    """The service's own stream, without the SDK's resuming."""
    stub = realtime_service_pb2_grpc.RealtimeServiceStub(channel)
    request = realtime_service_pb2.SubscribeToRunRequest(
        run_id=run_id, after_version=after_version, keep_open=keep_open
    )
    async for response in stub.SubscribeToRun(request, metadata=metadata):
        yield response.run


async def consumer_count(js: JetStreamContext) -> int:
    info = await js.stream_info(subjects.RUN_EVENTS_STREAM)
    return int(info.state.consumer_count)


@pytest.fixture
async def scheduler() -> AsyncIterator[FakeScheduler]:
    fake = FakeScheduler()
    server = grpc.aio.server()
    run_service_pb2_grpc.add_RunServiceServicer_to_server(fake, server)
    fake.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        yield fake
    finally:
        await server.stop(0)


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    async def quiet(_error: Exception) -> None:
        pass  # the tests stop NATS on purpose; every reconnect attempt would log a traceback

    client = await nats.connect(
        nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, error_cb=quiet
    )
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def js(nc: NATS) -> JetStreamContext:
    context = nc.jetstream()
    await ensure_run_events_stream(context)
    return context


StartRealtime = Callable[..., Awaitable[RealtimeService]]


@pytest.fixture
async def start_realtime(
    nats_server: NatsServer, scheduler: FakeScheduler
) -> AsyncIterator[StartRealtime]:
    """Start a realtime service on the test's NATS and fake scheduler; stopped at teardown."""
    services: list[RealtimeService] = []

    async def start(
        reconcile_interval: float = LONG, port: int = 0, nats_up: bool = True
    ) -> RealtimeService:
        service = await serve(
            RealtimeSettings(
                nats_url=nats_server.url,
                api_url=scheduler.address,
                listen=f"127.0.0.1:{port}",
                reconcile_interval=reconcile_interval,
            )
        )
        services.append(service)
        if nats_up:
            # serve() returns before its NATS connection is up; a subscription made earlier
            # starts from the scheduler's snapshot, and tests of replay would see no history.
            assert await service.link.wait_connected(15.0), "realtime never reached NATS"
        return service

    try:
        yield start
    finally:
        for service in services:
            await service.stop(grace=0)


@pytest.fixture
async def channels() -> AsyncIterator[Callable[[RealtimeService], grpc.aio.Channel]]:
    """Client channels to realtime services, closed at teardown."""
    opened: list[grpc.aio.Channel] = []

    def open_channel(service: RealtimeService) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        opened.append(channel)
        return channel

    try:
        yield open_channel
    finally:
        for channel in opened:
            await channel.close()


Channels = Callable[[RealtimeService], grpc.aio.Channel]


async def test_every_version_in_order_then_the_stream_ends_at_the_final_status(
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    scheduler.runs["run_1"] = run(2)
    await publish(js, run(1), run(2))
    service = await start_realtime()
    channel = channels(service)

    subscriber = Subscriber(raw(channel))
    await subscriber.saw([1, 2])
    scheduler.runs["run_1"] = run(4)
    await publish(js, run(3), run(4))

    await subscriber.ends_with([1, 2, 3, 4])
    assert [r.status for r in subscriber.runs] == LIFE
    assert scheduler.calls == 1  # the authorisation check: every version came from the stream

    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_subscription_resumes_after_the_version_it_names(
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    scheduler.runs["run_1"] = run(4)
    await publish(js, *(run(v) for v in range(1, 5)))
    channel = channels(await start_realtime())

    await Subscriber(raw(channel, after_version=2)).ends_with([3, 4])
    # Resuming after the final version: nothing newer, so the stream ends at once.
    await Subscriber(raw(channel, after_version=4)).ends_with([])


async def test_duplicate_events_are_sent_once(
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    scheduler.runs["run_1"] = run(3, COMPLETED)
    # Re-published events (new event ids, so JetStream keeps them) and history out of place.
    await publish(js, run(1), run(1), run(2), run(1), run(2), run(3, COMPLETED), run(3, COMPLETED))
    channel = channels(await start_realtime())

    subscriber = Subscriber(raw(channel))
    await subscriber.ends_with([1, 2, 3])
    assert subscriber.runs[-1].status == COMPLETED


async def test_a_version_gap_is_filled_by_the_schedulers_snapshot(
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    # Version 3 never reached the stream; the scheduler is already at 5.
    scheduler.runs["run_1"] = run(5, COMPLETED)
    await publish(js, run(1), run(2), run(4, EXECUTING))
    channel = channels(await start_realtime())

    subscriber = Subscriber(raw(channel))
    await subscriber.ends_with([1, 2, 5])
    assert subscriber.runs[-1].status == COMPLETED


async def test_a_purged_history_starts_from_the_snapshot(
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    # The first event the stream still has is version 3: versions 1 and 2 were purged.
    scheduler.runs["run_1"] = run(3, EXECUTING)
    await publish(js, run(3, EXECUTING))
    channel = channels(await start_realtime())

    subscriber = Subscriber(raw(channel))
    await subscriber.saw([3])
    scheduler.runs["run_1"] = run(4)
    await publish(js, run(4))
    await subscriber.ends_with([3, 4])


async def test_events_that_never_reach_nats_arrive_from_the_scheduler(
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    # The run completed but its last event was never published: the idle reconcile sends it.
    scheduler.runs["run_1"] = run(3, FAILED)
    await publish(js, run(1), run(2))
    channel = channels(await start_realtime(reconcile_interval=0.3))

    subscriber = Subscriber(raw(channel))
    await subscriber.ends_with([1, 2, 3])
    assert subscriber.runs[-1].status == FAILED


async def test_the_schedulers_refusal_is_the_subscribers(
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    scheduler.runs["run_1"] = run(1)
    channel = channels(await start_realtime())

    async def status_of(**kwargs: Any) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in raw(channel, **kwargs):
                pass
        return caught.value.code()

    bad_key = (("authorization", "Bearer rp_dev_wrong"),)
    assert await status_of(metadata=bad_key) == grpc.StatusCode.UNAUTHENTICATED
    assert await status_of(metadata=()) == grpc.StatusCode.UNAUTHENTICATED
    assert await status_of(metadata=PROD) == grpc.StatusCode.NOT_FOUND  # another environment's
    assert await status_of(run_id="run_missing") == grpc.StatusCode.NOT_FOUND
    assert await status_of(run_id="") == grpc.StatusCode.INVALID_ARGUMENT
    assert await consumer_count(js) == 0  # a refused subscription reads nothing

    # The SDK raises its typed errors for them, without retrying.
    with pytest.raises(runplane.UnauthenticatedError):
        async for _ in subscribe_to_run(channel, bad_key, "run_1"):
            pass
    with pytest.raises(runplane.NotFoundError):
        async for _ in subscribe_to_run(channel, PROD, "run_1"):
            pass


async def test_a_nats_outage_still_ends_with_the_final_state_from_the_scheduler(
    nats_server: NatsServer,
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    scheduler.runs["run_1"] = run(2)
    await publish(js, run(1), run(2))
    channel = channels(await start_realtime())
    subscriber = Subscriber(raw(channel))
    await subscriber.saw([1, 2])

    await nats_server.stop()
    # The run completes while its events cannot be published; with a LONG reconcile interval
    # only the outage polling can deliver it.
    scheduler.runs["run_1"] = run(3, COMPLETED)

    await subscriber.ends_with([1, 2, 3])
    assert subscriber.runs[-1].status == COMPLETED


async def test_a_subscription_returns_to_the_stream_when_nats_does(
    nats_server: NatsServer,
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    scheduler.runs["run_1"] = run(1)
    await publish(js, run(1))
    channel = channels(await start_realtime())
    subscriber = Subscriber(raw(channel))
    await subscriber.saw([1])

    await nats_server.stop()
    scheduler.runs["run_1"] = run(2)
    await subscriber.saw([1, 2])  # from the scheduler, while NATS is down

    await nats_server.start()
    # The scheduler is left behind at version 2, so versions 3 and 4 can only come from the
    # stream: the subscription went back to it.
    await publish_when_back(js, run(2), run(3))
    await subscriber.saw([1, 2, 3])
    await publish(js, run(4))
    await subscriber.ends_with([1, 2, 3, 4])


async def test_the_service_starts_while_nats_is_down(
    nats_server: NatsServer,
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    await publish(js, run(1))
    await nats_server.stop()
    scheduler.runs["run_1"] = run(2)
    channel = channels(await start_realtime(nats_up=False))

    subscriber = Subscriber(raw(channel))
    await subscriber.saw([2])  # the scheduler's snapshot: NATS is not there

    await nats_server.start()
    scheduler.runs["run_1"] = run(4)
    await publish_when_back(js, run(2), run(3), run(4))
    # Version 1 is older than what was sent: only 3 and 4 follow.
    await subscriber.ends_with([2, 3, 4])


async def test_keep_open_follows_a_finished_run_and_cancel_removes_the_consumer(
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    scheduler.runs["run_1"] = run(4)
    await publish(js, *(run(v) for v in range(1, 5)))
    channel = channels(await start_realtime())

    subscriber = Subscriber(subscribe_to_run(channel, DEV, "run_1", stop_on_completion=False))
    await subscriber.saw([1, 2, 3, 4])
    assert await subscriber.still_open()
    assert await consumer_count(js) == 1

    # A change after the final status (tags added, say) still reaches the subscriber.
    await publish(js, run(5, COMPLETED))
    await subscriber.saw([1, 2, 3, 4, 5])
    assert await subscriber.still_open()

    await subscriber.cancel()
    await eventually(lambda: _no_consumers(js), 10.0, description="the consumer is removed")


async def _no_consumers(js: JetStreamContext) -> bool:
    return await consumer_count(js) == 0


async def test_the_sdk_resumes_after_the_realtime_service_restarts(
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    port = free_port()
    first = await start_realtime(port=port)
    channel = channels(first)
    scheduler.runs["run_1"] = run(2)
    await publish(js, run(1), run(2))

    subscriber = Subscriber(subscribe_to_run(channel, DEV, "run_1"))
    await subscriber.saw([1, 2])

    await first.stop(grace=0)
    assert await consumer_count(js) == 0  # stopping waits for open subscriptions to clean up
    await start_realtime(port=port)
    scheduler.runs["run_1"] = run(4)
    await publish(js, run(3), run(4))

    # Nothing missed, nothing repeated, and the iterator ends at the final status.
    await subscriber.ends_with([1, 2, 3, 4])


async def test_the_sdk_resumes_after_a_given_version(
    js: JetStreamContext,
    scheduler: FakeScheduler,
    start_realtime: StartRealtime,
    channels: Channels,
) -> None:
    scheduler.runs["run_1"] = run(4)
    await publish(js, *(run(v) for v in range(1, 5)))
    channel = channels(await start_realtime())

    await Subscriber(subscribe_to_run(channel, DEV, "run_1", after_version=1)).ends_with([2, 3, 4])
