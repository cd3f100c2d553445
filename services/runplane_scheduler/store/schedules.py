"""Schedule queries: the rows of cron schedules (declarative and imperative), their next tick,
and the reads of ScheduleService."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from runplane_common.errors import NotFound
from runplane_scheduler.store import tables as db
from runplane_scheduler.store.writer import RunRow, Tx, now_ms

S = db.schedules.c


async def change(tx: Tx, schedule_id: str, **values: Any) -> RunRow | None:
    """Update a schedule's columns (and its updated_at); its row, or None if it is gone."""
    return await _update(tx, schedule_id, [], values)


async def advance(
    tx: Tx, schedule_id: str, fired: int, next_run_at: int, last_run_at: int
) -> RunRow | None:
    """Move an active schedule on from the tick ``fired`` (None if it changed meanwhile)."""
    return await _update(
        tx,
        schedule_id,
        [S.next_run_at == fired, S.active.is_(True)],
        {"next_run_at": next_run_at, "last_run_at": last_run_at},
    )


async def _update(
    tx: Tx, schedule_id: str, conditions: list[Any], values: dict[str, Any]
) -> RunRow | None:
    stmt = (
        update(db.schedules)
        .where(S.id == schedule_id, *conditions)
        .values(updated_at=now_ms(), **values)
        .returning(*db.schedules.c)
    )
    return (await tx.execute(stmt)).first()


async def get(tx: Tx, environment_id: str, schedule_id: str) -> RunRow:
    row = (
        await tx.execute(
            select(db.schedules).where(S.id == schedule_id, S.environment_id == environment_id)
        )
    ).first()
    if row is None:
        raise NotFound(f"schedule {schedule_id} not found")
    return row


async def of_type(tx: Tx, environment_id: str, schedule_type: str) -> list[RunRow]:
    return list(
        (
            await tx.execute(
                select(db.schedules).where(
                    S.environment_id == environment_id, S.type == schedule_type
                )
            )
        ).all()
    )


async def by_deduplication_key(tx: Tx, environment_id: str, key: str) -> RunRow | None:
    return (
        await tx.execute(
            select(db.schedules).where(
                S.environment_id == environment_id, S.deduplication_key == key
            )
        )
    ).first()


async def insert_schedule(tx: Tx, values: dict[str, Any]) -> None:
    await tx.execute(insert(db.schedules), [values])


async def delete_schedule(tx: Tx, schedule_id: str) -> None:
    await tx.execute(delete(db.schedules).where(S.id == schedule_id))


async def load_active(database: AsyncEngine) -> list[RunRow]:
    async with database.connect() as conn:
        return list((await conn.execute(select(db.schedules).where(S.active.is_(True)))).all())


async def find(database: AsyncEngine, schedule_id: str) -> RunRow | None:
    async with database.connect() as conn:
        return (await conn.execute(select(db.schedules).where(S.id == schedule_id))).first()


async def find_in(database: AsyncEngine, environment_id: str, schedule_id: str) -> RunRow | None:
    async with database.connect() as conn:
        return (
            await conn.execute(
                select(db.schedules).where(S.id == schedule_id, S.environment_id == environment_id)
            )
        ).first()


async def list_in(
    database: AsyncEngine,
    environment_id: str,
    task_ids: Sequence[str],
    after: str | None,
    limit: int,
) -> list[RunRow]:
    """The environment's schedules by id (of ``task_ids``, after ``after``)."""
    stmt = select(db.schedules).where(S.environment_id == environment_id)
    if task_ids:
        stmt = stmt.where(S.task_id.in_(task_ids))
    if after:
        stmt = stmt.where(S.id > after)
    async with database.connect() as conn:
        return list((await conn.execute(stmt.order_by(S.id).limit(limit))).all())
