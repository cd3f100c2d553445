"""End to end realtime: subscriptions under load and faults, streams, public tokens over gRPC and
SSE, trigger by URL. Every service is its own process, with a real nats-server and database."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

import runplane
from runplane import Run, RunStatus
from runplane.v1 import (
    meta_service_pb2,
    meta_service_pb2_grpc,
    realtime_service_pb2,
    realtime_service_pb2_grpc,
)
from runplane_common.auth import Principal
from runplane_scheduler.keys import PublicTokens
from runplane_scheduler.store import tables as db
from tests.helpers.cluster import Cluster
from tests.helpers.nats import NatsServer
from tests.helpers.registration import register_tasks
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TASKS = "tests.e2e.realtime_tasks"


CLUSTER_TASKS = TASKS


@dataclass
class Seen:
    """What one subscriber saw: each run's versions in arrival order."""

    versions: dict[str, list[int]] = field(default_factory=dict)
    last: dict[str, Run] = field(default_factory=dict)

    def add(self, run: Run) -> None:
        self.versions.setdefault(run.id, []).append(run.version)
        self.last[run.id] = run

    def final(self, run_id: str) -> bool:
        return run_id in self.last and self.last[run_id].is_completed

    def assert_complete(self, final: dict[str, Run]) -> None:
        """No gap, no repeat, no reordering, and ending with the run's final version."""
        for run_id, run in final.items():
            seen = self.versions[run_id]
            assert seen == list(range(seen[0], run.version + 1)), (run_id, seen, run.version)
            assert self.last[run_id].status is run.status


async def _follow_run(client: runplane.Client, run_id: str, seen: Seen) -> None:
    async for run in client.runs.subscribe_to_run(run_id):
        seen.add(run)


async def _follow_tag(client: runplane.Client, tag: str, seen: Seen) -> None:
    async for run in client.runs.subscribe_to_runs_with_tag(tag):
        seen.add(run)


async def _finals(client: runplane.Client, ids: list[str]) -> dict[str, Run]:
    return {i: await client.runs.retrieve(i) for i in ids}


# Each workload: (task id, payload) triggered many times at once. Retrying runs give each run
# many versions; add workloads (metadata updates from inside tasks, say) here.
WORKLOADS = [
    ("flaky", {"succeed_on": 2}),
    ("hello-world", {"name": "load"}),
    ("metadata-steps", {"steps": 3}),  # three metadata flushes: three run updates each
]


