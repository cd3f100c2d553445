"""The realtime service's limits on what a subscriber can cost it (issue 12, findings 9 and 10).

A real nats-server, the realtime service on loopback (gRPC and SSE) and a fake scheduler that
answers ``GetRun``/``ListRuns``/``GetBatch``/``GetServerInfo`` from a dict. Secret keys are the
``KEYS``; a public token is any JWT whose ``exp`` has not passed (the fake does not check
signatures: the realtime service never sees the signing key anyway).

- A subscriber that stops reading is cut off with a resumable error once its buffer
  (``subscriber_buffer``) is full; its consumer goes, the others go on.
- A resumed subscriber gets every version exactly once.
- An event whose JSON is too deep for an encoder does not break the SSE feeds carrying it.
- A subscription opened with a public token ends when the token expires.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import nats
import orjson
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError

from runplane._realtime import subscribe_to_run
from runplane.v1 import (
    events_pb2,
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
from tests.helpers.wait import eventually

KEYS = {"rp_dev_test": "env_dev"}
DEV = (("authorization", "Bearer rp_dev_test"),)
S = run_pb2.RunStatus
EXECUTING, COMPLETED = S.RUN_STATUS_EXECUTING, S.RUN_STATUS_COMPLETED
LONG = 600.0  # a reconcile interval no test waits out: only the stream feeds subscribers
BUFFER = 256 * 1024
# Enough events to fill every socket and HTTP/2 window between a subscriber and the service
# many times over, so that one that does not read falls behind.
EVENTS = 1500
PAD = "x" * 16_000
CREATED = Timestamp(seconds=int(time.time()))


def run(version: int, *, final_at: int = EVENTS, **fields: Any) -> run_pb2.Run:
    fields.setdefault("metadata", orjson.dumps({"pad": PAD}).decode())
    return run_pb2.Run(
        id="run_1",
        version=version,
        status=COMPLETED if version == final_at else EXECUTING,
        environment_id="env_dev",
        tags=["t"],
        created_at=CREATED,
        **fields,
    )


def public_token(expires_at: float) -> str:
    def b64(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'HS256'})}.{b64({'exp': expires_at, 'scopes': ['read:runs']})}.sig"


class FakeScheduler(
    run_service_pb2_grpc.RunServiceServicer, meta_service_pb2_grpc.MetaServiceServicer
):
    def __init__(self) -> None:
        self.runs: dict[str, run_pb2.Run] = {}
        self.address = ""

    async def _environment(self, context: Any) -> str:
        token = bearer_token(context.invocation_metadata())
        if token in KEYS:
            return KEYS[token]
        try:
            claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        except (ValueError, IndexError):
            claims = {}
        if claims.get("exp", 0) > time.time():
            return "env_dev"
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown key or expired token")
        raise AssertionError("unreachable")

    async def GetRun(self, request: Any, context: Any) -> Any:
        environment = await self._environment(context)
        found = self.runs.get(request.run_id)
        if found is None or found.environment_id != environment:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no run {request.run_id}")
        return run_service_pb2.GetRunResponse(run=found)

    async def ListRuns(self, request: Any, context: Any) -> Any:
        environment = await self._environment(context)
        found = [
            r
            for r in self.runs.values()
            if r.environment_id == environment and all(t in r.tags for t in request.tags)
        ]
        return run_service_pb2.ListRunsResponse(runs=found)

    async def GetServerInfo(self, request: Any, context: Any) -> Any:
        environment = await self._environment(context)
        return meta_service_pb2.GetServerInfoResponse(environment_id=environment)


@pytest.fixture
async def scheduler() -> AsyncIterator[FakeScheduler]:
    fake = FakeScheduler()
    server = grpc.aio.server()
    run_service_pb2_grpc.add_RunServiceServicer_to_server(fake, server)
    meta_service_pb2_grpc.add_MetaServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.address = f"127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await server.stop(0)


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    client = await nats.connect(nats_server.url)
    context = client.jetstream()
    config = StreamConfig(
        name=subjects.RUN_EVENTS_STREAM,
        subjects=subjects.run_events_subjects(),
        storage=StorageType.FILE,
    )
    try:
        await context.add_stream(config)
    except BadRequestError:
        await context.update_stream(config)
    try:
        yield context
    finally:
        await client.close()


@pytest.fixture
async def realtime(
    nats_server: NatsServer, scheduler: FakeScheduler
) -> AsyncIterator[RealtimeService]:
    service = await serve(
        RealtimeSettings(
            nats_url=nats_server.url,
            api_url=scheduler.address,
            listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            reconcile_interval=LONG,
            subscriber_buffer=BUFFER,
        )
    )
    assert await service.link.wait_connected(15.0)
    try:
        yield service
    finally:
        await service.stop(grace=0)


async def publish(js: JetStreamContext, *runs: run_pb2.Run) -> None:
    for each in runs:
        event = events_pb2.RunEvent(event_id=f"evt_{each.version}", type="changed", run=each)
        await js.publish(
            subjects.run_event(each.environment_id, each.id),
            event.SerializeToString(),
            headers={"Nats-Msg-Id": f"evt_{each.version}"},
        )


async def consumers(js: JetStreamContext) -> int:
    return int((await js.stream_info(subjects.RUN_EVENTS_STREAM)).state.consumer_count)


def subscribe_raw(channel: grpc.aio.Channel, after_version: int = 0, **metadata: Any) -> Any:
    """The service's own SubscribeToRun call, not read until the test reads it."""
    stub = realtime_service_pb2_grpc.RealtimeServiceStub(channel)
    request = realtime_service_pb2.SubscribeToRunRequest(
        run_id="run_1", after_version=after_version
    )
    return stub.SubscribeToRun(request, metadata=metadata.get("auth", DEV))


