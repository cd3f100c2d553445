"""The relay and the realtime service against a 3-node JetStream cluster (RUNPLANE_NATS_URL
naming all three, RUNPLANE_NATS_REPLICAS=3), and how runplane sets a stream's replicas."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

import runplane
from runplane import RunStatus
from runplane_common import subjects
from runplane_common.jetstream import StreamSetupError
from runplane_scheduler.relay import ensure_streams
from tests.helpers.cluster import Cluster
from tests.helpers.nats import NatsCluster, NatsServer
from tests.helpers.wait import eventually

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def on_cluster(
    tmp_path: Path, nats_cluster: NatsCluster, database_url: str
) -> AsyncIterator[Cluster]:
    c = Cluster(
        tmp_path,
        nats_cluster.url,
        database_url,
        tasks="tests.faults.tasks",
        env={"RUNPLANE_NATS_REPLICAS": "3"},
    )
    await c.start()
    try:
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        await c.stop()


async def _replicated(nats_cluster: NatsCluster, stream: str) -> bool:
    """The stream has 3 replicas: a leader and two current followers."""
    nc = await nats_cluster.connect()
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    assert info.config.num_replicas == 3, info.config
    assert info.cluster is not None and info.cluster.leader, info.cluster
    followers = info.cluster.replicas or []
    return len(followers) == 2 and all(r.current for r in followers)


async def test_a_run_on_a_three_node_nats_cluster_shows_every_version_to_a_subscriber(
    on_cluster: Cluster, nats_cluster: NatsCluster
) -> None:
    client = on_cluster.client()
    try:
        handle = await client.tasks.trigger("fault-echo", {"i": 7, "sleep": 0.5})
        seen = await asyncio.wait_for(
            _versions(client.runs.subscribe_to_run(handle.id)), timeout=60
        )
        run = await client.runs.retrieve(handle)
        assert run.status is RunStatus.COMPLETED
        assert [r.version for r in seen] == list(range(1, run.version + 1))
        assert seen[-1].status is RunStatus.COMPLETED and seen[-1].output == run.output
        # Run streams go through the cluster too (the realtime service makes RUN_STREAMS).
        writer = await client.tasks.trigger("fault-stream", {"n": 5, "every": 0})
        chunks = runplane.Stream[Any]("chunks", client)
        read = await asyncio.wait_for(_chunks(chunks, writer.id), timeout=60)
        assert read == list(range(5))
    finally:
        await client.close()
    for stream in (subjects.RUN_EVENTS_STREAM, subjects.RUN_STREAMS_STREAM):
        await eventually(
            lambda stream=stream: _replicated(nats_cluster, stream),  # type: ignore[misc]
            20.0,
            description=f"{stream} at 3 current replicas",
        )


async def _versions(runs: AsyncIterator[runplane.Run]) -> list[runplane.Run]:
    return [run async for run in runs]


async def _chunks(stream: runplane.Stream[Any], run_id: str) -> list[int]:
    return [int(chunk["i"]) async for chunk in stream.read(run_id)]


async def test_a_stream_made_with_one_replica_is_raised_to_the_setting(
    nats_cluster: NatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats_cluster.connect()
    try:
        js = nc.jetstream(timeout=5)
        await ensure_streams(js, replicas=1)
        assert (await js.stream_info(subjects.RUN_EVENTS_STREAM)).config.num_replicas == 1
        await js.publish(subjects.run_event("env", "run_1"), b"kept")
        with caplog.at_level(logging.INFO, logger="runplane.jetstream"):
            await ensure_streams(js, replicas=3)
        assert "RUN_EVENTS updated: num_replicas 1 -> 3" in caplog.text
        info = await js.stream_info(subjects.RUN_EVENTS_STREAM)
        assert (info.config.num_replicas, info.state.messages) == (3, 1)
        await ensure_streams(js, replicas=3)  # the same again changes nothing
    finally:
        await nc.close()


async def test_replicas_a_single_server_cannot_keep_are_named_as_the_setting(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        with pytest.raises(StreamSetupError, match="RUNPLANE_NATS_REPLICAS=3 needs a JetStream"):
            await ensure_streams(js, replicas=3)
        # NATS takes the update of an existing stream, and keeps one copy: the log says so.
        await ensure_streams(js, replicas=1)
        with caplog.at_level(logging.INFO, logger="runplane.jetstream"):
            await ensure_streams(js, replicas=3)
        assert "RUN_EVENTS updated: num_replicas 1 -> 3" in caplog.text
        assert "NATS is not a JetStream cluster: it keeps one copy" in caplog.text
    finally:
        await nc.close()
