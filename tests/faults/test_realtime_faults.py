"""kill -9 of the realtime service in the middle of a fan-out: every subscriber resumes with no gap.

One realtime process serves, at once, many SDK subscribers of one tag, SSE clients of the same tag
(resuming from their Last-Event-ID, as an EventSource does), subscribers of single runs, and
readers of one run stream while a task writes it. In that process they all share one JetStream
consumer of the environment's events (and one of the stream): the fan-out is in process. The
service is killed while runs are changing and chunks are being written, and started again. Then
every subscriber must have seen, for every run, every version from the first to the final one,
once each and in order, and every reader every chunk once, in order; and each must have received
something before the kill and something after it (it resumed, rather than finishing early).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats
import orjson
import pytest

import runplane
from runplane import Run, RunStatus
from runplane_cli.dev import wait_serving
from runplane_common import subjects
from tests.helpers.cluster import Cluster
from tests.helpers.nats import NatsServer
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

TAG_SUBSCRIBERS = 40
SSE_CLIENTS = 8
STREAM_READERS = 8
RUNS = 60
RATE = 20.0  # triggers per second
CHUNKS = 300  # the stream's chunks, one every 10 ms
DEAD = 0.5  # seconds between the kill and the restart


def sleep_of(i: int) -> float:
    """Two runs in three are quick; the third sleeps 1 or 3 s (it runs through the kill)."""
    return (0.0, 0.0, 1.0, 0.0, 0.0, 3.0)[i % 6]


@dataclass
class Seen:
    """What one subscriber received: each run's versions in arrival order, and when."""

    versions: dict[str, list[int]] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)

    def add(self, run_id: str, version: int, status: str) -> None:
        self.versions.setdefault(run_id, []).append(version)
        self.statuses[run_id] = status
        self.times.append(time.monotonic())

    def problems(self, finals: dict[str, Run]) -> list[str]:
        """Every version of every run from 1 to its final one, once each, in order."""
        out = []
        for run_id, run in finals.items():
            seen = self.versions.get(run_id, [])
            if seen != list(range(1, run.version + 1)):
                out.append(f"{run_id}: saw {seen}, the run is at v{run.version}")
            elif self.statuses[run_id] != run.status.value:
                out.append(f"{run_id}: last saw {self.statuses[run_id]}, the run is {run.status}")
        return out

    def across(self, down_at: float, back_at: float) -> bool:
        """Received something before the kill and something once the service was back."""
        return bool(self.times) and self.times[0] < down_at and self.times[-1] > back_at


async def follow_tag(client: runplane.Client, tag: str, seen: Seen) -> None:
    async for run in client.runs.subscribe_to_runs_with_tag(tag):
        seen.add(run.id, run.version, run.status.value)


async def follow_run(client: runplane.Client, run_id: str, seen: Seen) -> None:
    async for run in client.runs.subscribe_to_run(run_id):
        seen.add(run.id, run.version, run.status.value)


async def follow_sse(url: str, key: str, seen: Seen) -> None:
    """An EventSource: reads ``event: run`` events, and after a broken connection reconnects
    with the last event id it got."""
    last_id = ""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            headers = {"Authorization": f"Bearer {key}"}
            if last_id:
                headers["Last-Event-ID"] = last_id
            try:
                async with session.get(url, headers=headers) as response:
                    if response.status != 200:
                        raise AssertionError(f"{url}: HTTP {response.status}")
                    kind, event_id = "", ""
                    async for raw in response.content:
                        line = raw.decode().rstrip("\n")
                        if line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("id: "):
                            event_id = line[4:]
                        elif line.startswith("data: ") and kind == "run":
                            run = orjson.loads(line[6:])
                            status = run["status"].removeprefix("RUN_STATUS_")
                            seen.add(run["id"], int(run.get("version", 0)), status)
                            last_id = event_id or last_id
                        elif line.startswith("data: ") and kind == "error":
                            raise AssertionError(f"{url}: error event {line[6:]}")
                        elif not line:
                            kind, event_id = "", ""
            except (aiohttp.ClientError, ConnectionError):
                pass  # the service went away: reconnect, as an EventSource does
            await asyncio.sleep(0.2)


async def read_chunks(
    stream: runplane.Stream[Any], run_id: str, got: list[tuple[float, int]]
) -> None:
    async for chunk in stream.read(run_id):
        got.append((time.monotonic(), int(chunk["i"])))


