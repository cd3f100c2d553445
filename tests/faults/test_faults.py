"""Fault injection under load, each followed by a ledger check.

Every test triggers a bounded load at a fixed rate (quick runs and 1-2 s sleeps of
``fault-echo``, each trigger retried with its own idempotency key until the API takes it), injects
one fault mid-load, and then checks the ledger:

- every trigger made exactly one run, and every run is COMPLETED with its own output;
- each COMPLETED run has exactly one completed attempt and no attempt left open;
- the outbox drains, and JetStream holds every version of every run exactly once, in order,
  with one final event, the last;
- a few subscribers (``runs.subscribe_to_run``) saw strictly increasing versions ending in the
  run's final state.

The cluster's lease timeout is 3 s, so a lost executor is noticed in about 3 s.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import nats
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

import runplane
from runplane import Run, RunStatus
from runplane.v1 import events_pb2, run_pb2
from runplane_cli.dev import wait_serving
from runplane_common import subjects
from runplane_common.config import SchedulerSettings
from runplane_scheduler.app import Scheduler, start_scheduler
from runplane_scheduler.keys import create_key
from runplane_scheduler.store import tables as db
from tests.helpers.cluster import Cluster
from tests.helpers.nats import NatsServer
from tests.helpers.private_postgres import PrivatePostgres
from tests.helpers.registration import register_in

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

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


def _watch(count: int, fault_at: int) -> frozenset[int]:
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
    nc = await nats.connect(nats_url)
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


async def _load_with_fault(
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
    load = Load(client, count, rate, watch=_watch(count, fault_at))
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


# -- faults --------------------------------------------------------------------------------------


async def test_kill_9_of_the_executor_mid_load(cluster: Cluster, nats_server: NatsServer) -> None:
    async def fault(load: Load) -> None:
        cluster.executor.kill()
        await cluster.start_executor()

    _, runs = await _load_with_fault(cluster, nats_server.url, fault)
    assert any(r.attempt_count > 1 for r in runs.values()), "the kill interrupted no attempt"


async def test_kill_9_of_the_scheduler_mid_load(cluster: Cluster, nats_server: NatsServer) -> None:
    async def fault(load: Load) -> None:
        cluster.scheduler.kill()
        cluster.scheduler.start()
        await wait_serving(cluster.api_url, 60)

    load, _ = await _load_with_fault(cluster, nats_server.url, fault)
    assert load.retried, "no trigger met the scheduler down: the fault came too late"


async def test_kill_9_of_the_realtime_service_mid_load(
    cluster: Cluster, nats_server: NatsServer
) -> None:
    async def fault(load: Load) -> None:
        await asyncio.sleep(0.5)  # the watched subscriptions are streaming
        cluster.realtime.kill()
        load.went_down()
        await asyncio.sleep(0.5)
        cluster.realtime.start()
        await wait_serving(cluster.realtime_url, 60)

    load, _ = await _load_with_fault(cluster, nats_server.url, fault)
    # Down for 0.5 s at least: whatever came later came through a resumed subscription.
    assert load.watched_across_outage(after=0.3), "no subscription resumed after the kill"


async def test_nats_stopped_and_restarted_mid_load(
    cluster: Cluster, nats_server: NatsServer
) -> None:
    async def fault(load: Load) -> None:
        await nats_server.stop()
        load.went_down()
        await asyncio.sleep(2.0)
        await nats_server.start()

    load, _ = await _load_with_fault(cluster, nats_server.url, fault)
    assert load.watched_across_outage(), "no subscription was open through the outage"


@pytest.mark.postgres
async def test_postgresql_restarted_mid_load(
    pg_cluster: Cluster, nats_server: NatsServer, private_postgres: PrivatePostgres
) -> None:
    async def fault(load: Load) -> None:
        await private_postgres.restart(down_for=1.5)

    load, _ = await _load_with_fault(pg_cluster, nats_server.url, fault)
    assert load.retried, "no trigger met the database down: the fault came too late"


# -- the load gate -------------------------------------------------------------------------------


async def test_load_gate_trigger_to_start_latency(cluster: Cluster) -> None:
    """50 triggers a second for 10 s: the average run starts within 1 s of its trigger."""
    client = cluster.client()
    load = Load(client, count=500, rate=50.0, sleeps=lambda i: 0.0)
    try:
        start = time.monotonic()
        await load.run()
        triggering = time.monotonic() - start
        runs = await load.finished(timeout=120)
    finally:
        await client.close()
    assert all(r.status is RunStatus.COMPLETED for r in runs.values())
    latencies = sorted(
        (r.started_at - r.created_at).total_seconds()
        for r in runs.values()
        if r.started_at is not None and r.created_at is not None
    )
    assert len(latencies) == load.count
    mean = statistics.fmean(latencies)
    p95 = latencies[int(0.95 * len(latencies))]
    summary = (
        f"{load.count} triggers in {triggering:.1f}s; trigger-to-start mean {mean * 1000:.0f} ms, "
        f"p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms"
    )
    print(summary)
    assert triggering < 15, f"the triggers themselves could not keep up: {summary}"
    assert mean < 1.0, summary


# -- the scheduler while PostgreSQL is down ------------------------------------------------------


async def _scheduler_on(
    private_postgres: PrivatePostgres, nats_server: NatsServer
) -> tuple[Scheduler, runplane.Client]:
    scheduler = await start_scheduler(
        SchedulerSettings(
            database_url=private_postgres.url, nats_url=nats_server.url, listen="127.0.0.1:0"
        )
    )
    key = await create_key(scheduler.engine_db, "dev")
    await register_in(scheduler, "dev", (TASK,))  # known, with nobody to run it
    return scheduler, runplane.Client(api_url=f"127.0.0.1:{scheduler.port}", secret_key=key)


@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_the_scheduler_serves_again_once_postgresql_is_back(
    private_postgres: PrivatePostgres, nats_server: NatsServer
) -> None:
    scheduler, client = await _scheduler_on(private_postgres, nats_server)
    try:
        before = await client.tasks.trigger(TASK, {"i": 0})
        await asyncio.to_thread(private_postgres.stop)
        with pytest.raises(runplane.ApiError):
            await client.tasks.trigger(TASK, {"i": 1})
        await asyncio.to_thread(private_postgres.start)
        deadline = time.monotonic() + 20
        while True:  # the pool's first connections after the restart may still fail
            try:
                after = await client.tasks.trigger(TASK, {"i": 2})
                break
            except runplane.ApiError:
                assert time.monotonic() < deadline, "the scheduler never recovered"
                await asyncio.sleep(0.2)
        assert (await client.runs.retrieve(before)).payload == {"i": 0}
        assert (await client.runs.retrieve(after)).payload == {"i": 2}
        ids = [r.id async for r in client.runs.list()]
        assert ids == [after.id, before.id], "the refused trigger made a run"
    finally:
        await client.close()
        await scheduler.stop()


@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_the_api_answers_unavailable_while_postgresql_is_down(
    private_postgres: PrivatePostgres, nats_server: NatsServer
) -> None:
    scheduler, client = await _scheduler_on(private_postgres, nats_server)
    try:
        handle = await client.tasks.trigger(TASK, {"i": 0})
        await asyncio.to_thread(private_postgres.stop)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "TriggerRun": lambda: client.tasks.trigger(TASK, {"i": 1}),
            "GetRun": lambda: client.runs.retrieve(handle),
            "CancelRun": lambda: client.runs.cancel(handle),
            "ListRuns": lambda: anext(aiter(client.runs.list())),
        }
        codes = {}
        for name, call in calls.items():
            try:
                await call()
                codes[name] = "OK"
            except runplane.ApiError as error:
                codes[name] = error.code.name
        assert codes == dict.fromkeys(calls, "UNAVAILABLE")
    finally:
        await client.close()
        await scheduler.stop()


@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_the_api_answers_unavailable_while_postgresql_shuts_down(
    private_postgres: PrivatePostgres, nats_server: NatsServer
) -> None:
    scheduler, client = await _scheduler_on(private_postgres, nats_server)
    holder = db.create_engine(private_postgres.url)
    try:
        handle = await client.tasks.trigger(TASK, {"i": 0})
        async with holder.connect() as held:  # keeps the smart shutdown from finishing
            await held.execute(select(1))
            await asyncio.to_thread(private_postgres.begin_smart_shutdown)
            await asyncio.sleep(0.5)
            await scheduler.engine_db.dispose()  # every call now needs a new connection
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "TriggerRun": lambda: client.tasks.trigger(TASK, {"i": 1}),
                "GetRun": lambda: client.runs.retrieve(handle),
                "CancelRun": lambda: client.runs.cancel(handle),
                "ListRuns": lambda: anext(aiter(client.runs.list())),
            }
            codes = {}
            for name, call in calls.items():
                try:
                    await call()
                    codes[name] = "OK"
                except runplane.ApiError as error:
                    codes[name] = f"{error.code.name}: {error.message[:120]}"
        # A session the server already had may still serve a call; no call may answer otherwise.
        assert any(code != "OK" for code in codes.values()), "the shutdown refused nothing"
        assert all(code == "OK" or code.startswith("UNAVAILABLE") for code in codes.values()), codes
    finally:
        await holder.dispose()
        await client.close()
        await scheduler.stop()


async def _outbox_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return len((await conn.execute(select(db.outbox.c.event_id))).all())


@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_the_relay_survives_a_database_outage_while_catching_up(
    private_postgres: PrivatePostgres, nats_server: NatsServer
) -> None:
    """At start the relay reads the outbox to catch up; the database failing under that read
    must not stop it for good."""
    await nats_server.stop()  # the relay waits for NATS before it reads the outbox
    scheduler, client = await _scheduler_on(private_postgres, nats_server)
    try:
        first = await client.tasks.trigger(TASK, {"i": 0})
        await asyncio.to_thread(private_postgres.stop)
        await nats_server.start()
        await asyncio.sleep(3.0)  # the relay connects and tries to catch up, against no database
        await asyncio.to_thread(private_postgres.start)
        deadline = time.monotonic() + 20
        while True:
            try:
                second = await client.tasks.trigger(TASK, {"i": 1})
                break
            except runplane.ApiError:
                assert time.monotonic() < deadline, "the scheduler never recovered"
                await asyncio.sleep(0.2)
        deadline = time.monotonic() + 10
        while (left := await _outbox_rows(scheduler.engine_db)) > 0:
            relay = getattr(scheduler.relay, "_task", None)  # for the message only
            assert time.monotonic() < deadline, f"{left} events never left the outbox; {relay}"
            await asyncio.sleep(0.2)
        nc = await nats.connect(nats_server.url)
        try:
            info = await nc.jetstream().stream_info(subjects.RUN_EVENTS_STREAM)
        finally:
            await nc.close()
        assert info.state.messages == 2, f"{first.id} and {second.id} created; {info.state}"
    finally:
        await client.close()
        await scheduler.stop()
