"""Waitpoint queries: the journal of a run's waits (by run, attempt and seq), tokens, the
child runs a wait waits on, and which WAITING runs have nothing left to wait for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import exists, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from runplane_scheduler.states import Status
from runplane_scheduler.store import tables as db
from runplane_scheduler.store.writer import RunRow, Tx

PENDING, COMPLETED = "PENDING", "COMPLETED"
w = db.waitpoints.c
children = db.waitpoint_children.c


async def load_waiting(
    database: AsyncEngine,
) -> tuple[list[RunRow], set[str], set[tuple[str, int]]]:
    """After a restart: the WAITING runs, the runs pending waits wait on, and the (run,
    attempt) pairs with a pending wait."""
    async with database.connect() as conn:
        rows = (
            await conn.execute(
                select(db.runs)
                .where(db.runs.c.status == Status.WAITING.value)
                .order_by(db.runs.c.id)
            )
        ).all()
        awaited = set(
            (
                await conn.execute(
                    select(children.run_id)
                    .join(db.waitpoints, w.id == children.waitpoint_id)
                    .where(w.status == PENDING)
                )
            )
            .scalars()
            .all()
        )
        pending = {
            (r.run_id, r.attempt)
            for r in (
                await conn.execute(
                    select(w.run_id, w.attempt).where(w.status == PENDING, w.run_id.is_not(None))
                )
            ).all()
        }
    return list(rows), awaited, pending


async def attempt_and_journaled(
    database: AsyncEngine, attempt_id: str, run_id: str, seq: int
) -> tuple[int | None, bool]:
    """The attempt's number (fixed when it was made), and whether the run's journal has a
    wait of that attempt number at ``seq``."""
    async with database.connect() as conn:
        attempt = (
            await conn.execute(select(db.attempts.c.number).where(db.attempts.c.id == attempt_id))
        ).scalar()
        journaled = (
            await conn.execute(
                select(w.id).where(w.run_id == run_id, w.attempt == attempt, w.seq == seq)
            )
        ).first()
    return attempt, journaled is not None


async def journaled(tx: Tx, run_id: str, attempt: int, seq: int) -> RunRow | None:
    return (
        await tx.execute(
            select(db.waitpoints).where(w.run_id == run_id, w.attempt == attempt, w.seq == seq)
        )
    ).first()


async def token_in(tx: Tx, environment_id: str, token_id: str) -> RunRow | None:
    """A token (a waitpoint of no run) of the environment."""
    return (
        await tx.execute(
            select(db.waitpoints).where(
                w.id == token_id, w.environment_id == environment_id, w.run_id.is_(None)
            )
        )
    ).first()


async def token(tx: Tx, token_id: str) -> RunRow | None:
    """A TOKEN waitpoint, whatever its environment."""
    return (
        await tx.execute(select(db.waitpoints).where(w.id == token_id, w.kind == "TOKEN"))
    ).first()


async def token_by_key(tx: Tx, environment_id: str, key: str, now: int) -> RunRow | None:
    """The token holding idempotency key ``key``, unless it expired."""
    return (
        await tx.execute(
            select(db.waitpoints).where(
                w.environment_id == environment_id,
                w.idempotency_key == key,
                w.run_id.is_(None),
                w.idempotency_key_expires_at > now,
            )
        )
    ).first()


def add_children(tx: Tx, waitpoint_id: str, run_ids: Sequence[str]) -> None:
    for position, child_id in enumerate(run_ids):
        tx.insert_later(
            db.waitpoint_children,
            {"waitpoint_id": waitpoint_id, "position": position, "run_id": child_id},
        )


async def insert_waitpoint(tx: Tx, row: dict[str, Any]) -> None:
    await tx.execute(insert(db.waitpoints), [row])


async def first_keyed_due(tx: Tx, environment_id: str, key: str, now: int) -> int | None:
    """When the first duration wait with idempotency key ``key`` (not expired) ends."""
    first = (
        await tx.execute(
            select(w.due_at)
            .where(
                w.environment_id == environment_id,
                w.idempotency_key == key,
                w.kind == "DURATION",
                w.idempotency_key_expires_at > now,
            )
            .order_by(w.id)
            .limit(1)
        )
    ).first()
    return None if first is None else int(first.due_at)


async def kind_of(tx: Tx, waitpoint_id: str) -> str | None:
    row = (await tx.execute(select(w.kind).where(w.id == waitpoint_id))).first()
    return None if row is None else str(row.kind)


async def complete(
    tx: Tx, waitpoint_id: str, ok: bool, output: str | None, error: str | None, now: int
) -> RunRow | None:
    """Complete the waitpoint if it is pending; its row, or None."""
    return (
        await tx.execute(
            update(db.waitpoints)
            .where(w.id == waitpoint_id, w.status == PENDING)
            .values(status=COMPLETED, ok=ok, output=output, error=error, completed_at=now)
            .returning(*db.waitpoints.c)
        )
    ).first()


async def complete_waits_on(
    tx: Tx, token_id: str, ok: bool, output: str | None, error: str | None, now: int
) -> list[str]:
    """Complete every run's pending wait on a token; the ids of the runs, sorted."""
    waits = (
        await tx.execute(
            update(db.waitpoints)
            .where(w.target == token_id, w.status == PENDING, w.run_id.is_not(None))
            .values(status=COMPLETED, ok=ok, output=output, error=error, completed_at=now)
            .returning(w.run_id)
        )
    ).all()
    return sorted({r.run_id for r in waits})


