"""A bounded load of triggers with a fault injected mid-way, and the ledger checked after it
(the fault tests' common part).

:class:`Load` triggers ``fault-echo`` runs (``tests.faults.tasks``) at a fixed rate, each retried
with its own idempotency key until the API takes it, and follows some of them with subscribers.
:func:`check_ledger` then checks:

- every trigger made exactly one run, and every run is COMPLETED with its own output;
- each COMPLETED run has exactly one completed attempt and no attempt left open;
- the outbox drains, and JetStream holds every version of every run exactly once, in order,
  with one final event, the last;
- the subscribers (``runs.subscribe_to_run``) saw strictly increasing versions ending in the
  run's final state.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import nats
from sqlalchemy import select

import runplane
from runplane import Run, RunStatus
from runplane.v1 import events_pb2, run_pb2
from runplane_common import subjects
from runplane_scheduler.store import tables as db
from tests.helpers.cluster import Cluster

TASK = "fault-echo"
# The API refused the request itself: retrying cannot help.
FATAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
FINAL_PB = frozenset(
    run_pb2.RunStatus.Value("RUN_STATUS_" + s.value) for s in RunStatus if s.is_final
)


def sleep_of(i: int) -> float:
    """Two runs in three are quick; the third sleeps 1 or 2 s."""
    return (0.0, 0.0, 1.0, 0.0, 0.0, 2.0)[i % 6]


@dataclass
class Load:
    """``count`` triggers at ``rate`` per second, each retried until the API takes it."""

    client: runplane.Client
    count: int
    rate: float
    watch: frozenset[int] = frozenset()  # indices whose runs get a subscriber
    sleeps: Callable[[int], float] = sleep_of
    tag: str = field(default_factory=lambda: f"load-{uuid.uuid4().hex[:8]}")
    run_ids: dict[int, str] = field(default_factory=dict)
    retried: Counter[str] = field(default_factory=Counter)
    # One message of each refusal that was not UNAVAILABLE.
    odd_refusals: dict[str, str] = field(default_factory=dict)
    subscribers: dict[int, asyncio.Task[list[tuple[float, Run]]]] = field(default_factory=dict)
    # When the fault began and ended, and when it took something down (time.monotonic()).
    fault_window: tuple[float, float] = (0.0, 0.0)
    down_at: float = 0.0

    async def run(
        self, fault: Callable[[Load], Awaitable[None]] | None = None, fault_at: int = 0
    ) -> None:
        """Trigger everything, starting ``fault(self)`` as trigger ``fault_at`` goes out."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        triggers = []
        fault_task: asyncio.Task[None] | None = None
        for i in range(self.count):
            await asyncio.sleep(max(0.0, start + i / self.rate - loop.time()))
            if fault is not None and i == fault_at:
                fault_task = asyncio.create_task(self._inject(fault))
            triggers.append(asyncio.create_task(self._trigger(i)))
        await asyncio.gather(*triggers)
        if fault_task is not None:
            await fault_task

    async def _inject(self, fault: Callable[[Load], Awaitable[None]]) -> None:
        began = time.monotonic()
        await fault(self)
        self.fault_window = (began, time.monotonic())

    async def _trigger(self, i: int) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                handle = await self.client.tasks.trigger(
                    TASK,
                    {"i": i, "sleep": self.sleeps(i)},
                    tags=[self.tag],
                    idempotency_key=f"{self.tag}:{i}",
                )
                break
            except runplane.ApiError as error:
                if error.code in FATAL or time.monotonic() > deadline:
                    raise
                self.retried[error.code.name] += 1
                if error.code is not grpc.StatusCode.UNAVAILABLE:
                    self.odd_refusals.setdefault(error.code.name, error.message[:300])
                await asyncio.sleep(0.2)
        self.run_ids[i] = handle.id
        if i in self.watch:
            self.subscribers[i] = asyncio.create_task(self._follow(handle.id))

    async def _follow(self, run_id: str) -> list[tuple[float, Run]]:
        """Each version the subscription yields, with when it came."""
        return [(time.monotonic(), run) async for run in self.client.runs.subscribe_to_run(run_id)]

    def went_down(self) -> None:
        """The fault calls this the moment it takes something down."""
        self.down_at = time.monotonic()

    def watched_across_outage(self, after: float = 0.0) -> list[int]:
        """Watched runs whose subscription yielded a version before the outage began and another
        more than ``after`` seconds into it."""
        out = []
        for i, task in self.subscribers.items():
            if task.done() and not task.cancelled() and task.exception() is None:
                times = [t for t, _ in task.result()]
                if times and times[0] < self.down_at and times[-1] > self.down_at + after:
                    out.append(i)
        return out

    async def finished(self, timeout: float = 40.0) -> dict[str, Run]:
        """Every run of the load once all are final; fails naming the stuck ones."""
        deadline = time.monotonic() + timeout
        while True:
            runs = {r.id: r async for r in self.client.runs.list(tag=self.tag, page_size=100)}
            pending = [r for r in runs.values() if not r.is_completed]
            if len(runs) >= self.count and not pending:
                return runs
            if time.monotonic() > deadline:
                statuses = Counter(str(r.status) for r in runs.values())
                stuck = ", ".join(f"{r.id} {r.status} v{r.version}" for r in pending[:5])
                raise AssertionError(
                    f"after {timeout:g}s: {len(runs)}/{self.count} runs, {dict(statuses)}; "
                    f"still running: {stuck}"
                )
            await asyncio.sleep(0.5)


