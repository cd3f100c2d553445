"""Run queries the engine makes inside a write: conditions of a run transition, parents,
batches, debounce, idempotency keys, descendants to cancel, tags, log lines and a run's
timeline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from runplane_common.errors import NotFound
from runplane_scheduler.states import Status
from runplane_scheduler.store import tables as db
from runplane_scheduler.store.writer import RunRow, Tx

r = db.runs.c

# Conditions for :meth:`Tx.transition` (comparisons of a runs column, so they stay reusable).
NO_ATTEMPT = r.current_attempt_id.is_(None)
NEVER_STARTED = r.started_at.is_(None)


def attempt_is(attempt_id: str) -> Any:
    """The run's current attempt is ``attempt_id``."""
    return r.current_attempt_id == attempt_id


def in_environment(environment_id: str) -> Any:
    return r.environment_id == environment_id


def delay_until_by(ts: int) -> Any:
    """The run's delay ends at or before ``ts`` (it was not rescheduled later)."""
    return r.delay_until <= ts


def attempt_count_minus(n: int) -> Any:
    """A value for ``attempt_count``: ``n`` fewer than now."""
    return r.attempt_count - n


async def get(tx: Tx, run_id: str) -> RunRow | None:
    return (await tx.execute(select(db.runs).where(r.id == run_id))).first()


async def get_in_environment(tx: Tx, environment_id: str, run_id: str) -> RunRow:
    row = (
        await tx.execute(select(db.runs).where(r.id == run_id, r.environment_id == environment_id))
    ).first()
    if row is None:
        raise NotFound(f"run {run_id} not found")
    return row


async def get_with_attempt(tx: Tx, run_id: str, attempt_id: str) -> RunRow | None:
    """The run, if ``attempt_id`` is still its current attempt."""
    return (
        await tx.execute(db.runs.select().where(r.id == run_id, r.current_attempt_id == attempt_id))
    ).first()


async def status_with_attempt(tx: Tx, run_id: str, attempt_id: str) -> str | None:
    """The run's status, if ``attempt_id`` is still its current attempt."""
    row = (
        await tx.execute(select(r.status).where(r.id == run_id, r.current_attempt_id == attempt_id))
    ).first()
    return None if row is None else str(row.status)


async def environment_and_task(tx: Tx, run_id: str) -> RunRow | None:
    return (
        await tx.execute(
            select(r.environment_id, r.task_id, r.worker_version).where(r.id == run_id)
        )
    ).first()


async def parent(tx: Tx, environment_id: str, run_id: str) -> RunRow | None:
    """A would-be parent's id, root, depth and worker version."""
    return (
        await tx.execute(
            select(r.id, r.root_run_id, r.depth, r.worker_version).where(
                r.id == run_id, r.environment_id == environment_id
            )
        )
    ).first()


async def find_batch(
    tx: Tx, environment_id: str, idempotency_key: str
) -> tuple[str, list[Mapping[Any, Any]]] | None:
    """The batch holding ``idempotency_key`` and its runs in item order."""
    batch = (
        await tx.execute(
            select(db.batches.c.id).where(
                db.batches.c.environment_id == environment_id,
                db.batches.c.idempotency_key == idempotency_key,
            )
        )
    ).first()
    if batch is None:
        return None
    rows = (await tx.execute(select(db.runs).where(r.batch_id == batch.id).order_by(r.id))).all()
    return batch.id, [row._mapping for row in rows]


def insert_batch(tx: Tx, values: dict[str, Any]) -> None:
    tx.insert_later(db.batches, values)


async def debounced(tx: Tx, environment_id: str, task_id: str, key: str) -> RunRow | None:
    """The task's newest DELAYED run with debounce key ``key`` (id and created_at)."""
    return (
        await tx.execute(
            select(r.id, r.created_at)
            .where(
                r.environment_id == environment_id,
                r.task_id == task_id,
                r.debounce_key == key,
                r.status == Status.DELAYED.value,
            )
            .order_by(r.id.desc())
            .limit(1)
        )
    ).first()


async def release_idempotency_key(
    tx: Tx, environment_id: str, task_id: str, key: str, now: int
) -> int:
    """Expire ``key`` of the task's run holding it; the number of runs released."""
    result = await tx.execute(
        update(db.runs)
        .where(
            r.environment_id == environment_id,
            r.task_id == task_id,
            r.idempotency_key == key,
            r.idempotency_key_expires_at > now,
        )
        .values(idempotency_key_expires_at=now)
    )
    return int(result.rowcount)


