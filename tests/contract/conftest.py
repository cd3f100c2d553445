"""The contract tests' fixtures: the stacks they call and the worlds seeded on them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from runplane.v1 import queue_service_pb2 as qpb
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import schedule_service_pb2 as spb
from runplane.v1 import waitpoint_service_pb2 as wspb
from runplane.v1 import worker_service_pb2 as wpb
from tests.helpers.contract import (
    KEYS,
    QUEUE,
    RUN,
    SCHED,
    WAIT,
    Stack,
    register_tasks,
    some_runs,
    start_stack,
)
from tests.helpers.ports import free_port
from tests.helpers.worlds import (
    DECLARED,
    DEV_QUEUES,
    KEY,
    PROD_QUEUES,
    TASKS,
    RealtimeWorld,
    RunWorld,
    ScheduleWorld,
    register_queues,
)


@contextmanager
def _quiet_nats_client() -> Iterator[None]:
    """Drops the NATS client's log records while a stack's relay knocks at a port nobody listens
    on: it logs each failed connect with a traceback, all test long. Formatting a traceback calls
    ast.parse on the servers' thread (Python 3.11's carets), while hypothesis and pytest call it on
    the test thread; on CPython 3.11.7 the two race, and a test fails with "SystemError: AST
    constructor recursion depth mismatch" that has nothing to do with what it checks."""
    logger = logging.getLogger("nats.aio.client")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


@pytest.fixture
def stack(database_url: str) -> Iterator[Stack]:
    """A scheduler whose relay cannot reach NATS (outbox rows stay: exact counts)."""
    with _quiet_nats_client():
        yield from start_stack(database_url, f"nats://127.0.0.1:{free_port()}")


@pytest.fixture
def live_stack(database_url: str, nats_server: Any) -> Iterator[Stack]:
    """A scheduler, and a realtime service with its HTTP port, on a real nats-server."""
    yield from start_stack(database_url, nats_server.url, with_realtime=True)


@pytest.fixture
def frozen_stack(database_url: str) -> Iterator[Stack]:
    """A scheduler whose relay cannot reach NATS, on a schedule clock that all but stands still."""
    with _quiet_nats_client():
        yield from start_stack(
            database_url,
            f"nats://127.0.0.1:{free_port()}",
            schedule_clock_speed=1e-6,
            schedule_clock_epoch_ms=int(time.time() * 1000),
        )


@pytest.fixture
def bare_stack(database_url: str) -> Iterator[Stack]:
    """``stack`` with no task registered yet."""
    with _quiet_nats_client():
        yield from start_stack(database_url, f"nats://127.0.0.1:{free_port()}", tasks=())


@pytest.fixture
def run_world(bare_stack: Stack) -> RunWorld:
    """Queues, runs and batches in both environments (see ``RunWorld``)."""
    stack = bare_stack
    w = RunWorld(stack)
    register_queues(stack, "dev", DEV_QUEUES)
    register_queues(stack, "prod", PROD_QUEUES)
    for env, queues in (("dev", DEV_QUEUES), ("prod", PROD_QUEUES)):
        for name in queues:
            got = w.ok(
                QUEUE + "GetQueue", qpb.GetQueueRequest(queue=name), env, qpb.GetQueueResponse
            )
            w.queue_ids[name] = got.queue.id
            w.queue_env[name] = w.queue_env[got.queue.id] = env
    for name, env in (("dev", "dev"), ("prod", "prod")):
        w.runs[name] = w.trigger(env).run.id
    w.runs["dev-canceled"] = w.trigger("dev").run.id
    w.ok(
        RUN + "CancelRun",
        rpb.CancelRunRequest(run_id=w.runs["dev-canceled"]),
        "dev",
        rpb.CancelRunResponse,
    )
    w.runs["dev-keyed"] = w.trigger("dev", idempotency_key=KEY).run.id
    for name, env in (("dev-batch", "dev"), ("prod-batch", "prod")):
        items = [rpb.BatchTriggerItem(task_id="t", payload=str(i)) for i in range(2)]
        got = w.ok(
            RUN + "BatchTriggerRuns",
            rpb.BatchTriggerRunsRequest(items=items),
            env,
            rpb.BatchTriggerRunsResponse,
        )
        w.batches[name] = got.batch_id
        w.batch_env[got.batch_id] = env
        w.batch_runs[got.batch_id] = [r.id for r in got.runs]
        for r in got.runs:
            w.run_env[r.id] = env
    return w


@pytest.fixture
def schedule_world(frozen_stack: Stack) -> ScheduleWorld:
    """Runs, schedules and wait tokens in both environments (see ``ScheduleWorld``)."""
    stack = frozen_stack
    w = ScheduleWorld(stack)
    for name, run_id in some_runs(stack).items():
        w.runs[name] = run_id
        w.run_env[run_id] = "prod" if name == "prod" else "dev"
    declared = wpb.TaskDefinition(
        id=DECLARED, schedule=wpb.DeclarativeSchedule(cron="0 9 * * 1-5", timezone="Europe/London")
    )
    register_tasks(stack, "dev", [wpb.TaskDefinition(id=TASKS["dev"]), declared])
    register_tasks(stack, "prod", [wpb.TaskDefinition(id=TASKS["prod"])])
    for who in KEYS:
        request = spb.CreateScheduleRequest(
            task_id=TASKS[who], cron="0 * * * *", deduplication_key="dedup-1"
        )
        got = w.ok(SCHED + "CreateSchedule", request, who, spb.CreateScheduleResponse)
        w.schedules[who] = got.schedule.id
        w.schedule_env[got.schedule.id] = who
    listed = w.ok(
        SCHED + "ListSchedules", spb.ListSchedulesRequest(), "dev", spb.ListSchedulesResponse
    )
    [decl] = [s for s in listed.schedules if s.task_id == DECLARED]
    w.schedules["declared"] = decl.id
    w.schedule_env[decl.id] = "dev"
    for who in KEYS:
        token_request = wspb.CreateTokenRequest(idempotency_key="tok-1", tags=["x"])
        got = w.ok(WAIT + "CreateToken", token_request, who, wspb.CreateTokenResponse)
        w.tokens[who] = got.token.id
        w.token_env[got.token.id] = who
        w.secrets[got.token.id] = got.token.url.rsplit("secret=", 1)[1]
    return w


@pytest.fixture
def realtime_world(live_stack: Stack) -> RealtimeWorld:
    """Runs and a batch in each environment, with the realtime service (see ``RealtimeWorld``)."""
    return RealtimeWorld(live_stack)