async def ready_to_resume(tx: Tx, run_ids: Sequence[str]) -> list[RunRow]:
    """Those of ``run_ids`` that are WAITING with no pending wait of their current attempt."""
    r = db.runs.c
    other = db.waitpoints.alias("other")
    return list(
        (
            await tx.execute(
                select(db.runs).where(
                    r.id.in_(run_ids),
                    r.status == Status.WAITING.value,
                    ~exists().where(
                        other.c.run_id == r.id,
                        other.c.attempt == r.attempt_count,
                        other.c.status == PENDING,
                    ),
                )
            )
        ).all()
    )


async def pending_count(tx: Tx, run_id: str, attempt: int) -> int:
    """The run's pending waits of attempt number ``attempt``."""
    return int(
        (
            await tx.execute(
                select(func.count()).where(
                    w.run_id == run_id, w.attempt == attempt, w.status == PENDING
                )
            )
        ).scalar()
        or 0
    )


async def pending_waits_on_child(tx: Tx, run_id: str) -> list[str]:
    """Ids of the pending waits on child runs that include ``run_id``."""
    rows = (
        await tx.execute(
            select(w.id)
            .join(db.waitpoint_children, children.waitpoint_id == w.id)
            .where(children.run_id == run_id, w.status == PENDING)
        )
    ).all()
    return [r.id for r in rows]


async def children_of(tx: Tx, waitpoint_id: str) -> list[RunRow]:
    """The child runs a wait waits on (id, status, output, error), in item order."""
    return list(
        (
            await tx.execute(
                select(db.runs.c.id, db.runs.c.status, db.runs.c.output, db.runs.c.error)
                .join(db.waitpoint_children, children.run_id == db.runs.c.id)
                .where(children.waitpoint_id == waitpoint_id)
                .order_by(children.position)
            )
        ).all()
    )


async def completed_of(tx: Tx, run_id: str, attempt: int) -> list[RunRow]:
    """The completed waits of the run's attempt number ``attempt``, by seq."""
    return list(
        (
            await tx.execute(
                select(db.waitpoints)
                .where(w.run_id == run_id, w.attempt == attempt, w.status == COMPLETED)
                .order_by(w.seq)
            )
        ).all()
    )


async def get_token(database: AsyncEngine, environment_id: str, token_id: str) -> RunRow | None:
    async with database.connect() as conn:
        return (
            await conn.execute(
                select(db.waitpoints).where(
                    w.id == token_id, w.environment_id == environment_id, w.run_id.is_(None)
                )
            )
        ).first()


async def list_tokens(
    database: AsyncEngine, environment_id: str, idempotency_key: str, before_id: str | None
) -> list[RunRow]:
    """The environment's tokens newest first (with the key; before ``before_id``)."""
    query = select(db.waitpoints).where(
        w.environment_id == environment_id, w.run_id.is_(None), w.kind == "TOKEN"
    )
    if idempotency_key:
        query = query.where(w.idempotency_key == idempotency_key)
    if before_id:
        query = query.where(w.id < before_id)
    async with database.connect() as conn:
        return list((await conn.execute(query.order_by(w.id.desc()))).all())