async def children_in(tx: Tx, parent_ids: Sequence[str], statuses: Sequence[Status]) -> list[str]:
    """Ids of the runs whose parent is one of ``parent_ids``, in one of ``statuses``."""
    rows = (
        await tx.execute(
            select(r.id).where(
                r.parent_run_id.in_(parent_ids), r.status.in_([s.value for s in statuses])
            )
        )
    ).all()
    return [row.id for row in rows]


def add_tags(tx: Tx, environment_id: str, run_id: str, tags: Sequence[str]) -> None:
    for tag in tags:
        tx.insert_later(
            db.run_tags, {"run_id": run_id, "tag": tag, "environment_id": environment_id}
        )


def insert_logs(tx: Tx, rows: Sequence[dict[str, Any]]) -> None:
    for row in rows:
        tx.insert_later(db.run_logs, row)


async def list_logs(
    database: AsyncEngine, environment_id: str, run_id: str, after_id: str | None, limit: int
) -> list[RunRow]:
    """A run's log lines after ``after_id``, oldest first."""
    c = db.run_logs.c
    stmt = (
        select(db.run_logs)
        .where(c.environment_id == environment_id, c.run_id == run_id)
        .order_by(c.id)
        .limit(limit)
    )
    if after_id:
        stmt = stmt.where(c.id > after_id)
    async with database.connect() as conn:
        return list((await conn.execute(stmt)).all())


MIGRATE_LIMIT = 10_000


async def for_migration(
    tx: Tx, environment_id: str, run_ids: Sequence[str], from_version: str
) -> list[RunRow]:
    """The runs ``runplane runs migrate`` is asked to move: by id (any status; the caller keeps
    the PENDING_VERSION ones), or every PENDING_VERSION run locked to ``from_version`` (at most
    MIGRATE_LIMIT, oldest first)."""
    query = select(
        r.id, r.status, r.task_id, r.worker_version, r.parked_from, r.environment_id
    ).where(r.environment_id == environment_id)
    if run_ids:
        query = query.where(r.id.in_(run_ids))
    else:
        query = (
            query.where(r.status == Status.PENDING_VERSION.value, r.worker_version == from_version)
            .order_by(r.created_at)
            .limit(MIGRATE_LIMIT)
        )
    return list((await tx.execute(query)).all())


@dataclass(frozen=True)
class TimelineRows:
    """What a run's waterfall is drawn from: its attempts, waits (with the child runs of each
    BATCH wait), child runs and its first log lines."""

    attempts: list[RunRow]
    waits: list[RunRow]
    wait_children: dict[str, list[str]]
    children: list[RunRow]
    logs: list[RunRow]


async def timeline(
    database: AsyncEngine, environment_id: str, run_id: str, log_limit: int
) -> TimelineRows:
    """The rows of a run's waterfall (the run itself is the caller's to check); at most
    ``log_limit`` log lines, oldest first."""
    a = db.attempts.c
    w = db.waitpoints.c
    wc = db.waitpoint_children.c
    lg = db.run_logs.c
    async with database.connect() as conn:
        attempts = (
            await conn.execute(select(db.attempts).where(a.run_id == run_id).order_by(a.number))
        ).all()
        waits = (
            await conn.execute(
                select(db.waitpoints)
                .where(w.run_id == run_id, w.environment_id == environment_id)
                .order_by(w.created_at, w.attempt, w.seq)
            )
        ).all()
        wait_children: dict[str, list[str]] = {}
        batch_ids = [row.id for row in waits if row.kind == "BATCH"]
        if batch_ids:
            rows = (
                await conn.execute(
                    select(wc.waitpoint_id, wc.run_id)
                    .where(wc.waitpoint_id.in_(batch_ids))
                    .order_by(wc.waitpoint_id, wc.position)
                )
            ).all()
            for row in rows:
                wait_children.setdefault(row.waitpoint_id, []).append(row.run_id)
        children = (
            await conn.execute(
                select(db.runs)
                .where(r.parent_run_id == run_id, r.environment_id == environment_id)
                .order_by(r.created_at, r.id)
            )
        ).all()
        logs = (
            await conn.execute(
                select(db.run_logs)
                .where(lg.environment_id == environment_id, lg.run_id == run_id)
                .order_by(lg.id)
                .limit(log_limit)
            )
        ).all()
    return TimelineRows(list(attempts), list(waits), wait_children, list(children), list(logs))