def watch_around(count: int, fault_at: int) -> frozenset[int]:
    """Sleepy runs triggered just before the fault (running through it) and just after."""
    before = [i for i in range(fault_at - 1, -1, -1) if sleep_of(i) > 0][:4]
    after = [i for i in range(fault_at, count) if sleep_of(i) > 0][:2]
    return frozenset(before + after)


# -- the ledger ----------------------------------------------------------------------------------


async def check_ledger(cluster: Cluster, nats_url: str, load: Load, runs: dict[str, Run]) -> None:
    # Every trigger made exactly one run, and every run came from a trigger.
    assert len(load.run_ids) == load.count
    assert len(set(load.run_ids.values())) == load.count, "two triggers got the same run"
    assert set(runs) == set(load.run_ids.values()), (
        f"runs without a trigger: {sorted(set(runs) - set(load.run_ids.values()))[:5]}"
    )
    wrong = []
    for i, run_id in sorted(load.run_ids.items()):
        run = runs[run_id]
        if run.status is not RunStatus.COMPLETED or run.output != {"i": i, "run": run_id}:
            wrong.append(f"#{i} {run_id} {run.status} output={run.output} error={run.error}")
        assert run.payload == {"i": i, "sleep": load.sleeps(i)}
    assert not wrong, f"{len(wrong)} runs did not complete right: {wrong[:5]}"

    await _check_database(cluster.database_url, runs)
    await _check_stream(cluster.database_url, nats_url, runs)
    await _check_subscribers(load, runs)