async def drain(call: Any) -> tuple[list[int], grpc.aio.AioRpcError | None]:
    """Versions a call delivers (cursors for a tag call) and the error it ends with."""
    got: list[int] = []
    try:
        async for response in call:
            got.append(response.run.version)
    except grpc.aio.AioRpcError as error:
        return got, error
    return got, None


def resume_info(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The ErrorInfo of a cut-off subscriber's status: its reason and where to resume."""
    status = rpc_status.from_call(error)
    assert status is not None, error
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return {"reason": info.reason, **info.metadata}
    raise AssertionError(f"no ErrorInfo in {status}")


class StalledSse:
    """An SSE request on a raw socket with a small receive buffer, read only when asked."""

    def __init__(self, port: int, path: str) -> None:
        self.port = port
        self.path = path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, headers: str = "") -> StalledSse:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=2**12)
        self.writer.write(
            f"GET {self.path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer rp_dev_test\r\n"
            f"{headers}Connection: close\r\n\r\n".encode()
        )
        return self

    async def events(self) -> list[tuple[str, str, str]]:
        """Everything until the server closes: (event, id, data) of each SSE event."""
        assert self.reader is not None and self.writer is not None
        raw = await asyncio.wait_for(self.reader.read(), 60)
        self.writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0], head
        if b"chunked" in head.lower():
            body = _unchunk(body)
        found = []
        for block in body.decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
            if "data" in fields:
                found.append((fields.get("event", ""), fields.get("id", ""), fields["data"]))
        return found


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16) if size_line.strip() else 0
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def versions_of(events: list[tuple[str, str, str]]) -> list[int]:
    return [orjson.loads(data)["version"] for kind, _, data in events if kind == "run"]


@pytest.mark.timeout(180)
async def test_subscribers_that_stop_reading_are_cut_off_and_the_others_get_everything(
    js: JetStreamContext, scheduler: FakeScheduler, realtime: RealtimeService
) -> None:
    scheduler.runs["run_1"] = run(1)
    await publish(js, run(1))
    epoch = realtime.link.epoch
    stalled_channels = [grpc.aio.insecure_channel(f"127.0.0.1:{realtime.port}") for _ in range(4)]
    reader_channel = grpc.aio.insecure_channel(f"127.0.0.1:{realtime.port}")
    try:
        stalled = [subscribe_raw(channel) for channel in stalled_channels[:3]]
        tag_stub = realtime_service_pb2_grpc.RealtimeServiceStub(stalled_channels[3])
        stalled_tag = tag_stub.SubscribeToRunsWithTag(
            realtime_service_pb2.SubscribeToRunsWithTagRequest(tag="t"), metadata=DEV
        )
        sse = [
            await StalledSse(realtime.http_port, "/realtime/v1/runs/run_1").open(),
            await StalledSse(realtime.http_port, "/realtime/v1/runs?tag=t").open(),
        ]
        read: list[int] = []

        async def follow() -> None:
            async for each in subscribe_to_run(reader_channel, DEV, "run_1"):
                read.append(each.version)

        reader = asyncio.create_task(follow())
        # Every subscriber reads the environment's one shared consumer (fan-out in process).
        await eventually(lambda: realtime.realtime.hubs.readers == 7, 15.0)
        assert await consumers(js) == 1
        scheduler.runs["run_1"] = run(EVENTS)
        await publish(js, *(run(v) for v in range(2, EVENTS + 1)))

        await asyncio.wait_for(reader, 120)
        assert read == list(range(1, EVENTS + 1))
        # Every subscriber that stopped reading was cut off: no feed reads events any more, the
        # shared consumer stops once its last reader left, and NATS never dropped the service
        # as a slow consumer.
        await eventually(lambda: realtime.realtime.hubs.readers == 0, 30.0, description="cut off")
        await eventually(lambda: _consumers_are(js, 0), 15.0, description="consumer stopped")
        # A feed leaves the set when its pump task is done, a loop turn after its consumer went.
        await eventually(lambda: not realtime.realtime.feeds, 5.0, description="feeds stopped")
        assert realtime.link.epoch == epoch

        for call in stalled:
            got, error = await drain(call)
            assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert got == list(range(1, len(got) + 1)) and len(got) < EVENTS
            info = resume_info(error)
            assert info == {"reason": "SUBSCRIBER_FELL_BEHIND", "after_version": str(len(got))}
        _, tag_error = await drain(stalled_tag)
        assert tag_error is not None and tag_error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "resume_cursor" in resume_info(tag_error)
        for each in sse:
            events = await each.events()
            assert events[-1][0] == "error", events[-1][:2]
            error_body = orjson.loads(events[-1][2])["error"]
            assert error_body["code"] == "RESOURCE_EXHAUSTED"
            versions = versions_of(events)
            assert versions == list(range(1, len(versions) + 1)) and len(versions) < EVENTS
        # The calls blocked on clients that did not read end once those read their status.
        await eventually(lambda: not realtime.servicer.serving, 10.0)
    finally:
        for channel in [*stalled_channels, reader_channel]:
            await channel.close()


