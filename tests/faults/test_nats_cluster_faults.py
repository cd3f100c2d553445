"""kill -9 of a NATS node under load, with the relay and the realtime service on a 3-node
JetStream cluster (RUNPLANE_NATS_REPLICAS=3).

The node killed leads RUN_EVENTS at the time (the relay's publishes meet a leader election: no
responders, time-outs), or is the one the relay is connected to (its publishes in flight are
never acknowledged, and it reconnects elsewhere); either way the realtime service may lose its
connection or its consumer. The node stays dead a few seconds, then comes back and catches up.
The ledger check of every fault test follows (every run COMPLETED once, every version in
JetStream once and in order, run subscribers ending at the final version), and: every event's
Nats-Msg-Id is in the stream once, tag subscribers saw every run's final version, and neither
they nor the stream went longer than MAX_STALL without news while triggers kept coming (the
measured figures are printed).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

import pytest

from runplane import Run, RunStatus
from runplane_common import subjects
from tests.helpers.cluster import Cluster
from tests.helpers.load import Load, check_ledger, watch_around
from tests.helpers.nats import NatsCluster, NatsServer
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

COUNT = 300
RATE = 30.0  # triggers per second: 10 s of load, the kill after about 3 s
TAG_SUBSCRIBERS = 4
DOWN = 4.0  # seconds the killed node stays dead
# Generous, for a shared 2-core machine: a failover stalls a subscriber for a few seconds.
MAX_STALL = 15.0


async def follow_tag(load: Load, seen: list[tuple[float, Run]]) -> None:
    async for run in load.client.runs.subscribe_to_runs_with_tag(load.tag):
        seen.append((time.monotonic(), run))


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest time between two receipts (or the window's ends) within [start, end]."""
    inside = [start, *(t for t in times if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(inside))


async def stored_events(nats_cluster: NatsCluster) -> tuple[Counter[str], float]:
    """Each message's Nats-Msg-Id in RUN_EVENTS, counted; and the longest time between two
    messages being stored (seconds), which is how long the relay's publishing stalled."""
    nc = await nats_cluster.connect()
    try:
        js = nc.jetstream(timeout=5)
        total = (await js.stream_info(subjects.RUN_EVENTS_STREAM)).state.messages
        sub = await js.subscribe(f"{subjects.RUN_EVENTS_PREFIX}.>", ordered_consumer=True)
        ids: Counter[str] = Counter()
        stored = []
        for _ in range(total):
            msg = await sub.next_msg(timeout=10)
            ids[(msg.headers or {}).get("Nats-Msg-Id", "")] += 1
            stored.append(msg.metadata.timestamp.timestamp())
        await sub.unsubscribe()
        return ids, max(b - a for a, b in itertools.pairwise(stored))
    finally:
        await nc.close()


async def consumers_delivered_to_the_end(nats_cluster: NatsCluster) -> bool:
    """Some consumer of RUN_EVENTS (the realtime service's, after the failover) has delivered
    the stream's last message: events flow through JetStream again, subscribers are not left
    on the scheduler's snapshots."""
    nc = await nats_cluster.connect()
    try:
        js = nc.jetstream(timeout=5)
        last = (await js.stream_info(subjects.RUN_EVENTS_STREAM)).state.last_seq
        consumers = await js.consumers_info(subjects.RUN_EVENTS_STREAM)
    finally:
        await nc.close()
    delivered = [c.delivered.stream_seq for c in consumers if c.delivered is not None]
    assert delivered, "RUN_EVENTS has no consumer"
    assert max(delivered) == last, f"consumers delivered up to {max(delivered)} of {last}"
    return True


async def consumer_node(nats_cluster: NatsCluster) -> NatsServer:
    """The node that holds the realtime service's consumer of RUN_EVENTS (the one furthest on)."""
    nc = await nats_cluster.connect()
    try:
        consumers = await nc.jetstream(timeout=5).consumers_info(subjects.RUN_EVENTS_STREAM)
    finally:
        await nc.close()
    live = [c for c in consumers if c.delivered is not None and c.cluster and c.cluster.leader]
    assert live, "the realtime service has no consumer of RUN_EVENTS"
    newest = max(live, key=lambda c: c.delivered.stream_seq if c.delivered else 0)
    assert newest.cluster is not None and newest.cluster.leader
    return nats_cluster.node(newest.cluster.leader)


@pytest.mark.parametrize("victim", ["stream-leader", "relay-server", "consumer-server"])
async def test_kill_9_of_a_nats_node_mid_load_loses_no_event_and_stalls_no_subscriber(
    on_nats_cluster: Cluster, nats_cluster: NatsCluster, victim: str
) -> None:
    """``victim``: the node leading RUN_EVENTS (an election), the one the scheduler's relay
    is connected to (its publishes in flight get no acknowledgement; it reconnects), or the one
    holding realtime's consumer (remade elsewhere after missed heartbeats)."""
    cluster = on_nats_cluster
    killed: list[str] = []
    new_leader: list[str] = []

    async def fault(load: Load) -> None:
        if victim == "stream-leader":
            node = await nats_cluster.stream_leader(subjects.RUN_EVENTS_STREAM)
        elif victim == "relay-server":
            node = await nats_cluster.serving("runplane-relay")
        else:
            node = await consumer_node(nats_cluster)
        killed.append(node.url)
        node.kill()
        load.went_down()
        await asyncio.sleep(DOWN)
        new_leader.append((await nats_cluster.stream_leader(subjects.RUN_EVENTS_STREAM)).url)
        await node.start()
        await nats_cluster.wait_ready()

    fault_at = COUNT // 3
    client = cluster.client()
    load = Load(client, COUNT, RATE, watch=watch_around(COUNT, fault_at))
    tag_seen: list[list[tuple[float, Run]]] = [[] for _ in range(TAG_SUBSCRIBERS)]
    followers = [asyncio.create_task(follow_tag(load, seen)) for seen in tag_seen]
    try:
        started = time.monotonic()
        await load.run(fault, fault_at)
        load_ended = time.monotonic()
        assert set(load.retried) <= {"UNAVAILABLE"}, f"{dict(load.retried)}: {load.odd_refusals}"
        runs = await load.finished(timeout=90)
        await check_ledger(cluster, nats_cluster.url, load, runs)

        # Every tag subscriber saw every run reach its final version.
        def all_final() -> bool:
            return all(
                {run.id: run.version for _, run in seen if run.status is RunStatus.COMPLETED}
                == {run_id: run.version for run_id, run in runs.items()}
                for seen in tag_seen
            )

        await eventually(all_final, 60.0, description="every tag subscriber saw every run final")
        await eventually(
            lambda: consumers_delivered_to_the_end(nats_cluster),
            30.0,
            description="the realtime service's consumer delivers again",
        )
        for n, seen in enumerate(tag_seen):
            versions: dict[str, list[int]] = {}
            for _, run in seen:
                versions.setdefault(run.id, []).append(run.version)
            backwards = [r for r, v in versions.items() if v != sorted(set(v))]
            assert not backwards, f"tag subscriber {n}: versions out of order or repeated"
    finally:
        for task in (*followers, *load.subscribers.values()):
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        await client.close()

    # JetStream holds each event once: the relay's retries through the election were dropped
    # as duplicates (Nats-Msg-Id), and none was skipped (the ledger found every version).
    ids, publish_stall = await stored_events(nats_cluster)
    twice = {i: n for i, n in ids.items() if n > 1}
    assert not twice and "" not in ids, f"events stored twice: {list(twice.items())[:5]}"
    assert sum(ids.values()) == sum(run.version for run in runs.values())

    # The stalls: while triggers kept coming, how long each tag subscriber went without news.
    gaps = [
        longest_gap([t for t, _ in seen], max(started, seen[0][0]), load_ended) for seen in tag_seen
    ]
    began, ended = load.fault_window
    print(
        f"killed {victim} {killed[0]} (RUN_EVENTS leader after: {new_leader[0]}); the fault took "
        f"{ended - began:.1f}s; triggers retried {dict(load.retried)}; longest time between "
        f"two events stored {publish_stall:.2f}s; longest tag subscriber gap during the load "
        f"{max(gaps):.2f}s (each: {', '.join(f'{g:.2f}' for g in gaps)})"
    )
    assert new_leader[0] != killed[0], "RUN_EVENTS kept its dead leader"
    if victim == "relay-server":
        assert (await nats_cluster.serving("runplane-relay")).url != killed[0]
    assert max(gaps) < MAX_STALL, f"a tag subscriber stalled {max(gaps):.1f}s"
    assert publish_stall < MAX_STALL, f"no event was stored for {publish_stall:.1f}s"
