"""The worlds the contract tests start from: what each seeds through the API, and how a test reads
the rows back to see that a refused request changed nothing.

- ``RunWorld``: registered queues, runs (one cancelled, one with an idempotency key) and batches
  in both environments; for the RunService and QueueService.
- ``ScheduleWorld``: runs, schedules (one declarative) and wait tokens in both environments; its
  stack's schedule clock all but stands still, so no schedule fires while a test runs.
- ``RealtimeWorld``: runs (tag "x") and a batch in each environment, on a stack with the realtime
  service.

The fixtures that build them are in ``tests/contract/conftest.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf.duration_pb2 import Duration
from sqlalchemy import Table, func, select

from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import worker_service_pb2 as wpb
from runplane_common import subjects
from runplane_scheduler.store import tables as db
from tests.helpers.contract import (
    KEYS,
    OK,
    RUN,
    TRIGGERABLE,
    Calls,
    Stack,
    register_tasks,
    some_runs,
    unary,
)

KEYED_TASK, KEY = "t", "engine-key"
# Queues the executors register: three in dev (to page through), one in prod.
DEV_QUEUES = {"engine-q1": 3, "engine-q2": 0, "engine-q3": 7}
PROD_QUEUES = {"engine-pq": 2}
# Tasks the executors register: one each, and in dev one with a declarative schedule.
TASKS = {"dev": "sched-task", "prod": "sched-ptask"}
DECLARED = "declared-task"


# -- runs, batches and queues ----------------------------------------------------------------------


@dataclass(repr=False)
class RunWorld(Calls):
    """A scheduler with registered queues, some runs and batches in both environments."""

    def __repr__(self) -> str:
        return f"RunWorld(runs={self.runs}, batches={self.batches}, queues={self.queue_ids})"

    stack: Stack
    runs: dict[str, str] = field(default_factory=dict)  # name -> id
    run_env: dict[str, str] = field(default_factory=dict)  # id -> environment
    batches: dict[str, str] = field(default_factory=dict)  # name -> id
    batch_env: dict[str, str] = field(default_factory=dict)  # id -> environment
    batch_runs: dict[str, list[str]] = field(default_factory=dict)  # id -> its own new runs
    queue_ids: dict[str, str] = field(default_factory=dict)  # name -> id
    queue_env: dict[str, str] = field(default_factory=dict)  # name or id -> environment
    key_released: bool = False

    def resolve(self, value: str) -> str:
        """'@name' stands for a run, batch or queue of the world (a queue's id with '@id:')."""
        if not value.startswith("@"):
            return value
        name = value[1:]
        if name.startswith("id:"):
            return self.queue_ids.get(name[3:], value)
        return self.runs.get(name) or self.batches.get(name) or value

    def trigger(self, who: str, **options: Any) -> rpb.TriggerRunResponse:
        request = rpb.TriggerRunRequest(
            task_id="t", payload='{"n": 1}', options=rpb.TriggerOptions(tags=["x"], **options)
        )
        response: rpb.TriggerRunResponse = self.ok(
            RUN + "TriggerRun", request, who, rpb.TriggerRunResponse
        )
        self.run_env[response.run.id] = who
        return response

    def delayed_run(self, who: str) -> str:
        """A fresh run, DELAYED for an hour."""
        return self.trigger(who, delay=Duration(seconds=3600)).run.id

    def state(self) -> dict[str, Any]:
        """``Stack.state`` plus the batches, and every run's and queue's row as it is."""
        stack = self.stack
        assert stack.scheduler is not None
        engine = stack.scheduler.engine_db

        async def read() -> dict[str, Any]:
            async with engine.connect() as conn:
                batches = select(func.count()).select_from(db.batches)
                r = db.runs.c
                runs = select(
                    r.id, r.status, r.version, r.delay_until, r.idempotency_key_expires_at
                ).order_by(r.id)
                return {
                    "batches": int((await conn.execute(batches)).scalar_one()),
                    "run_rows": [tuple(row) for row in (await conn.execute(runs)).all()],
                    "queue_rows": [
                        tuple(row)
                        for row in (
                            await conn.execute(select(db.queues).order_by(db.queues.c.id))
                        ).all()
                    ],
                }

        return {**stack.state(), **stack.run(read())}


STABLE = ("runs", "batches", "run_tags", "attempts", "queue_rows")


def stable(state: dict[str, Any], *run_ids: str) -> dict[str, Any]:
    """What no timer changes: the rows there are, and the rows of ``run_ids`` (for tests whose
    accepted requests leave runs due soon, which may fire while a later example runs)."""
    return {
        **{k: state[k] for k in STABLE},
        "run_ids": [r[0] for r in state["run_rows"]],
        "watched": [r for r in state["run_rows"] if r[0] in run_ids],
    }


def register_queues(stack: Stack, who: str, queues: dict[str, int]) -> None:
    """An executor connects with a manifest defining ``queues`` and the triggerable tasks, then
    goes away (they stay). One manifest: the environment has one version."""
    tasks = [
        wpb.TaskDefinition(id=f"{name}-task", queue=name, queue_concurrency_limit=limit)
        for name, limit in queues.items()
    ] + [wpb.TaskDefinition(id=t) for t in TRIGGERABLE]
    register_tasks(stack, who, tasks)


# -- runs, schedules and wait tokens ---------------------------------------------------------------


@dataclass(repr=False)
class ScheduleWorld(Calls):
    """Runs, schedules (one declarative) and wait tokens in both environments."""

    stack: Stack
    runs: dict[str, str] = field(default_factory=dict)  # name -> id ("dev", "dev-canceled", ...)
    run_env: dict[str, str] = field(default_factory=dict)  # id -> environment
    schedules: dict[str, str] = field(default_factory=dict)  # name -> id
    schedule_env: dict[str, str] = field(default_factory=dict)  # id -> environment
    tokens: dict[str, str] = field(default_factory=dict)  # name -> id
    token_env: dict[str, str] = field(default_factory=dict)  # id -> environment
    secrets: dict[str, str] = field(default_factory=dict)  # token id -> the secret of its URL

    def __repr__(self) -> str:
        return f"ScheduleWorld({self.runs}, {self.schedules}, {self.tokens})"

    def resolve(self, value: str) -> str:
        """'@name' stands for a run, schedule or token of the world."""
        if not value.startswith("@"):
            return value
        name = value[1:]
        return self.runs.get(name) or self.schedules.get(name) or self.tokens.get(name) or value

    def rows(self, *tables: Table) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of ``tables``, in key order."""
        assert self.stack.scheduler is not None
        engine = self.stack.scheduler.engine_db

        async def read() -> dict[str, list[tuple[Any, ...]]]:
            out = {}
            async with engine.connect() as conn:
                for table in tables:
                    stmt = select(table).order_by(*table.primary_key.columns)
                    out[table.name] = [tuple(r) for r in (await conn.execute(stmt)).all()]
            return out

        return self.stack.run(read())


def token_rows(w: ScheduleWorld) -> dict[str, list[tuple[Any, ...]]]:
    """The waitpoint rows and timers (no token here is due within the test)."""
    return w.rows(db.waitpoints, db.timers, db.runs)


# -- runs and batches for the realtime service -----------------------------------------------------


class RealtimeWorld:
    """Runs (tag "x") and a batch in each environment."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.ids = dict(some_runs(stack))
        self.env = {i: ("prod" if n == "prod" else "dev") for n, i in self.ids.items()}
        for who in KEYS:
            items = [rpb.BatchTriggerItem(task_id="t", payload=str(i)) for i in range(2)]
            out = unary(
                stack.channel(),
                RUN + "BatchTriggerRuns",
                rpb.BatchTriggerRunsRequest(items=items),
                stack.auth(who),
                rpb.BatchTriggerRunsResponse,
            )
            assert out.code is OK, str(out)
            self.ids[f"{who}-batch"] = out.responses[0].batch_id
            self.env[out.responses[0].batch_id] = who
            for run in out.responses[0].runs:
                self.env[run.id] = who

    def resolve(self, value: str) -> str:
        return self.ids.get(value[1:], value) if value.startswith("@") else value

    def chunks_stored(self) -> int:
        """Messages in the run streams' JetStream stream (0 before it exists)."""
        realtime = self.stack.realtime
        assert realtime is not None

        async def count() -> int:
            js = realtime.link.jetstream()
            try:
                info = await js.stream_info(subjects.RUN_STREAMS_STREAM)
            except Exception:  # not made yet
                return 0
            return int(info.state.messages)

        return self.stack.run(count())
