"""The hot path's many-run transitions (``store/hot.py``) on real SQLite and PostgreSQL: they
move exactly the runs the one-run-at-a-time path moves, to the same rows, with the same events,
and leave alone the runs whose status or attempt does not match."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from runplane.v1 import events_pb2
from runplane_scheduler.store import Store, Tx, hot
from runplane_scheduler.store import tables as db
from runplane_scheduler.store.hot import Completed, Dequeued, Started

T0 = 1_700_000_000_000
TS = T0 + 5_000


def _run(run_id: str, status: str, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": run_id,
        "environment_id": "env_dev",
        "task_id": "t",
        "status": status,
        "payload": "{}",
        "output": None,
        "error": None,
        "tags": "[]",
        "metadata": "{}",
        "queue": "task/t",
        "idempotency_key": None,
        "idempotency_key_expires_at": None,
        "concurrency_key": "",
        "priority": 0,
        "attempt_count": 0,
        "max_attempts": 3,
        "version": 3,
        "is_test": False,
        "parent_run_id": None,
        "root_run_id": None,
        "depth": 0,
        "batch_id": None,
        "created_at": T0,
        "updated_at": T0,
        "queued_at": T0,
        "delay_until": None,
        "debounce_key": None,
        "ttl_ms": None,
        "max_duration_ms": None,
        "machine": "",
        "replayed_from_run_id": None,
        "started_at": None,
        "finished_at": None,
        "duration_ms": 0,
        "traceparent": "",
        "current_attempt_id": None,
        "executor_id": None,
        "worker_version": "",
        "parked_from": None,
    }
    row.update(values)
    return row


# Queued runs (q*), runs dequeued with their attempt (d*: held starts), executing runs (e*),
# and runs the transitions must leave alone.
RUNS = [
    _run("run_q1", "QUEUED"),
    _run("run_q2", "QUEUED", attempt_count=1),
    _run("run_qx", "CANCELED"),
    _run("run_d1", "DEQUEUED", current_attempt_id="att_d1", executor_id="ex_1"),
    _run("run_d2", "DEQUEUED", current_attempt_id="att_d2", executor_id="ex_1", duration_ms=40),
    _run("run_dx", "DEQUEUED", current_attempt_id="att_other", executor_id="ex_1"),
    _run(
        "run_e1",
        "EXECUTING",
        current_attempt_id="att_e1",
        started_at=T0 + 1_000,
        attempt_count=1,
        duration_ms=10,
    ),
    _run("run_ex", "QUEUED", current_attempt_id=None),
    _run("run_s1", "DEQUEUED", current_attempt_id="att_s1", executor_id="ex_1"),
    _run("run_s2", "DEQUEUED", current_attempt_id="att_s2", executor_id="ex_1", attempt_count=1),
    _run("run_sx", "EXECUTING", current_attempt_id="att_sx", started_at=T0, attempt_count=1),
]
START = [
    Started("run_s1", "att_s1", 0),  # now
    Started("run_s2", "att_s2", T0 + 3_000),
    Started("run_sx", "att_sx", T0 + 3_000),  # started already
]
DEQUEUE = [
    Dequeued("run_q1", "att_q1", "ex_1"),
    Dequeued("run_q2", "att_q2", "ex_2"),
    Dequeued("run_qx", "att_qx", "ex_1"),
    Dequeued("run_missing", "att_m", "ex_1"),
]
COMPLETE = [
    Completed("run_d1", "att_d1", '{"a": 1}', started_at=T0 + 2_000),
    Completed("run_d2", "att_d2", '"b"', started_at=TS + 50),  # a clock ahead: capped at ts
    Completed("run_dx", "att_dx", "null", started_at=T0 + 2_000),  # not its attempt
    Completed("run_e1", "att_e1", "[1, 2]"),
    Completed("run_ex", "att_ex", "1"),  # not executing
]


@pytest.fixture
async def store(migrated_database_url: str) -> AsyncIterator[Store]:
    engine = db.create_engine(migrated_database_url)
    store = Store(engine, on_commit=lambda events: None)
    store.writer.start()
    try:
        yield store
    finally:
        await store.writer.stop()
        await engine.dispose()


async def _scenario(store: Store) -> tuple[dict[str, Any], set[str], list[dict[str, Any]]]:
    """Insert RUNS, dequeue and complete; what moved, the rows after, the events emitted."""
    events: list[dict[str, Any]] = []

    async def seed(tx: Tx) -> None:
        for row in RUNS:
            await tx.execute(db.runs.delete().where(db.runs.c.id == row["id"]))
            tx.insert_later(db.runs, row)

    async def move(tx: Tx) -> tuple[set[str], set[str], set[str]]:
        dequeued = await hot.dequeue_many(tx, DEQUEUE, TS)
        started = await hot.start_many(tx, START, TS)
        completed = await hot.complete_many(tx, COMPLETE, TS)
        events.extend(tx.batch.events)
        return set(dequeued), started, completed

    await store.writer.run(seed)
    dequeued, started, completed = await store.writer.run(move)
    async with store.db.connect() as conn:
        rows = (await conn.execute(select(db.runs).order_by(db.runs.c.id))).all()
    after = {r.id: dict(r._mapping) for r in rows}
    snapshots = []
    for e in events:
        event = events_pb2.RunEvent.FromString(e["data"])
        snapshots.append(
            {
                "type": event.type,
                "run_id": event.run.id,
                "status": event.run.status,
                "version": event.run.version,
                "output": event.run.output,
                "duration_ms": event.run.duration_ms,
                "updated_at": event.run.updated_at.ToMilliseconds(),
                "started_at": event.run.started_at.ToMilliseconds(),
            }
        )
    return {"dequeued": dequeued, "started": started, "rows": after}, completed, snapshots


def _one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_fast_path(self: Tx) -> None:
        await self.batch.flush()

    monkeypatch.setattr(Tx, "driver", no_fast_path)


@pytest.mark.parametrize("fast", [True, False], ids=["driver", "one-at-a-time"])
async def test_many_run_transitions_move_the_matching_runs(
    store: Store, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fast:
        _one_at_a_time(monkeypatch)
    moved, completed, events = await _scenario(store)
    rows: dict[str, dict[str, Any]] = moved["rows"]

    assert moved["dequeued"] == {"run_q1", "run_q2"}
    assert rows["run_q1"]["status"] == "DEQUEUED"
    assert rows["run_q1"]["current_attempt_id"] == "att_q1"
    assert rows["run_q2"]["executor_id"] == "ex_2"
    assert rows["run_q1"]["version"] == 4
    assert rows["run_q1"]["updated_at"] == TS
    assert rows["run_qx"]["status"] == "CANCELED"

    assert moved["started"] == {"att_s1", "att_s2"}
    s1, s2 = rows["run_s1"], rows["run_s2"]
    assert (s1["status"], s1["version"], s1["started_at"], s1["attempt_count"]) == (
        "EXECUTING",
        4,
        TS,
        1,
    )
    assert (s2["started_at"], s2["attempt_count"], s2["updated_at"]) == (T0 + 3_000, 2, TS)
    assert rows["run_sx"]["started_at"] == T0
    assert rows["run_sx"]["version"] == 3

    assert completed == {"att_d1", "att_d2", "att_e1"}
    d1 = rows["run_d1"]
    assert (d1["status"], d1["output"], d1["version"]) == ("COMPLETED", '{"a": 1}', 5)
    assert (d1["started_at"], d1["finished_at"], d1["attempt_count"]) == (T0 + 2_000, TS, 1)
    assert d1["duration_ms"] == TS - (T0 + 2_000)
    assert d1["current_attempt_id"] is None
    assert rows["run_d2"]["started_at"] == TS  # a start after the end is capped at the end
    assert rows["run_d2"]["duration_ms"] == 40
    e1 = rows["run_e1"]
    assert (e1["status"], e1["version"], e1["attempt_count"]) == ("COMPLETED", 4, 1)
    assert e1["duration_ms"] == 10 + TS - (T0 + 1_000)
    assert rows["run_dx"]["status"] == "DEQUEUED"
    assert rows["run_ex"]["status"] == "QUEUED"

    kinds = [(e["type"], e["run_id"], e["version"]) for e in events]
    assert sorted(kinds) == sorted(
        [
            ("dequeued", "run_q1", 4),
            ("dequeued", "run_q2", 4),
            ("started", "run_d1", 4),
            ("completed", "run_d1", 5),
            ("started", "run_d2", 4),
            ("completed", "run_d2", 5),
            ("completed", "run_e1", 4),
            ("started", "run_s1", 4),
            ("started", "run_s2", 4),
        ]
    )
    started = next(e for e in events if e["type"] == "started" and e["run_id"] == "run_d1")
    assert started["updated_at"] == T0 + 2_000
    assert started["output"] == ""
    assert started["duration_ms"] == 0
    assert started["started_at"] == T0 + 2_000


async def test_the_driver_path_writes_what_the_one_at_a_time_path_writes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def comparable(result: tuple[dict[str, Any], set[str], list[dict[str, Any]]]) -> Any:
        moved, completed, events = result
        return moved, completed, sorted(events, key=lambda e: (e["run_id"], e["type"]))

    fast = comparable(await _scenario(store))
    _one_at_a_time(monkeypatch)
    slow = comparable(await _scenario(store))
    assert fast == slow


async def test_a_batch_that_fails_after_a_driver_statement_writes_nothing(store: Store) -> None:
    """The driver's statements are in the batch's transaction: when an operation fails after
    one, the whole batch rolls back (on PostgreSQL, asyncpg would otherwise commit a statement
    sent before SQLAlchemy's first one on its own)."""

    async def seed(tx: Tx) -> None:
        await tx.execute(db.runs.delete().where(db.runs.c.id == "run_q1"))
        tx.insert_later(db.runs, RUNS[0])

    async def fails(tx: Tx) -> None:
        moved = await hot.dequeue_many(tx, DEQUEUE[:1], TS)
        assert set(moved) == {"run_q1"}
        raise RuntimeError("the operation failed after its driver statement")

    await store.writer.run(seed)
    with pytest.raises(RuntimeError, match="after its driver statement"):
        await store.writer.run(fails)
    async with store.db.connect() as conn:
        row = (await conn.execute(select(db.runs).where(db.runs.c.id == "run_q1"))).one()
        outbox = (await conn.execute(select(db.outbox))).all()
    assert (row.status, row.version, row.current_attempt_id) == ("QUEUED", 3, None)
    assert not [e for e in outbox if b"run_q1" in e.data]