async def _consumers_are(js: JetStreamContext, count: int) -> bool:
    return await consumers(js) == count


@pytest.mark.timeout(180)
async def test_a_cut_off_subscriber_resumes_and_gets_every_version_exactly_once(
    js: JetStreamContext, scheduler: FakeScheduler, realtime: RealtimeService
) -> None:
    scheduler.runs["run_1"] = run(1)
    await publish(js, run(1))
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{realtime.port}") for _ in range(2)]
    try:
        # An SDK subscriber that reads one version, then stops reading for a while.
        sdk = subscribe_to_run(channels[0], DEV, "run_1")
        assert (await anext(sdk)).version == 1
        raw = subscribe_raw(channels[1])
        sse = await StalledSse(realtime.http_port, "/realtime/v1/runs/run_1").open()
        await eventually(lambda: realtime.realtime.hubs.readers == 3, 15.0)
        assert await consumers(js) == 1  # one shared consumer, fanned out in process
        scheduler.runs["run_1"] = run(EVENTS)
        await publish(js, *(run(v) for v in range(2, EVENTS + 1)))
        await eventually(lambda: realtime.realtime.hubs.readers == 0, 60.0, description="cut off")

        # The SDK treats the cut-off as a break: it resumes after the last version it yielded.
        rest = [each.version async for each in sdk]
        assert [1, *rest] == list(range(1, EVENTS + 1))

        # A raw gRPC subscriber resumes where the status says (as often as it is cut off: it
        # catches up on a replay no faster than it reads).
        got, error = await drain(raw)
        while error is not None:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            after = int(resume_info(error)["after_version"])
            assert got == list(range(1, after + 1))
            more, error = await drain(subscribe_raw(channels[1], after_version=after))
            got += more
        assert got == list(range(1, EVENTS + 1))

        # An SSE client resumes from its Last-Event-ID, as an EventSource does.
        events = await sse.events()
        versions = versions_of(events)
        while events[-1][0] == "error":
            last_id = [event_id for kind, event_id, _ in events if kind == "run"][-1]
            assert f"after_version={last_id}" in orjson.loads(events[-1][2])["error"]["message"]
            again = await StalledSse(realtime.http_port, "/realtime/v1/runs/run_1").open(
                f"Last-Event-ID: {last_id}\r\n"
            )
            events = await again.events()
            versions += versions_of(events)
        assert events[-1][0] == "end"
        assert versions == list(range(1, EVENTS + 1))
    finally:
        for channel in channels:
            await channel.close()