async def test_200_concurrent_runs_every_subscriber_sees_every_version_in_order(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    tag_seen = Seen()
    tag_follower = asyncio.create_task(_follow_tag(client, "load", tag_seen))
    handles = await asyncio.gather(
        *(
            client.tasks.trigger(task_id, payload, tags=["load"])
            for i in range(200)
            for task_id, payload in [WORKLOADS[i % len(WORKLOADS)]]
        )
    )
    ids = [h.id for h in handles]
    run_seen = Seen()
    followers = [asyncio.create_task(_follow_run(client, i, run_seen)) for i in ids]
    await asyncio.wait_for(asyncio.gather(*followers), 240)
    finals = await _finals(client, ids)
    assert {r.status for r in finals.values()} == {RunStatus.COMPLETED}
    assert any(r.attempt_count == 2 for r in finals.values())
    with_metadata = [r for r in finals.values() if r.task_id == "metadata-steps"]
    assert with_metadata and all(r.metadata == {"step": 2} for r in with_metadata)
    run_seen.assert_complete(finals)
    for seen in run_seen.versions.values():
        assert seen[0] == 1  # a subscription replays the run from its first version
    await eventually(lambda: all(tag_seen.final(i) for i in ids), timeout=120)
    tag_follower.cancel()
    tag_seen.assert_complete(finals)


async def test_subscribers_resume_after_the_realtime_service_is_killed(cluster: Cluster) -> None:
    client = cluster.client()
    handles = [
        await client.tasks.trigger("flaky", {"succeed_on": 3}, tags=["resume"]) for _ in range(5)
    ]
    ids = [h.id for h in handles]
    run_seen, tag_seen = Seen(), Seen()
    follower = asyncio.create_task(_follow_run(client, ids[0], run_seen))
    tag_follower = asyncio.create_task(_follow_tag(client, "resume", tag_seen))
    await eventually(lambda: len(tag_seen.versions) == 5, timeout=60)
    cluster.realtime.kill()
    cluster.realtime.start()
    await asyncio.wait_for(follower, 120)
    await eventually(lambda: all(tag_seen.final(i) for i in ids), timeout=120)
    tag_follower.cancel()
    finals = await _finals(client, ids)
    run_seen.assert_complete({ids[0]: finals[ids[0]]})
    tag_seen.assert_complete(finals)


async def test_a_nats_outage_mid_run_still_ends_with_the_final_state(
    cluster: Cluster, nats_server: NatsServer
) -> None:
    client = cluster.client()
    handles = [
        await client.tasks.trigger("flaky", {"succeed_on": 3}, tags=["outage"]) for _ in range(3)
    ]
    ids = [h.id for h in handles]
    run_seen, tag_seen = Seen(), Seen()
    follower = asyncio.create_task(_follow_run(client, ids[0], run_seen))
    tag_follower = asyncio.create_task(_follow_tag(client, "outage", tag_seen))
    await eventually(lambda: len(tag_seen.versions) == 3, timeout=60)
    await nats_server.stop()
    try:
        # The runs go on (the scheduler keeps their events in its outbox); the subscribers
        # follow the scheduler meanwhile.
        await eventually(lambda: all(tag_seen.final(i) for i in ids), timeout=120)
    finally:
        await nats_server.start()
    await asyncio.wait_for(follower, 120)
    tag_follower.cancel()
    finals = await _finals(client, ids)
    assert {r.status for r in finals.values()} == {RunStatus.COMPLETED}
    assert run_seen.last[ids[0]].version == finals[ids[0]].version
    assert tag_seen.last[ids[0]].version == finals[ids[0]].version
    for seen in (run_seen, tag_seen):  # in order, each once; a snapshot may skip versions
        for versions in seen.versions.values():
            assert versions == sorted(set(versions))


async def test_a_tag_subscription_sees_existing_and_new_runs_with_the_tag(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    before = await client.tasks.trigger("hello-world", {"name": "early"}, tags=["t1", "x"])
    await client.tasks.trigger("hello-world", {"name": "other"}, tags=["t2"])
    seen = Seen()
    follower = asyncio.create_task(_follow_tag(client, "t1", seen))
    await eventually(lambda: seen.final(before.id), timeout=60)
    after = await client.tasks.trigger("hello-world", {"name": "late"}, tags=["t1"])
    await eventually(lambda: seen.final(after.id), timeout=60)
    follower.cancel()
    assert set(seen.versions) == {before.id, after.id}
    seen.assert_complete(await _finals(client, [before.id, after.id]))
    assert seen.versions[after.id][0] == 1


async def test_a_late_reader_gets_the_stream_from_its_first_chunk(cluster: Cluster) -> None:
    client = cluster.client()
    tokens = runplane.Stream[str]("tokens", client)
    handle = await client.tasks.trigger("stream-words", {"n": 20, "linger": 1})
    live = [chunk async for chunk in tokens.read(handle)]  # ends when the run finishes
    assert (await client.runs.retrieve(handle)).status is RunStatus.COMPLETED
    late = [chunk async for chunk in tokens.read(handle)]
    assert live == late == [f"word-{i}" for i in range(20)]
    assert [c async for c in tokens.read(handle, after_index=18)] == ["word-18", "word-19"]

    two = await client.tasks.trigger("stream-two-writers", {"n": 10})
    run = await client.runs.poll(two, interval=0.1, timeout=60)
    assert run.output == list(range(1, 21))  # every append got its own index
    chunks = [c async for c in tokens.read(two)]
    assert len(chunks) == 20
    for writer in ("a", "b"):
        assert [c["i"] for c in chunks if c["writer"] == writer] == list(range(10))


async def test_read_stream_groups_ready_chunks_only_when_asked(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("stream-words", {"n": 50})
    await client.runs.poll(handle, interval=0.1, timeout=60)
    channel = await client.transport.realtime_channel()
    stub = realtime_service_pb2_grpc.RealtimeServiceStub(channel)

    async def read(most: int) -> list[list[tuple[int, str]]]:
        request = realtime_service_pb2.ReadStreamRequest(
            run_id=handle.id, stream_id="tokens", max_chunks_per_response=most
        )
        return [
            [(r.index, r.data), *((c.index, c.data) for c in r.more_chunks)]
            async for r in stub.ReadStream(request, metadata=client.transport.metadata())
        ]

    want = [(i + 1, json.dumps(f"word-{i}")) for i in range(50)]
    # An older client asks for nothing: one chunk per response, as before.
    one_each = await read(0)
    assert [chunk for response in one_each for chunk in response] == want
    assert {len(response) for response in one_each} == {1}
    # Chunks that are ready together (here the whole finished stream) go 8 to a response.
    grouped = await read(8)
    assert [chunk for response in grouped for chunk in response] == want
    assert [len(response) for response in grouped] == [8] * 6 + [2]
    # The SDK asks for groups, and yields chunk by chunk.
    tokens = runplane.Stream[str]("tokens", client)
    assert [c async for c in tokens.read(handle, after_index=45)] == [
        f"word-{i}" for i in range(45, 50)
    ]


async def test_a_child_writes_to_its_parents_and_roots_stream(cluster: Cluster) -> None:
    client = cluster.client()
    tokens = runplane.Stream[dict[str, str]]("tokens", client)
    handle = await client.tasks.trigger("stream-parent", {})
    run = await client.runs.poll(handle, interval=0.1, timeout=90)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    chunks = [c async for c in tokens.read(handle)]
    assert chunks == [
        {"from": "parent"},
        {"from": "child", "to": "parent"},
        {"from": "child", "to": "root"},  # the parent is also the root here
    ]
    child = await client.runs.retrieve(run.output)
    assert child.parent_run_id == handle.id


async def test_stream_limits_are_invalid_arguments_naming_the_limit(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("hello-world", {"name": "x"})
    tokens = runplane.Stream[str]("tokens", client)
    with pytest.raises(runplane.InvalidArgumentError, match="RUNPLANE_STREAM_CHUNK_BYTES"):
        await tokens.append("x" * (1024 * 1024 + 1), target=handle.id)
    with pytest.raises(runplane.InvalidArgumentError, match="stream_id"):
        await runplane.Stream[str]("no spaces", client).append("x", target=handle.id)
    assert await tokens.append("ok", target=handle.id) == 1
    await tokens.close(target=handle.id)
    assert [c async for c in tokens.read(handle)] == ["ok"]
    with pytest.raises(runplane.FailedPreconditionError, match="closed"):
        await tokens.append("late", target=handle.id)
    public = _public(cluster, handle.public_access_token)
    with pytest.raises(runplane.PermissionDeniedError):
        await runplane.Stream[str]("tokens", public).append("x", target=handle.id)


def _public(cluster: Cluster, token: str) -> runplane.Client:
    return runplane.Client(
        api_url=cluster.api_url, secret_key=token, realtime_url=cluster.realtime_url
    )


async def _expired_token(cluster: Cluster, env_id: str, scopes: list[str]) -> str:
    engine = db.create_engine(cluster.database_url)
    try:
        return await PublicTokens(engine).mint(
            Principal(env_id, "dev"), scopes, int(time.time() * 1000) - 1000
        )
    finally:
        await engine.dispose()


async def _sse(
    session: aiohttp.ClientSession, url: str, **params: str
) -> tuple[int, list[tuple[str, Any]]]:
    """Status and (event, data) pairs of an SSE response read to its end."""
    async with session.get(url, params=params) as response:
        if response.status != 200:
            return response.status, [("error", await response.json())]
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events: list[tuple[str, Any]] = []
        event = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((event, json.loads(line.removeprefix("data: "))))
                if event in ("end", "error"):
                    break
        return 200, events


async def test_public_tokens_over_grpc_and_sse(cluster: Cluster) -> None:
    client = cluster.client()
    a = await client.tasks.trigger("stream-words", {"n": 3}, tags=["mine"])
    b = await client.tasks.trigger("hello-world", {"name": "b"}, tags=["theirs"])
    await client.runs.poll(a, interval=0.1, timeout=60)
    env_id = (await client.runs.retrieve(a)).raw.environment_id
    run_token = a.public_access_token
    tag_token = await client.auth.create_public_token(scopes={"read": {"tags": ["mine"]}})
    expired = await _expired_token(cluster, env_id, [f"read:runs:{a.id}"])

    # gRPC: the token's run, and nothing else.
    public = _public(cluster, run_token)
    assert [r.status async for r in public.runs.subscribe_to_run(a)][-1] is RunStatus.COMPLETED
    assert [c async for c in runplane.Stream[str]("tokens", public).read(a)] == [
        "word-0",
        "word-1",
        "word-2",
    ]
    with pytest.raises(runplane.PermissionDeniedError):
        [r async for r in public.runs.subscribe_to_run(b)]
    with pytest.raises(runplane.PermissionDeniedError):
        [r async for r in public.runs.subscribe_to_runs_with_tag("theirs")]
    with pytest.raises(runplane.UnauthenticatedError):
        [r async for r in _public(cluster, expired).runs.subscribe_to_run(a)]
    tagged = _public(cluster, tag_token)
    first = await anext(aiter(tagged.runs.subscribe_to_runs_with_tag("mine")))
    assert first.id == a.id

    # SSE: the same rules, with ?token= (EventSource) or a Bearer header, at the HTTP address
    # the scheduler announces.
    meta = meta_service_pb2_grpc.MetaServiceStub(public.transport.channel())
    info = await public.transport.call(meta.GetServerInfo, meta_service_pb2.GetServerInfoRequest())
    assert info.realtime_http_url == cluster.realtime_http_url
    assert info.environment_id == env_id
    base = info.realtime_http_url
    async with aiohttp.ClientSession() as session:
        status, events = await _sse(session, f"{base}/realtime/v1/runs/{a.id}", token=run_token)
        assert status == 200
        runs = [data for event, data in events if event == "run"]
        assert [r["version"] for r in runs] == list(range(1, runs[-1]["version"] + 1))
        assert runs[-1]["status"] == "RUN_STATUS_COMPLETED" and events[-1][0] == "end"
        status, events = await _sse(
            session, f"{base}/realtime/v1/streams/{a.id}/tokens", token=run_token
        )
        assert [d["data"] for e, d in events if e == "chunk"] == ["word-0", "word-1", "word-2"]
        status, events = await _sse(session, f"{base}/realtime/v1/runs/{b.id}", token=run_token)
        assert status == 403 and events[0][1]["error"]["code"] == "PERMISSION_DENIED"
        status, _ = await _sse(session, f"{base}/realtime/v1/runs", tag="theirs", token=tag_token)
        assert status == 403
        status, events = await _sse(session, f"{base}/realtime/v1/runs/{a.id}", token=expired)
        assert status == 401 and events[0][1]["error"]["code"] == "UNAUTHENTICATED"
        status, _ = await _sse(session, f"{base}/realtime/v1/runs/{a.id}")
        assert status == 401
        async with session.get(
            f"{base}/realtime/v1/runs",
            params={"tag": "mine"},
            headers={"Authorization": f"Bearer {tag_token}", "Origin": "http://app.example"},
        ) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            async for raw in response.content:
                if raw.startswith(b"data: "):
                    assert json.loads(raw[6:])["id"] == a.id
                    break


async def test_a_single_use_trigger_token_triggers_once_over_http(cluster: Cluster) -> None:
    client = cluster.client()
    token = await client.auth.create_trigger_public_token("hello-world")
    url = f"{cluster.realtime_http_url}/api/v1/tasks/hello-world/trigger"
    headers = {"Authorization": f"Bearer {token}"}
    body = {"payload": {"name": "browser"}, "options": {"tags": ["web"]}}
    async with aiohttp.ClientSession() as session:
        async with session.options(
            url, headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
        ) as preflight:
            assert preflight.status == 204
            assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
        async with session.post(url, json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            created = await response.json()
        async with session.post(url, json=body, headers=headers) as again:
            assert again.status == 401
        other = f"{cluster.realtime_http_url}/api/v1/tasks/flaky/trigger"
        multi = await client.auth.create_trigger_public_token("hello-world", multiple_use=True)
        async with session.post(
            other, json=body, headers={"Authorization": f"Bearer {multi}"}
        ) as wrong:
            assert wrong.status == 403
    run = await client.runs.poll(created["id"], interval=0.1, timeout=60)
    assert run.payload == {"name": "browser"} and run.tags == ["web"]
    reader = _public(cluster, created["publicAccessToken"])
    assert (await reader.runs.retrieve(created["id"])).status is RunStatus.COMPLETED


async def test_a_secret_key_of_one_environment_sees_nothing_of_another(cluster: Cluster) -> None:
    dev, prod = cluster.client("dev"), cluster.client("prod")
    handle = await dev.tasks.trigger("stream-words", {"n": 2}, tags=["env-test"])
    await dev.runs.poll(handle, interval=0.1, timeout=60)
    with pytest.raises(runplane.NotFoundError):
        [r async for r in prod.runs.subscribe_to_run(handle)]
    with pytest.raises(runplane.NotFoundError):
        [c async for c in runplane.Stream[str]("tokens", prod).read(handle)]
    with pytest.raises(runplane.NotFoundError):
        await runplane.Stream[str]("tokens", prod).append("x", target=handle.id)
    seen = Seen()
    follower = asyncio.create_task(_follow_tag(prod, "env-test", seen))
    await register_tasks(cluster.api_url, cluster.worker_keys["prod"], ("not-deployed",))
    marker = await prod.tasks.trigger("not-deployed", {}, tags=["env-test"])
    await eventually(lambda: marker.id in seen.versions, timeout=60)
    follower.cancel()
    assert handle.id not in seen.versions
