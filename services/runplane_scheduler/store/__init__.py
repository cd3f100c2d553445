"""The storage seam: every SQL statement the scheduler runs lives in this package.

- :mod:`.tables` — the schema (SQLAlchemy Core tables), the engine factory and the migrations
- :mod:`.writer` — the group-commit writer, :class:`Tx` and run transitions
- :class:`Store` (here) — reads, and the run, attempt, timer and task-definition writes
- one module per further subject: :mod:`.runs`, :mod:`.queues`, :mod:`.waitpoints`,
  :mod:`.schedules`, :mod:`.keys`

Nothing outside this package builds SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from runplane_common.errors import NotFound
from runplane_scheduler.states import FINAL, Status
from runplane_scheduler.store import tables as db
from runplane_scheduler.store.writer import (
    CLEAN_ERRORS,
    DURATION_SINCE_START,
    DURATION_SO_FAR,
    FIRST_START,
    ONE_MORE_ATTEMPT,
    STARTED_AT_START,
    ChangeHook,
    CommitHook,
    RunChange,
    RunRow,
    Tx,
    Via,
    Writer,
    now_ms,
    run_to_pb,
    timestamp,
)

__all__ = [
    "CLEAN_ERRORS",
    "DURATION_SINCE_START",
    "DURATION_SO_FAR",
    "FIRST_START",
    "ONE_MORE_ATTEMPT",
    "STARTED_AT_START",
    "ChangeHook",
    "RunChange",
    "RunRow",
    "Store",
    "Tx",
    "Via",
    "Writer",
    "now_ms",
    "run_to_pb",
    "timestamp",
]


_FINISH_ATTEMPT = (
    update(db.attempts)
    .where(db.attempts.c.id == bindparam("attempt_id"))
    .values(
        status=bindparam("status"), finished_at=bindparam("finished_at"), error=bindparam("error")
    )
)
_START_ATTEMPT = (
    update(db.attempts)
    .where(db.attempts.c.id == bindparam("attempt_id"))
    .values(status="EXECUTING", started_at=bindparam("started_at"))
)
_START_AND_FINISH_ATTEMPT = (
    update(db.attempts)
    .where(db.attempts.c.id == bindparam("attempt_id"))
    .values(
        status=bindparam("status"),
        started_at=bindparam("started_at"),
        finished_at=bindparam("finished_at"),
    )
)


class Store:
    """Reads (any connection) and the writer (group commit)."""

    def __init__(self, db: AsyncEngine, on_commit: CommitHook) -> None:
        self.db = db  # the SQLAlchemy engine (reads); writes go through ``writer``
        self.writer = Writer(db, on_commit)

    # -- reads ---------------------------------------------------------------------------------

    async def ping(self) -> None:
        """One trivial read: raises when the database cannot be reached."""
        async with self.db.connect() as conn:
            await conn.execute(select(literal(1)))

    async def get_run(self, environment_id: str, run_id: str) -> RunRow | None:
        async with self.db.connect() as conn:
            return (
                await conn.execute(
                    select(db.runs).where(
                        db.runs.c.id == run_id, db.runs.c.environment_id == environment_id
                    )
                )
            ).first()

    async def list_runs(
        self,
        environment_id: str,
        *,
        statuses: Sequence[str],
        task_ids: Sequence[str],
        tags: Sequence[str],
        batch_id: str = "",
        version: str = "",
        created_after: int | None,
        created_before: int | None,
        before_id: str | None,
        limit: int,
    ) -> list[RunRow]:
        r = db.runs.c
        conditions: list[Any] = [r.environment_id == environment_id]
        if statuses:
            conditions.append(r.status.in_(statuses))
        if task_ids:
            conditions.append(r.task_id.in_(task_ids))
        if batch_id:
            conditions.append(r.batch_id == batch_id)
        if version:
            conditions.append(r.worker_version == version)
        if created_after is not None:
            conditions.append(r.created_at >= created_after)
        if created_before is not None:
            conditions.append(r.created_at < created_before)
        if before_id:
            conditions.append(r.id < before_id)
        for tag in tags:
            conditions.append(
                r.id.in_(
                    select(db.run_tags.c.run_id).where(
                        db.run_tags.c.environment_id == environment_id, db.run_tags.c.tag == tag
                    )
                )
            )
        stmt = select(db.runs).where(and_(*conditions)).order_by(r.id.desc()).limit(limit)
        async with self.db.connect() as conn:
            return list((await conn.execute(stmt)).all())

    async def get_batch(self, environment_id: str, batch_id: str) -> tuple[RunRow, list[Any]]:
        """A batch and its runs' ids and statuses, in item order."""
        async with self.db.connect() as conn:
            batch = (
                await conn.execute(
                    select(db.batches).where(
                        db.batches.c.id == batch_id, db.batches.c.environment_id == environment_id
                    )
                )
            ).first()
            if batch is None:
                raise NotFound(f"batch {batch_id} not found")
            runs = (
                await conn.execute(
                    select(db.runs.c.id, db.runs.c.status)
                    .where(db.runs.c.batch_id == batch_id)
                    .order_by(db.runs.c.id)
                )
            ).all()
        return batch, list(runs)

    async def queue_counts(
        self, environment_id: str, names: Sequence[str]
    ) -> dict[str, tuple[int, int]]:
        """(running, queued) per queue name."""
        r = db.runs.c
        active = [Status.QUEUED.value, Status.DEQUEUED.value, Status.EXECUTING.value]
        stmt = (
            select(r.queue, r.status, func.count())
            .where(r.environment_id == environment_id, r.queue.in_(names), r.status.in_(active))
            .group_by(r.queue, r.status)
        )
        counts = dict.fromkeys(names, (0, 0))
        async with self.db.connect() as conn:
            for queue, status, n in (await conn.execute(stmt)).all():
                running, queued = counts[queue]
                if status == Status.QUEUED.value:
                    queued += n
                else:
                    running += n
                counts[queue] = (running, queued)
        return counts

    async def list_queues(
        self, environment_id: str, after_name: str | None, limit: int
    ) -> list[RunRow]:
        q = db.queues.c
        stmt = select(db.queues).where(q.environment_id == environment_id)
        if after_name is not None:
            stmt = stmt.where(q.name > after_name)
        async with self.db.connect() as conn:
            return list((await conn.execute(stmt.order_by(q.name).limit(limit))).all())

    async def find_queue(self, environment_id: str, queue: str) -> RunRow:
        q = db.queues.c
        named = q.id == queue if queue.startswith("queue_") else q.name == queue
        async with self.db.connect() as conn:
            row = (
                await conn.execute(
                    select(db.queues).where(q.environment_id == environment_id, named)
                )
            ).first()
        if row is None:
            raise NotFound(f"queue {queue} not found")
        return row

    async def load_queues(self) -> list[RunRow]:
        async with self.db.connect() as conn:
            return list((await conn.execute(select(db.queues))).all())

    async def load_task_definitions(self) -> list[RunRow]:
        async with self.db.connect() as conn:
            return list((await conn.execute(select(db.task_definitions))).all())

    async def load_active_runs(self) -> list[RunRow]:
        """Runs the engine must index after a restart, oldest first."""
        active = [
            Status.PENDING_VERSION,
            Status.QUEUED,
            Status.DEQUEUED,
            Status.EXECUTING,
        ]
        async with self.db.connect() as conn:
            return list(
                (
                    await conn.execute(
                        select(db.runs)
                        .where(db.runs.c.status.in_([s.value for s in active]))
                        .order_by(db.runs.c.id)
                    )
                ).all()
            )

    async def load_timers(self) -> list[RunRow]:
        async with self.db.connect() as conn:
            return list((await conn.execute(select(db.timers).order_by(db.timers.c.due_at))).all())

    async def read_outbox(self, after: str, limit: int) -> list[RunRow]:
        """Outbox rows after event id ``after``, in order."""
        async with self.db.connect() as conn:
            return list(
                (
                    await conn.execute(
                        select(db.outbox)
                        .where(db.outbox.c.event_id > after)
                        .order_by(db.outbox.c.event_id)
                        .limit(limit)
                    )
                ).all()
            )

    # -- writes (each used inside an op) -----------------------------------------------------

    @staticmethod
    async def find_idempotent(
        tx: Tx, environment_id: str, task_id: str, key: str, ts: int
    ) -> RunRow | None:
        """The run holding ``key`` for the task, unless the key expired or the run ended in a
        status that releases keys (FAILED, CRASHED, SYSTEM_FAILURE, TIMED_OUT, EXPIRED)."""
        releasing = [s.value for s in FINAL if s not in (Status.COMPLETED, Status.CANCELED)]
        return (
            await tx.execute(
                select(db.runs)
                .where(
                    db.runs.c.environment_id == environment_id,
                    db.runs.c.task_id == task_id,
                    db.runs.c.idempotency_key == key,
                    db.runs.c.idempotency_key_expires_at > ts,
                    db.runs.c.status.not_in(releasing),
                )
                .limit(1)
            )
        ).first()

    @staticmethod
    async def insert_run(
        tx: Tx, values: dict[str, Any], tags: Sequence[str], created: dict[str, Any] | None = None
    ) -> None:
        """Insert a run; ``values`` holds every column; ``created`` is the snapshot its "created"
        event carries (default: ``values``)."""
        tx.insert_later(db.runs, values)
        for tag in dict.fromkeys(tags):
            tx.insert_later(
                db.run_tags,
                {"run_id": values["id"], "tag": tag, "environment_id": values["environment_id"]},
            )
        tx.emit("created", created or values)

    @staticmethod
    async def replace_tags(tx: Tx, environment_id: str, run_id: str, tags: Sequence[str]) -> None:
        await tx.execute(delete(db.run_tags).where(db.run_tags.c.run_id == run_id))
        for tag in dict.fromkeys(tags):
            tx.insert_later(
                db.run_tags, {"run_id": run_id, "tag": tag, "environment_id": environment_id}
            )

    @staticmethod
    async def insert_attempt(tx: Tx, values: dict[str, Any]) -> None:
        tx.insert_later(db.attempts, values)

    @staticmethod
    async def finish_attempt(
        tx: Tx, attempt_id: str, status: str, error: str | None = None
    ) -> None:
        await tx.execute(
            _FINISH_ATTEMPT,
            {"attempt_id": attempt_id, "status": status, "finished_at": now_ms(), "error": error},
        )

    @staticmethod
    async def start_and_finish_attempt(
        tx: Tx, attempt_id: str, status: str, started_at: int, finished_at: int
    ) -> None:
        await tx.execute(
            _START_AND_FINISH_ATTEMPT,
            {
                "attempt_id": attempt_id,
                "status": status,
                "started_at": started_at,
                "finished_at": finished_at,
            },
        )

    @staticmethod
    async def finish_attempts(
        tx: Tx, attempts: Sequence[tuple[str, int]], status: str, finished_at: int
    ) -> None:
        """End many attempts in one statement per kind: (attempt id, its start if it is recorded
        with its end, else 0)."""
        started = [
            {"attempt_id": a, "status": status, "finished_at": finished_at, "error": None}
            for a, start in attempts
            if not start
        ]
        held = [
            {"attempt_id": a, "status": status, "started_at": start, "finished_at": finished_at}
            for a, start in attempts
            if start
        ]
        if started:
            await tx.execute(_FINISH_ATTEMPT, started)
        if held:
            await tx.execute(_START_AND_FINISH_ATTEMPT, held)

    @staticmethod
    async def start_attempts(tx: Tx, attempts: Sequence[tuple[str, int]]) -> None:
        """Start many attempts in one statement: (attempt id, its start)."""
        if attempts:
            await tx.execute(
                _START_ATTEMPT, [{"attempt_id": a, "started_at": ts} for a, ts in attempts]
            )

    @staticmethod
    async def add_timer(tx: Tx, timer_id: str, due_at: int, kind: str, target: str) -> None:
        await tx.execute(
            insert(db.timers),
            [{"id": timer_id, "due_at": due_at, "kind": kind, "target": target, "data": "{}"}],
        )

    @staticmethod
    async def delete_timer(tx: Tx, timer_id: str) -> bool:
        result = await tx.execute(delete(db.timers).where(db.timers.c.id == timer_id))
        return bool(result.rowcount)

    @staticmethod
    async def upsert_task_definitions(
        tx: Tx, environment_id: str, rows: list[dict[str, Any]]
    ) -> None:
        ids = [r["task_id"] for r in rows]
        if ids:
            await tx.execute(
                delete(db.task_definitions).where(
                    db.task_definitions.c.environment_id == environment_id,
                    db.task_definitions.c.task_id.in_(ids),
                )
            )
            await tx.execute(insert(db.task_definitions), rows)