async def _check_database(database_url: str, runs: dict[str, Run]) -> None:
    engine = db.create_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(db.attempts.c.run_id, db.attempts.c.status).where(
                        db.attempts.c.run_id.in_(list(runs))
                    )
                )
            ).all()
            open_runs = (
                await conn.execute(
                    select(db.runs.c.id).where(
                        db.runs.c.id.in_(list(runs)), db.runs.c.current_attempt_id.is_not(None)
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    by_run: dict[str, Counter[str]] = defaultdict(Counter)
    for run_id, status in rows:
        by_run[run_id][status] += 1
    twice = {r: dict(c) for r, c in by_run.items() if c["COMPLETED"] != 1}
    assert not twice, f"runs without exactly one completed attempt: {list(twice.items())[:5]}"
    dangling = {r: dict(c) for r, c in by_run.items() if c["PENDING"] or c["EXECUTING"]}
    assert not dangling, f"final runs with an attempt still open: {list(dangling.items())[:5]}"
    assert not open_runs, f"final runs still holding an attempt: {open_runs[:5]}"


async def _check_stream(database_url: str, nats_url: str, runs: dict[str, Run]) -> None:
    """The outbox drains, and JetStream has versions 1..n of every run once each, in order."""
    engine = db.create_engine(database_url)
    try:
        deadline = time.monotonic() + 30
        while True:
            async with engine.connect() as conn:
                left = len((await conn.execute(select(db.outbox.c.event_id))).all())
            if left == 0:
                break
            assert time.monotonic() < deadline, f"{left} events never left the outbox"
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()
    nc = await nats.connect(servers=nats_url.split(","))
    try:
        js = nc.jetstream()
        total = (await js.stream_info(subjects.RUN_EVENTS_STREAM)).state.messages
        sub = await js.subscribe(f"{subjects.RUN_EVENTS_PREFIX}.>", ordered_consumer=True)
        events: dict[str, list[events_pb2.RunEvent]] = defaultdict(list)
        for _ in range(total):
            msg = await sub.next_msg(timeout=10)
            event = events_pb2.RunEvent.FromString(msg.data)
            if event.run.id in runs:
                events[event.run.id].append(event)
        await sub.unsubscribe()
    finally:
        await nc.close()
    problems = []
    for run_id, run in runs.items():
        seen = events.get(run_id, [])
        versions = [e.run.version for e in seen]
        finals = [e for e in seen if e.run.status in FINAL_PB]
        if versions != list(range(1, run.version + 1)):
            problems.append(f"{run_id}: versions {versions}, the run is at v{run.version}")
        elif len(finals) != 1 or finals[0] is not seen[-1]:
            problems.append(f"{run_id}: {len(finals)} final events")
        elif seen[-1].run.status != run.raw.status:
            problems.append(f"{run_id}: last event {seen[-1].run.status}, run {run.status}")
    assert not problems, f"{len(problems)} runs' events are wrong: {problems[:5]}"


async def _check_subscribers(load: Load, runs: dict[str, Run]) -> None:
    assert load.subscribers, "no subscriber was started"
    _, pending = await asyncio.wait(load.subscribers.values(), timeout=60)
    for task in pending:
        task.cancel()
    assert not pending, f"{len(pending)} subscriptions never ended"
    for i, task in load.subscribers.items():
        history = [run for _, run in task.result()]
        run = runs[load.run_ids[i]]
        versions = [r.version for r in history]
        assert history, f"subscriber of #{i} saw nothing"
        assert all(a < b for a, b in itertools.pairwise(versions)), versions
        assert history[-1].status is run.status and history[-1].version == run.version, (
            f"subscriber of #{i} ended at v{versions[-1]} {history[-1].status}, "
            f"the run is at v{run.version} {run.status}"
        )
        assert history[-1].output == run.output
        assert not any(r.is_completed for r in history[:-1]), [r.status for r in history]


async def load_with_fault(
    cluster: Cluster,
    nats_url: str,
    fault: Callable[[Load], Awaitable[None]],
    count: int = 120,
    rate: float = 40.0,
    refusals: frozenset[str] = frozenset({"UNAVAILABLE"}),
) -> tuple[Load, dict[str, Run]]:
    """``count`` triggers at ``rate``/s with ``fault`` a third of the way in; then the ledger."""
    fault_at = count // 3
    client = cluster.client()
    load = Load(client, count, rate, watch=watch_around(count, fault_at))
    try:
        await load.run(fault, fault_at)
        # A trigger the fault refused was refused as worth a retry.
        assert set(load.retried) <= refusals, (
            f"refused triggers: {dict(load.retried)}: {load.odd_refusals}"
        )
        runs = await load.finished()
        await check_ledger(cluster, nats_url, load, runs)
        began, ended = load.fault_window
        retried = sum(1 for r in runs.values() if r.attempt_count > 1)
        print(
            f"fault took {ended - began:.1f}s; triggers retried: {dict(load.retried)}; "
            f"runs with a second attempt: {retried}"
        )
    finally:
        for task in load.subscribers.values():
            task.cancel()
        await client.close()
    return load, runs