@pytest.mark.timeout(60)
async def test_an_event_too_deep_for_json_encoders_does_not_break_sse_feeds(
    js: JetStreamContext, scheduler: FakeScheduler, realtime: RealtimeService
) -> None:
    deep = "[" * 1000 + "]" * 1000  # parsers accept it; encoders give up
    deeper = '{"a":' * 3000 + "1" + "}" * 3000  # too deep even to check: sent as a string
    scheduler.runs["run_1"] = run(1, final_at=3, metadata='{"step": 1}')
    await publish(js, scheduler.runs["run_1"])
    base = f"http://127.0.0.1:{realtime.http_port}/realtime/v1"
    urls = [f"{base}/runs/run_1", f"{base}/runs/run_1", f"{base}/runs?tag=t"]
    feeds: list[list[tuple[str, str]]] = [[] for _ in urls]

    async def follow(
        session: aiohttp.ClientSession, url: str, found: list[tuple[str, str]]
    ) -> None:
        async with session.get(url) as response:
            assert response.status == 200
            kind = ""
            async for line in response.content:
                text = line.decode().rstrip("\n")
                if text.startswith("event: "):
                    kind = text[7:]
                elif text.startswith("data: "):
                    found.append((kind, text[6:]))
                    if kind != "run" or len(found) == 3:
                        return

    async with aiohttp.ClientSession(headers={"Authorization": "Bearer rp_dev_test"}) as session:
        following = asyncio.gather(
            *(follow(session, u, f) for u, f in zip(urls, feeds, strict=True))
        )
        await eventually(lambda: all(feeds), 15.0, description="the first version")
        scheduler.runs["run_1"] = run(3, final_at=3, metadata='{"step": 3}', output=deeper)
        await publish(js, run(2, final_at=3, metadata=deep), scheduler.runs["run_1"])
        await asyncio.wait_for(following, 30)
    for feed in feeds:
        assert [kind for kind, _ in feed] == ["run", "run", "run"], feed[-1][:200]
        first, second, third = (orjson.loads(data) for _, data in feed)
        assert [first["version"], second["version"], third["version"]] == [1, 2, 3]
        assert f'"metadata":{deep}' in feed[1][1]  # its own JSON, not re-encoded
        assert third["output"] == deeper and third["metadata"] == {"step": 3}


@pytest.mark.timeout(60)
async def test_a_subscription_with_a_public_token_ends_when_the_token_expires(
    js: JetStreamContext, scheduler: FakeScheduler, realtime: RealtimeService
) -> None:
    scheduler.runs["run_1"] = run(1)
    await publish(js, run(1))
    expires_at = time.time() + 2.0
    token = public_token(expires_at)
    auth = (("authorization", f"Bearer {token}"),)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{realtime.port}")
    try:
        stub = realtime_service_pb2_grpc.RealtimeServiceStub(channel)
        calls = {
            "run": subscribe_raw(channel, auth=auth),
            "tag": stub.SubscribeToRunsWithTag(
                realtime_service_pb2.SubscribeToRunsWithTagRequest(tag="t"), metadata=auth
            ),
        }
        url = f"http://127.0.0.1:{realtime.http_port}/realtime/v1/runs/run_1?token={token}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            sse_body = asyncio.ensure_future(response.text())
            # No event after the first: each ends at the token's expiry all the same.
            for what, call in calls.items():
                got, error = await asyncio.wait_for(drain(call), 20)
                assert got == [1], what
                assert error is not None, what
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (what, error)
                assert "expired" in (error.details() or ""), what
            body = await asyncio.wait_for(sse_body, 20)
        assert time.time() >= expires_at - 0.05  # ended at expiry, not before
        assert "event: error" in body and '"code":"UNAUTHENTICATED"' in body, body[-300:]
        await eventually(lambda: not realtime.servicer.serving, 10.0)
    finally:
        await channel.close()


@pytest.mark.timeout(120)
async def test_a_stream_reader_that_stops_reading_is_cut_off_at_its_last_index(
    js: JetStreamContext, scheduler: FakeScheduler, realtime: RealtimeService
) -> None:
    scheduler.runs["run_1"] = run(1)
    chunk = orjson.dumps({"pad": PAD}).decode()
    streams = realtime.realtime.streams
    await streams.append("env_dev", "run_1", "s", [chunk], close=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{realtime.port}")
    try:
        stub = realtime_service_pb2_grpc.RealtimeServiceStub(channel)
        request = realtime_service_pb2.ReadStreamRequest(run_id="run_1", stream_id="s")
        stalled = stub.ReadStream(request, metadata=DEV)

        async def readers_are(count: int) -> bool:
            info = await js.stream_info(subjects.RUN_STREAMS_STREAM)
            return int(info.state.consumer_count) == count

        await eventually(lambda: readers_are(1), 15.0)
        for _ in range(EVENTS // 50):
            await streams.append("env_dev", "run_1", "s", [chunk] * 50, close=False)
        await eventually(lambda: readers_are(0), 60.0, description="cut off")

        got: list[int] = []
        error: grpc.aio.AioRpcError | None = None
        try:
            async for response in stalled:
                got.append(response.index)
        except grpc.aio.AioRpcError as failed:
            error = failed
        assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert resume_info(error) == {
            "reason": "SUBSCRIBER_FELL_BEHIND",
            "after_index": str(len(got)),
        }
        assert got == list(range(1, len(got) + 1)) and len(got) < EVENTS
    finally:
        await channel.close()
