"""The hot path's run transitions for many runs at once, sent straight to the database driver.

Every run passes through three transitions: dequeued, then started and completed (one
statement when its attempt ends before its start is reported), or completed after a reported
start. Made one run at a time through :meth:`Tx.transition`, each costs an ``UPDATE ...
RETURNING`` round trip and SQLAlchemy's execution path, and the profile put that at about a
third of the scheduler's CPU per run. Here one statement moves a whole group commit's worth of
runs: on PostgreSQL an ``UPDATE ... FROM unnest($2::text[], ...)``, prepared once by asyncpg;
on SQLite (driven inline, where a statement costs microseconds) the same single-run statement
per run through the sqlite3 cursor. Any other connection (an in-memory SQLite database on
aiosqlite) takes the one-run-at-a-time path, with the same effects.

The guards are the ones :meth:`Tx.transition` applies (status, current attempt), and each moved
run's events are emitted by :meth:`Tx.emit_transition`, so the outbox, metrics and the final
hook see the same as before."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from runplane_scheduler.states import Status
from runplane_scheduler.store import tables as db
from runplane_scheduler.store.runs import attempt_is
from runplane_scheduler.store.writer import (
    DURATION_SINCE_START,
    DURATION_SO_FAR,
    FIRST_START,
    ONE_MORE_ATTEMPT,
    STARTED_AT_START,
    RunRow,
    Tx,
    Via,
)

RunMap = Mapping[str, Any]
_RUNS = db.runs.name


class Item(Protocol):
    """What every transition here moves: a run, by its current (or new) attempt."""

    @property
    def run_id(self) -> str: ...

    @property
    def attempt_id(self) -> str: ...


@dataclass(frozen=True)
class Dequeued:
    run_id: str
    attempt_id: str
    executor_id: str


@dataclass(frozen=True)
class Started:
    run_id: str
    attempt_id: str
    started_at: int  # by the executor's clock, capped at the transition's time; 0: then


def start_of(i: Started, ts: int) -> int:
    return min(i.started_at, ts) if i.started_at else ts


@dataclass(frozen=True)
class Completed:
    run_id: str
    attempt_id: str
    output: str
    # When the attempt began, if its start was held back and reported with its end (0: its
    # start is recorded: the run is EXECUTING).
    started_at: int = 0


# PostgreSQL: one statement for many runs. $1 is the transition's time (ms).
_PG_DEQUEUE = f"""
UPDATE {_RUNS} SET status = 'DEQUEUED', version = {_RUNS}.version + 1, updated_at = $1::bigint,
    current_attempt_id = v.attempt_id, executor_id = v.executor_id
FROM unnest($2::text[], $3::text[], $4::text[]) AS v(id, attempt_id, executor_id)
WHERE {_RUNS}.id = v.id AND {_RUNS}.status = 'QUEUED'
RETURNING {_RUNS}.*, v.attempt_id AS _attempt"""
_PG_START = f"""
UPDATE {_RUNS} SET status = 'EXECUTING', version = {_RUNS}.version + 1, updated_at = $1::bigint,
    started_at = coalesce({_RUNS}.started_at, v.start), attempt_count = {_RUNS}.attempt_count + 1
FROM unnest($2::text[], $3::text[], $4::bigint[]) AS v(id, attempt_id, start)
WHERE {_RUNS}.id = v.id AND {_RUNS}.status = 'DEQUEUED'
    AND {_RUNS}.current_attempt_id = v.attempt_id
RETURNING {_RUNS}.*, v.attempt_id AS _attempt"""
_PG_COMPLETE = f"""
UPDATE {_RUNS} SET status = 'COMPLETED', version = {_RUNS}.version + 1,
    updated_at = $1::bigint, finished_at = $1::bigint, output = v.output,
    current_attempt_id = NULL, duration_ms = {_RUNS}.duration_ms + ($1::bigint - {_RUNS}.started_at)
FROM unnest($2::text[], $3::text[], $4::text[]) AS v(id, attempt_id, output)
WHERE {_RUNS}.id = v.id AND {_RUNS}.status = 'EXECUTING'
    AND {_RUNS}.current_attempt_id = v.attempt_id
RETURNING {_RUNS}.*, v.attempt_id AS _attempt"""
_PG_START_AND_COMPLETE = f"""
UPDATE {_RUNS} SET status = 'COMPLETED', version = {_RUNS}.version + 2,
    updated_at = $1::bigint, finished_at = $1::bigint, output = v.output,
    current_attempt_id = NULL, attempt_count = {_RUNS}.attempt_count + 1,
    started_at = coalesce({_RUNS}.started_at, v.start),
    duration_ms = {_RUNS}.duration_ms + ($1::bigint - coalesce({_RUNS}.started_at, v.start))
FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[]) AS v(id, attempt_id, output, start)
WHERE {_RUNS}.id = v.id AND {_RUNS}.status = 'DEQUEUED'
    AND {_RUNS}.current_attempt_id = v.attempt_id
RETURNING {_RUNS}.*, v.attempt_id AS _attempt"""

# SQLite: the same, one run per statement (named parameters).
_LITE_DEQUEUE = f"""
UPDATE {_RUNS} SET status = 'DEQUEUED', version = version + 1, updated_at = :ts,
    current_attempt_id = :attempt_id, executor_id = :executor_id
WHERE id = :id AND status = 'QUEUED'
RETURNING *"""
_LITE_START = f"""
UPDATE {_RUNS} SET status = 'EXECUTING', version = version + 1, updated_at = :ts,
    started_at = coalesce(started_at, :start), attempt_count = attempt_count + 1
WHERE id = :id AND status = 'DEQUEUED' AND current_attempt_id = :attempt_id
RETURNING *"""
_LITE_COMPLETE = f"""
UPDATE {_RUNS} SET status = 'COMPLETED', version = version + 1, updated_at = :ts,
    finished_at = :ts, output = :output, current_attempt_id = NULL,
    duration_ms = duration_ms + (:ts - started_at)
WHERE id = :id AND status = 'EXECUTING' AND current_attempt_id = :attempt_id
RETURNING *"""
_LITE_START_AND_COMPLETE = f"""
UPDATE {_RUNS} SET status = 'COMPLETED', version = version + 2, updated_at = :ts,
    finished_at = :ts, output = :output, current_attempt_id = NULL,
    attempt_count = attempt_count + 1, started_at = coalesce(started_at, :start),
    duration_ms = duration_ms + (:ts - coalesce(started_at, :start))
WHERE id = :id AND status = 'DEQUEUED' AND current_attempt_id = :attempt_id
RETURNING *"""


async def _bulk(
    tx: Tx, pg: str, lite: str, columns: dict[str, list[Any]], ts: int
) -> list[dict[str, Any]] | None:
    """Run one of the statement pairs over ``columns`` (by parameter name, in the PostgreSQL
    statement's order, the runs' ids first); each moved run's row, with the item's attempt id
    under ``"_attempt"``. None when the connection has no fast path."""
    driver = await tx.driver()
    if driver is None:
        return None
    if isinstance(driver, sqlite3.Connection):
        names = tuple(columns)
        cursor = driver.cursor()
        out: list[dict[str, Any]] = []
        try:
            for values in zip(*columns.values(), strict=True):
                params = dict(zip(names, values, strict=True))
                cursor.execute(lite, {"ts": ts, **params})
                row = cursor.fetchone()
                if row is not None:
                    fields = [d[0] for d in cursor.description]
                    m = dict(zip(fields, row, strict=True))
                    m["is_test"] = bool(m["is_test"])
                    m["_attempt"] = params["attempt_id"]
                    out.append(m)
        finally:
            cursor.close()
        return out
    records = await driver.fetch(pg, ts, *columns.values())
    return [dict(r) for r in records]


@dataclass(frozen=True)
class _Move:
    """One kind of transition: its statements, source and target, and its one-run twin."""

    pg: str
    lite: str
    source: Status
    target: Status
    event_type: str
    # The same transition through Tx.transition, for connections with no fast path.
    one: Callable[[Tx, Any, int], Awaitable[RunRow | None]]
    # The status a run passes through on the way (its event's snapshot from the final row).
    via: Callable[[Any, int], Via] | None = None


async def _move(
    tx: Tx, move: _Move, items: Sequence[Any], columns: dict[str, list[Any]], ts: int
) -> dict[str, RunMap]:
    """Apply ``move`` to ``items``; the runs that moved, by the item's attempt id."""
    if not items:
        return {}
    rows = await _bulk(tx, move.pg, move.lite, columns, ts)
    moved: dict[str, RunMap] = {}
    if rows is None:
        for item in items:
            row = await move.one(tx, item, ts)
            if row is not None:
                moved[item.attempt_id] = dict(row._mapping)
        return moved
    by_attempt = {item.attempt_id: item for item in items}
    for m in rows:
        attempt_id = m.pop("_attempt")
        moved[attempt_id] = m
        via = None if move.via is None else move.via(by_attempt[attempt_id], ts)
        await tx.emit_transition(m, (move.source,), move.target, move.event_type, via)
    return moved


async def _dequeue_one(tx: Tx, i: Dequeued, ts: int) -> RunRow | None:
    return await tx.transition(
        i.run_id,
        [Status.QUEUED],
        Status.DEQUEUED,
        "dequeued",
        current_attempt_id=i.attempt_id,
        executor_id=i.executor_id,
        updated_at=ts,
    )