async def event_consumers(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(subjects.RUN_EVENTS_STREAM)
        return int(info.state.consumer_count)
    finally:
        await nc.close()


async def test_kill_9_of_the_realtime_service_mid_fan_out_every_subscriber_resumes_gap_free(
    cluster: Cluster, nats_server: NatsServer
) -> None:
    client = cluster.client()
    key = cluster.keys["dev"]
    tag = f"fan-{uuid.uuid4().hex[:8]}"
    chunks = runplane.Stream[Any]("chunks", client)
    tag_seen = [Seen() for _ in range(TAG_SUBSCRIBERS)]
    sse_seen = [Seen() for _ in range(SSE_CLIENTS)]
    run_seen: dict[str, Seen] = {}
    read: list[list[tuple[float, int]]] = [[] for _ in range(STREAM_READERS)]
    followers: list[asyncio.Task[None]] = []
    try:
        sse_url = f"{cluster.realtime_http_url}/realtime/v1/runs?tag={tag}"
        followers += [asyncio.create_task(follow_tag(client, tag, s)) for s in tag_seen]
        followers += [asyncio.create_task(follow_sse(sse_url, key, s)) for s in sse_seen]
        # Every subscriber is connected once each has the marker run.
        marker = await client.tasks.trigger("fault-echo", {"i": -1, "sleep": 0}, tags=[tag])
        everyone = [*tag_seen, *sse_seen]
        await eventually(
            lambda: all(s.statuses.get(marker.id) == "COMPLETED" for s in everyone),
            60.0,
            description="every subscriber saw the marker run complete",
        )
        # One consumer of the environment's events for all of them (the fan-out is in process).
        assert await event_consumers(nats_server.url) == 1

        writer = await client.tasks.trigger(
            "fault-stream", {"n": CHUNKS, "every": 0.01}, tags=[tag]
        )
        followers += [asyncio.create_task(read_chunks(chunks, writer.id, got)) for got in read]
        await eventually(lambda: all(read), 30.0, description="every reader has a chunk")

        handles: dict[int, str] = {}
        down_at = 0.0
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(RUNS):
            await asyncio.sleep(max(0.0, start + i / RATE - loop.time()))
            if i == RUNS // 2:
                # Mid-load: runs are changing, chunks are being written, everyone is reading.
                # Each run subscriber has its first version (on a loaded machine the last one,
                # started 50 ms ago, may not have run yet); their runs sleep 3 s, through the kill.
                await eventually(
                    lambda: all(s.times for s in run_seen.values()),
                    30.0,
                    description="every run subscriber has its run's first version",
                )
                cluster.realtime.kill()
                down_at = time.monotonic()
                await asyncio.sleep(DEAD)
                cluster.realtime.start()
                await wait_serving(cluster.realtime_url, 60)
            handle = await client.tasks.trigger(
                "fault-echo", {"i": i, "sleep": sleep_of(i)}, tags=[tag]
            )
            handles[i] = handle.id
            if sleep_of(i) == 3.0 and RUNS // 2 - 14 <= i < RUNS // 2:  # runs through the kill
                seen = run_seen[handle.id] = Seen()
                followers.append(asyncio.create_task(follow_run(client, handle.id, seen)))

        ids = [marker.id, writer.id, *handles.values()]
        finals: dict[str, Run] = {}

        async def all_final() -> bool:
            for run_id in ids:
                if run_id not in finals or not finals[run_id].is_completed:
                    finals[run_id] = await client.runs.retrieve(run_id)
            return all(run.is_completed for run in finals.values())

        await eventually(all_final, 90.0, description="every run final", interval=0.5)
        assert all(run.status is RunStatus.COMPLETED for run in finals.values())
        # The subscribers catch up with the final versions.
        await eventually(
            lambda: all(s.statuses.get(r) == finals[r].status.value for s in everyone for r in ids),
            60.0,
            description="every tag subscriber saw every run final",
        )
        await eventually(
            lambda: all(len(got) >= CHUNKS for got in read), 60.0, description="every chunk read"
        )
        await asyncio.sleep(0.5)  # anything extra (a repeat) would arrive now

        # The marker may have been listed (at its final version) to a subscriber that was not
        # connected yet when it ran; every later run must come version by version.
        loaded = {run_id: run for run_id, run in finals.items() if run_id != marker.id}
        problems = {
            f"tag subscriber {n}": p for n, s in enumerate(tag_seen) if (p := s.problems(loaded))
        }
        problems |= {
            f"SSE client {n}": p for n, s in enumerate(sse_seen) if (p := s.problems(loaded))
        }
        problems |= {
            f"subscriber of {r}": p
            for r, s in run_seen.items()
            if (p := s.problems({r: finals[r]}))
        }
        assert not problems, {k: v[:3] for k, v in list(problems.items())[:5]}
        for n, got in enumerate(read):
            assert [i for _, i in got] == list(range(CHUNKS)), f"stream reader {n}"

        # Each resumed: it received before the kill and after it. The service was dead for at
        # least DEAD seconds, so what came later came from the restarted one.
        back_at = down_at + DEAD
        assert run_seen, "no run subscriber was started before the kill"
        stale = [n for n, s in enumerate([*tag_seen, *sse_seen]) if not s.across(down_at, back_at)]
        assert not stale, f"set subscribers that did not span the kill: {stale}"
        stale = [r for r, s in run_seen.items() if not s.across(down_at, back_at)]
        assert not stale, f"run subscribers that did not span the kill: {stale}"
        stale = [
            n for n, got in enumerate(read) if not (got[0][0] < down_at and got[-1][0] > back_at)
        ]
        assert not stale, f"stream readers that did not span the kill: {stale}"
    finally:
        for follower in followers:
            follower.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        await client.close()
