"""Worker versions: each version's manifest, which one is current for each task (the
``task_definitions`` rows carry their version), promotions and rollbacks, and how many runs
each version still holds."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from runplane_scheduler.states import FINAL
from runplane_scheduler.store import tables as db
from runplane_scheduler.store.writer import RunRow, Tx

v = db.worker_versions.c


async def load_all(engine: AsyncEngine) -> list[RunRow]:
    """Every registered version of every environment (the engine indexes their manifests)."""
    async with engine.connect() as conn:
        return list((await conn.execute(select(db.worker_versions))).all())


async def find(tx: Tx, environment_id: str, version: str) -> RunRow | None:
    return (
        await tx.execute(
            select(db.worker_versions).where(
                v.environment_id == environment_id, v.version == version
            )
        )
    ).first()


async def add(tx: Tx, environment_id: str, version: str, manifest: str, ts: int) -> None:
    await tx.execute(
        insert(db.worker_versions).values(
            environment_id=environment_id,
            version=version,
            manifest=manifest,
            created_at=ts,
            promoted_at=None,
            rolled_back=False,
        )
    )


async def mark_promoted(tx: Tx, environment_id: str, version: str, ts: int) -> None:
    await tx.execute(
        update(db.worker_versions)
        .where(v.environment_id == environment_id, v.version == version)
        .values(promoted_at=ts, rolled_back=False)
    )


async def mark_rolled_back(tx: Tx, environment_id: str, version: str) -> None:
    await tx.execute(
        update(db.worker_versions)
        .where(v.environment_id == environment_id, v.version == version)
        .values(rolled_back=True)
    )


async def promoted(tx: Tx, environment_id: str) -> list[RunRow]:
    """The environment's versions that were promoted and not rolled back, latest first."""
    return list(
        (
            await tx.execute(
                select(v.version, v.promoted_at)
                .where(
                    v.environment_id == environment_id,
                    v.promoted_at.is_not(None),
                    v.rolled_back.is_(False),
                )
                .order_by(v.promoted_at.desc(), v.created_at.desc())
            )
        ).all()
    )


async def listing(engine: AsyncEngine, environment_id: str) -> list[dict[str, Any]]:
    """The environment's versions, newest first, each with how many runs locked to it are not
    final yet (the runs an old version's executors must stay up for)."""
    r = db.runs.c
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(db.worker_versions)
                .where(v.environment_id == environment_id)
                .order_by(v.created_at.desc(), v.version)
            )
        ).all()
        counts: dict[str, int] = {
            str(row[0]): int(row[1])
            for row in (
                await conn.execute(
                    select(r.worker_version, func.count())
                    .where(
                        r.environment_id == environment_id,
                        r.worker_version != "",
                        r.status.not_in([s.value for s in FINAL]),
                    )
                    .group_by(r.worker_version)
                )
            ).all()
        }
    return [{**row._mapping, "active_runs": int(counts.get(row.version, 0))} for row in rows]