async def _start_one(tx: Tx, i: Started, ts: int) -> RunRow | None:
    return await tx.transition(
        i.run_id,
        [Status.DEQUEUED],
        Status.EXECUTING,
        "started",
        attempt_is(i.attempt_id),
        started_at=FIRST_START,
        attempt_count=ONE_MORE_ATTEMPT,
        updated_at=ts,
        params={"p_now": start_of(i, ts)},
    )


async def _complete_one(tx: Tx, i: Completed, ts: int) -> RunRow | None:
    return await tx.transition(
        i.run_id,
        [Status.EXECUTING],
        Status.COMPLETED,
        "completed",
        attempt_is(i.attempt_id),
        output=i.output,
        finished_at=ts,
        updated_at=ts,
        current_attempt_id=None,
        duration_ms=DURATION_SO_FAR,
        params={"p_now": ts},
    )


def _as_started(i: Completed, ts: int) -> Via:
    """A run completed at ``ts`` passed through EXECUTING at its start: that event's snapshot."""
    start = min(i.started_at, ts)

    def then(m: dict[str, Any]) -> None:
        m.update(
            updated_at=start,
            output=None,
            finished_at=None,
            current_attempt_id=i.attempt_id,
            duration_ms=m["duration_ms"] - (ts - m["started_at"]),
        )

    return Via(Status.EXECUTING, "started", then)


async def _start_and_complete_one(tx: Tx, i: Completed, ts: int) -> RunRow | None:
    return await tx.transition(
        i.run_id,
        [Status.DEQUEUED],
        Status.COMPLETED,
        "completed",
        attempt_is(i.attempt_id),
        via=_as_started(i, ts),
        output=i.output,
        finished_at=ts,
        updated_at=ts,
        current_attempt_id=None,
        started_at=STARTED_AT_START,
        attempt_count=ONE_MORE_ATTEMPT,
        duration_ms=DURATION_SINCE_START,
        params={"p_now": ts, "p_start": min(i.started_at, ts)},
    )


_DEQUEUE = _Move(
    _PG_DEQUEUE, _LITE_DEQUEUE, Status.QUEUED, Status.DEQUEUED, "dequeued", _dequeue_one
)
_START = _Move(_PG_START, _LITE_START, Status.DEQUEUED, Status.EXECUTING, "started", _start_one)
_COMPLETE = _Move(
    _PG_COMPLETE, _LITE_COMPLETE, Status.EXECUTING, Status.COMPLETED, "completed", _complete_one
)
_START_AND_COMPLETE = _Move(
    _PG_START_AND_COMPLETE,
    _LITE_START_AND_COMPLETE,
    Status.DEQUEUED,
    Status.COMPLETED,
    "completed",
    _start_and_complete_one,
    via=_as_started,
)


def _ids(items: Sequence[Item]) -> dict[str, list[Any]]:
    return {"id": [i.run_id for i in items], "attempt_id": [i.attempt_id for i in items]}


async def dequeue_many(tx: Tx, items: Sequence[Dequeued], ts: int) -> dict[str, RunMap]:
    """QUEUED -> DEQUEUED for each item's run, with its new attempt and executor. The runs
    that moved, by id (a run no longer QUEUED is left alone)."""
    columns = {**_ids(items), "executor_id": [i.executor_id for i in items]}
    moved = await _move(tx, _DEQUEUE, items, columns, ts)
    return {m["id"]: m for m in moved.values()}


async def start_many(tx: Tx, items: Sequence[Started], ts: int) -> set[str]:
    """Each item's attempt began: DEQUEUED -> EXECUTING. The attempt ids whose runs moved."""
    columns = {**_ids(items), "start": [start_of(i, ts) for i in items]}
    return set(await _move(tx, _START, items, columns, ts))


async def complete_many(tx: Tx, items: Sequence[Completed], ts: int) -> set[str]:
    """Each item's attempt returned its output: EXECUTING -> COMPLETED, or, with its start
    reported alongside, DEQUEUED -> EXECUTING -> COMPLETED (both events). The attempt ids whose
    runs moved."""
    started = [i for i in items if not i.started_at]
    held = [i for i in items if i.started_at]
    columns = {**_ids(started), "output": [i.output for i in started]}
    done = set(await _move(tx, _COMPLETE, started, columns, ts))
    columns = {
        **_ids(held),
        "output": [i.output for i in held],
        "start": [min(i.started_at, ts) for i in held],
    }
    return done | set(await _move(tx, _START_AND_COMPLETE, held, columns, ts))
