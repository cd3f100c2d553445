"""Queue writes: the queues a registering executor's code declares, and a queue's pause flag
or limit override. (Queue reads are :class:`~runplane_scheduler.store.Store` methods.)"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, update

from runplane_common.errors import NotFound
from runplane_common.ids import new_id
from runplane_scheduler.store import tables as db
from runplane_scheduler.store.writer import RunRow, Tx

q = db.queues.c


async def declare(tx: Tx, environment_id: str, declared: Mapping[str, int], ts: int) -> None:
    """Queues (name -> limit) the code declares, with their declared limits (overrides and
    pauses stay)."""
    if not declared:
        return
    existing = {
        r.name
        for r in (
            await tx.execute(
                select(q.name).where(q.environment_id == environment_id, q.name.in_(list(declared)))
            )
        ).all()
    }
    for name, limit in declared.items():
        if name in existing:
            await tx.execute(
                update(db.queues)
                .where(q.environment_id == environment_id, q.name == name)
                .values(concurrency_limit=limit, updated_at=ts)
            )
        else:
            tx.insert_later(
                db.queues,
                {
                    "id": new_id("queue"),
                    "environment_id": environment_id,
                    "name": name,
                    "concurrency_limit": limit,
                    "limit_override": None,
                    "overridden_at": None,
                    "paused": False,
                    "created_at": ts,
                    "updated_at": ts,
                },
            )


async def change(tx: Tx, environment_id: str, queue: str, ts: int, **values: Any) -> RunRow:
    """Update a queue named ``queue`` (or with that id, ``queue_...``); NotFound if none."""
    named = q.id == queue if queue.startswith("queue_") else q.name == queue
    row = (
        await tx.execute(
            update(db.queues)
            .where(q.environment_id == environment_id, named)
            .values(updated_at=ts, **values)
            .returning(*db.queues.c)
        )
    ).first()
    if row is None:
        raise NotFound(f"queue {queue} not found")
    return row
