"""The group-commit writer and the transaction view (:class:`Tx`) every write operation gets,
with its run transitions (reusable compiled statements) and outbox events.

Writes go through :class:`Writer`, which runs many operations in one transaction (one fsync for
many runs). An operation checks before it writes: when it raises a ServiceError or a
TransitionError it has written nothing, so the rest of its batch still commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import orjson
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import (
    BigInteger,
    Column,
    Table,
    bindparam,
    delete,
    func,
    insert,
    update,
)
from sqlalchemy.engine import Connection, CursorResult, Engine, Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, ClauseElement, Null

from runplane.v1 import events_pb2, run_pb2
from runplane_common import subjects
from runplane_common.errors import ServiceError, Unavailable
from runplane_common.ids import new_id
from runplane_scheduler.states import FINAL, Status, TransitionError, can_transition
from runplane_scheduler.store import tables as db

log = logging.getLogger("runplane.scheduler.store")

T = TypeVar("T")
RunRow = Row[Any]

MAX_BATCH = 512
# Events must fit a NATS message (1 MB by default); larger snapshots drop their big fields.
MAX_EVENT_BYTES = 512 * 1024

CommitHook = Callable[[list[dict[str, Any]]], None]


class RunChange(NamedTuple):
    """A run's committed event, as the scheduler's metrics see it (see ``metrics.py``)."""

    event_type: str
    environment_id: str
    task_id: str
    queue: str
    status: str
    # The statuses the transition was allowed from (empty: a new run's own event).
    sources: tuple[str, ...]
    queued_at: int | None
    started_at: int | None
    updated_at: int
    duration_ms: int
    attempt_count: int


# Called after each commit with the run events it committed, in order.
ChangeHook = Callable[[list[RunChange]], None]
# Called in the transaction when a run reaches a final status (a parent may wait on it).
FinalHook = Callable[["Tx", Mapping[Any, Any]], Awaitable[None]]
IDLE_FLUSH = 0.5  # seconds; published outbox rows are deleted at least this often
# Published outbox rows ride along with a busy writer's commits in chunks this large (or once
# the oldest has waited IDLE_FLUSH), not one small DELETE per commit.
DELETE_CHUNK = 256


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def timestamp(ms: int | None) -> Timestamp | None:
    if ms is None:
        return None
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def _duration(ms: int | None) -> Duration | None:
    if not ms:
        return None
    d = Duration()
    d.FromMilliseconds(ms)
    return d


def run_to_pb(row: RunRow | Mapping[str, Any]) -> run_pb2.Run:
    """The public shape of a run row."""
    m = row if isinstance(row, Mapping) else row._mapping
    error = None
    if m["error"]:
        e = orjson.loads(m["error"])
        error = run_pb2.RunError(
            type=e.get("type", ""),
            message=e.get("message", ""),
            stack_trace=e.get("stack_trace", ""),
        )
    return run_pb2.Run(
        id=m["id"],
        task_id=m["task_id"],
        status=run_pb2.RunStatus.Value("RUN_STATUS_" + m["status"]),
        payload=m["payload"],
        output=m["output"] or "",
        error=error,
        tags=orjson.loads(m["tags"]),
        metadata=m["metadata"],
        queue=m["queue"],
        idempotency_key=m["idempotency_key"] or "",
        concurrency_key=m["concurrency_key"],
        priority=m["priority"],
        attempt_count=m["attempt_count"],
        max_attempts=m["max_attempts"],
        version=m["version"],
        environment_id=m["environment_id"],
        is_test=m["is_test"],
        parent_run_id=m["parent_run_id"] or "",
        root_run_id=m["root_run_id"] or "",
        batch_id=m["batch_id"] or "",
        created_at=timestamp(m["created_at"]),
        updated_at=timestamp(m["updated_at"]),
        queued_at=timestamp(m["queued_at"]),
        started_at=timestamp(m["started_at"]),
        finished_at=timestamp(m["finished_at"]),
        duration_ms=m["duration_ms"],
        delay_until=timestamp(m["delay_until"]),
        ttl=_duration(m["ttl_ms"]),
        max_duration=_duration(m["max_duration_ms"]),
        machine=m["machine"],
        replayed_from_run_id=m["replayed_from_run_id"] or "",
        idempotency_key_expires_at=timestamp(m["idempotency_key_expires_at"]),
        depth=m["depth"],
        worker_version=m.get("worker_version") or "",
    )


def _truncate(event: events_pb2.RunEvent) -> bytes:
    event.truncated = True
    run = event.run
    for name in ("payload", "output", "stack_trace", "metadata", "message"):
        if name in ("stack_trace", "message"):
            run.error.ClearField(name)  # type: ignore[arg-type]
        elif name == "metadata":
            run.metadata = "{}"
        else:
            run.ClearField(name)  # type: ignore[arg-type]
        data = event.SerializeToString()
        if len(data) <= MAX_EVENT_BYTES:
            return data
    return event.SerializeToString()


class InlineConnection:
    """A synchronous SQLite connection driven from the event loop. The writer's statements take
    microseconds; running them inline beats a thread hop per statement (aiosqlite), and with
    WAL and synchronous=NORMAL a commit does not wait for the disk. Readers keep aiosqlite."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def execute(self, statement: Any, params: Any = None) -> CursorResult[Any]:
        return self._conn.execute(statement, params)

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[None]:
        with self._conn.begin():
            yield

    async def close(self) -> None:
        self._conn.close()

    def dbapi(self) -> Any:
        """The sqlite3 connection underneath (its statements join the open transaction)."""
        return self._conn.connection.driver_connection


WriterConnection = AsyncConnection | InlineConnection


async def driver_of(conn: WriterConnection) -> Any:
    """The driver's own connection under ``conn``, in its open transaction: a sqlite3 one
    (SQLite, driven inline), an asyncpg one, or None (aiosqlite: no fast path)."""
    if isinstance(conn, InlineConnection):
        return conn.dbapi()
    if conn.dialect.name == "postgresql":
        return (await conn.get_raw_connection()).driver_connection
    return None


_INSERTS: dict[tuple[str, tuple[str, ...], bool], str] = {}


def _insert_sql(table: Table, columns: tuple[str, ...], postgres: bool) -> str:
    key = (table.name, columns, postgres)
    sql = _INSERTS.get(key)
    if sql is None:
        marks = (
            ", ".join(f"${n}" for n in range(1, len(columns) + 1))
            if postgres
            else ", ".join("?" for _ in columns)
        )
        sql = _INSERTS[key] = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks})"
    return sql


async def insert_rows(conn: WriterConnection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` into ``table``: one prepared statement run for every row, straight to the
    driver (asyncpg pipelines them; sqlite3 runs them inline), else through SQLAlchemy."""
    driver = await driver_of(conn)
    if driver is None:
        await conn.execute(insert(table), rows)
        return
    groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for row in rows:
        columns = tuple(row)
        groups.setdefault(columns, []).append(tuple(row.values()))
    for columns, values in groups.items():
        if isinstance(driver, sqlite3.Connection):
            driver.executemany(_insert_sql(table, columns, False), values)
        else:
            await driver.executemany(_insert_sql(table, columns, True), values)


@dataclass
class _Batch:
    """One group-commit transaction: its connection, outbox rows and deferred inserts."""

    conn: WriterConnection
    events: list[dict[str, Any]] = field(default_factory=list)
    changes: list[RunChange] = field(default_factory=list)
    # Inserts nobody reads back within the batch run as one executemany per table, in order.
    pending: dict[Table, list[dict[str, Any]]] = field(default_factory=dict)

    async def flush(self) -> None:
        for table, rows in self.pending.items():
            if rows:
                await insert_rows(self.conn, table, rows)
        self.pending.clear()


@dataclass
class Tx:
    """One operation's view of the current group-commit transaction."""

    batch: _Batch
    after_commit: list[Callable[[], object]] = field(default_factory=list)
    on_final: FinalHook | None = None

    async def execute(self, statement: Any, params: Any = None) -> CursorResult[Any]:
        """Run a statement after the batch's deferred inserts, so it sees them."""
        await self.batch.flush()
        result: CursorResult[Any] = await self.batch.conn.execute(statement, params)
        return result

    async def driver(self) -> Any:
        """The driver's own connection, in this transaction, for statements SQLAlchemy's
        execution path would cost too much on (``store/hot.py``): an asyncpg connection, a
        sqlite3 one, or None (aiosqlite: no fast path)."""
        await self.batch.flush()
        return await driver_of(self.batch.conn)

    def insert_later(self, table: Table, row: dict[str, Any]) -> None:
        """Insert ``row`` with the rest of the batch (one statement for many operations)."""
        self.batch.pending.setdefault(table, []).append(row)

    def emit(
        self,
        event_type: str,
        row: RunRow | Mapping[str, Any],
        sources: Iterable[Status] = (),
    ) -> None:
        """Queue a RunEvent with the run's snapshot for the outbox (same transaction);
        ``sources``: the statuses the run moved from, for the metrics."""
        m = row if isinstance(row, Mapping) else row._mapping
        self.batch.changes.append(
            RunChange(
                event_type,
                m["environment_id"],
                m["task_id"],
                m["queue"],
                m["status"],
                tuple(s.value for s in sources),
                m.get("queued_at"),
                m.get("started_at"),
                m["updated_at"],
                m.get("duration_ms") or 0,
                m.get("attempt_count") or 0,
            )
        )
        event_id = new_id("evt")
        event = events_pb2.RunEvent(
            event_id=event_id,
            type=event_type,
            run=run_to_pb(row),
            occurred_at=timestamp(m["updated_at"]),
        )
        data = event.SerializeToString()
        if len(data) > MAX_EVENT_BYTES:
            data = _truncate(event)
        self.batch.events.append(
            {
                "event_id": event_id,
                "subject": subjects.run_event(m["environment_id"], m["id"]),
                "data": data,
                "traceparent": m["traceparent"],
                "created_at": m["updated_at"],
            }
        )

    async def transition(
        self,
        run_id: str,
        sources: Iterable[Status],
        target: Status,
        event_type: str,
        *conditions: Any,
        via: Via | None = None,
        **values: Any,
    ) -> RunRow | None:
        """Move the run to ``target`` if its status is one of ``sources`` (and ``conditions`` hold),
        bumping its version and emitting the event. None when it did not apply.

        ``conditions`` are comparisons of a runs column with a value (or ``is_(None)``); values
        are plain values or the expressions of :data:`TEMPLATE_EXPRESSIONS` (with their
        parameters in ``params``). Such calls reuse one compiled statement per shape, which is
        several times cheaper than building a statement per call; anything else still works,
        built afresh.

        With ``via`` the run passes through ``via.status`` on the way, in the same statement:
        its version goes up by two and both events are emitted, the first with the snapshot
        ``via.as_then`` makes of the final row."""
        sources = tuple(sources)
        for source in sources:
            if via is not None:
                if not (can_transition(source, via.status) and can_transition(via.status, target)):
                    raise TransitionError(source, target)
            elif source != target and not can_transition(source, target):
                raise TransitionError(source, target)
        steps = 1 if via is None else 2
        params: dict[str, Any] = values.pop("params", None) or {}
        ts = values.pop("updated_at", None) or now_ms()
        template = _template(sources, target, conditions, values, steps)
        if template is not None:
            stmt, bind = template
            bind.update(params, _rid=run_id, _ts=ts)
            row = (await self.execute(stmt, bind)).first()
        else:
            stmt = (
                update(db.runs)
                .where(
                    db.runs.c.id == run_id,
                    db.runs.c.status.in_([s.value for s in sources]),
                    *conditions,
                )
                .values(
                    status=target.value, version=db.runs.c.version + steps, updated_at=ts, **values
                )
                .returning(*db.runs.c)
            )
            row = (await self.execute(stmt, params or None)).first()
        if row is not None:
            await self.emit_transition(row._mapping, sources, target, event_type, via)
        return row

    async def emit_transition(
        self,
        row: Mapping[Any, Any],
        sources: tuple[Status, ...],
        target: Status,
        event_type: str,
        via: Via | None = None,
    ) -> None:
        """The events of a run that moved from ``sources`` to ``target`` (through ``via``), and
        the final hook if it ended."""
        if via is not None:
            then = dict(row)
            then.update(status=via.status.value, version=row["version"] - 1)
            via.as_then(then)
            self.emit(via.event_type, then, sources)
        self.emit(event_type, row, sources if via is None else (via.status,))
        if target in FINAL and self.on_final is not None:
            await self.on_final(self, row)


def _p(name: str) -> BindParameter[Any]:
    return bindparam(name)


# Expressions a transition may set, built once so statements using them can be reused.
_NOW = bindparam("p_now", type_=BigInteger)
_START = bindparam("p_start", type_=BigInteger)
DURATION_SO_FAR = db.runs.c.duration_ms + (_NOW - db.runs.c.started_at)
FIRST_START = func.coalesce(db.runs.c.started_at, _NOW)
ONE_MORE_ATTEMPT = db.runs.c.attempt_count + 1
# For a run started and ended in one statement (``via``): its start is ``p_start``.
STARTED_AT_START = func.coalesce(db.runs.c.started_at, _START)
DURATION_SINCE_START = db.runs.c.duration_ms + (_NOW - STARTED_AT_START)
TEMPLATE_EXPRESSIONS = frozenset(
    id(e)
    for e in (
        DURATION_SO_FAR,
        FIRST_START,
        ONE_MORE_ATTEMPT,
        STARTED_AT_START,
        DURATION_SINCE_START,
    )
)


@dataclass(frozen=True)
class Via:
    """A status a transition passes through (see :meth:`Tx.transition`)."""

    status: Status
    event_type: str
    # Turns a copy of the final row into the run as it was in ``status`` (its event's snapshot).
    as_then: Callable[[dict[str, Any]], None]


_COMPARISONS = {
    operators.eq: "eq",
    operators.ne: "ne",
    operators.lt: "lt",
    operators.le: "le",
    operators.gt: "gt",
    operators.ge: "ge",
}
_TEMPLATES: dict[tuple[Any, ...], Any] = {}


def _template(
    sources: tuple[Status, ...],
    target: Status,
    conditions: tuple[Any, ...],
    values: dict[str, Any],
    steps: int,
) -> tuple[Any, dict[str, Any]] | None:
    """A reusable UPDATE ... RETURNING for this shape of transition and its parameters, or None
    when the shape has parts only a fresh statement can express."""
    shape: list[Any] = [tuple(sources), target, steps]
    bind: dict[str, Any] = {}
    for i, c in enumerate(conditions):
        if not isinstance(c, BinaryExpression) or not isinstance(c.left, Column):
            return None
        if c.operator is operators.is_ and isinstance(c.right, Null):
            shape.append((c.left.key, "null"))
        elif c.operator in _COMPARISONS and isinstance(c.right, BindParameter):
            shape.append((c.left.key, _COMPARISONS[c.operator]))
            bind[f"_c{i}"] = c.right.effective_value
        else:
            return None
    for key, value in values.items():
        if isinstance(value, ClauseElement):
            if id(value) not in TEMPLATE_EXPRESSIONS:
                return None
            shape.append((key, id(value)))
        else:
            shape.append((key, "bind"))
            bind[f"_v_{key}"] = value
    cache_key = tuple(shape)
    stmt = _TEMPLATES.get(cache_key)
    if stmt is None:
        if len(_TEMPLATES) > 512:  # shapes are few; this guards against a caller that varies
            _TEMPLATES.clear()
        stmt = _TEMPLATES[cache_key] = _build(sources, target, conditions, values, steps)
    return stmt, bind


def _build(
    sources: tuple[Status, ...],
    target: Status,
    conditions: tuple[Any, ...],
    values: dict[str, Any],
    steps: int,
) -> Any:
    r = db.runs.c
    where = [r.id == _p("_rid"), r.status.in_([s.value for s in sources])]
    for i, c in enumerate(conditions):
        column = r[c.left.key]
        if c.operator is operators.is_:
            where.append(column.is_(None))
        else:
            where.append(c.operator(column, _p(f"_c{i}")))
    sets = {
        key: value if isinstance(value, ClauseElement) else _p(f"_v_{key}")
        for key, value in values.items()
    }
    return (
        update(db.runs)
        .where(*where)
        .values(status=target.value, version=r.version + steps, updated_at=_p("_ts"), **sets)
        .returning(*db.runs.c)
    )


Op = Callable[[Tx], Awaitable[T]]

# Errors an operation raises before writing anything: they fail that operation only.
CLEAN_ERRORS = (ServiceError, TransitionError)


# Checks, first in every write transaction, that this replica still leads (store/leases.py).
Fence = Callable[[AsyncConnection], Awaitable[bool]]


class Fenced(Unavailable):
    """The write transaction found this replica's lease taken by another: nothing was written,
    and this replica writes nothing more."""

    reason = "REPLICA_FENCED"

    def __init__(self) -> None:
        super().__init__(
            "this scheduler replica lost its lease to another replica and stops; retry: the "
            "call reaches the new leader"
        )


def _stopped(batch: list[tuple[Op[Any], asyncio.Future[Any]]]) -> None:
    """The writer stopped with ``batch`` not committed (or not known to be): its callers get
    UNAVAILABLE, which a gRPC caller may retry, rather than a call that never ends."""
    for _, future in batch:
        if not future.done():
            future.set_exception(Unavailable("the scheduler stopped before this write committed"))
            future.exception()  # retrieved: nobody may be waiting any more


class Writer:
    """Runs write operations in batches, one transaction per batch (group commit)."""

    def __init__(self, engine: AsyncEngine, on_commit: CommitHook) -> None:
        self._engine = engine
        self._on_commit = on_commit
        self._queue: asyncio.Queue[tuple[Op[Any], asyncio.Future[Any]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._sync_engine: Engine | None = None
        # One long-lived connection: no pool checkout and reset per batch on the hot path.
        self._conn: WriterConnection | None = None
        # Outbox rows the relay has published; deleted with the next batch (or when idle), so
        # publishing adds no commit of its own.
        self._published: list[str] = []
        self._published_since = 0.0  # when the oldest of them was published (monotonic)
        self.batches = 0
        self.ops = 0
        self.on_final: FinalHook | None = None
        self.on_changes: ChangeHook | None = None
        # Batches the database refused (each is then retried one operation at a time).
        self.failures = 0
        # Scheduler replicas on PostgreSQL: the lease check every transaction opens with, and
        # what to do once it fails (the replica stops).
        self.fence: Fence | None = None
        self.on_fenced: Callable[[], None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="store-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        waiting = []
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        _stopped(waiting)
        if self._published:
            with contextlib.suppress(Exception):
                await self._commit([])
        await self._drop_connection()
        if self._sync_engine is not None:
            self._sync_engine.dispose()

    async def _connect(self) -> WriterConnection:
        url = self._engine.url
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            if self._sync_engine is None:
                self._sync_engine = db.create_sync_engine(url.set(drivername="sqlite"))
            return InlineConnection(self._sync_engine.connect())
        return await self._engine.connect()

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await conn.close()

    def published(self, event_ids: list[str]) -> None:
        """The relay published these outbox rows; they go with a later commit."""
        if not self._published:
            self._published_since = time.monotonic()
        self._published.extend(event_ids)

    def _deletions(self, batch_empty: bool) -> list[str]:
        """The published rows this commit deletes: all of them when idle, when there are
        enough, or when the oldest has waited long enough; else none yet."""
        if not self._published or not (
            batch_empty
            or len(self._published) >= DELETE_CHUNK
            or time.monotonic() - self._published_since >= IDLE_FLUSH
        ):
            return []
        published, self._published = self._published, []
        return published

    def submit(self, op: Op[T]) -> asyncio.Future[T]:
        """Queue ``op``; operations commit in the order they were submitted."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, future))
        return future

    async def run(self, op: Op[T]) -> T:
        return await self.submit(op)

    async def _run(self) -> None:
        while True:
            try:
                batch = [await asyncio.wait_for(self._queue.get(), timeout=IDLE_FLUSH)]
            except TimeoutError:
                batch = []
                if not self._published:
                    continue
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit_or_retry(batch)
            except asyncio.CancelledError:
                _stopped(batch)
                raise

    async def _commit_or_retry(self, batch: list[tuple[Op[Any], asyncio.Future[Any]]]) -> None:
        try:
            await self._commit(batch)
        except Exception as failure:
            self.failures += 1
            if isinstance(failure, Fenced):  # so will every one of them be
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                return
            log.exception("batch of %d failed; retrying one by one", len(batch))
            await self._drop_connection()
            for item in batch:
                try:
                    await self._commit([item])
                except Exception as error:  # the op's own failure, or the database's
                    await self._drop_connection()
                    if not item[1].done():
                        item[1].set_exception(error)

    async def _commit(self, batch: list[tuple[Op[Any], asyncio.Future[Any]]]) -> None:
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        after: list[Callable[[], object]] = []
        if self._conn is None:
            self._conn = await self._connect()
        conn = self._conn
        published = self._deletions(not batch)
        changes: list[RunChange] = []
        try:
            events = await self._transaction(conn, batch, published, outcomes, after, changes)
        except BaseException:
            self._published[:0] = published
            if published:
                self._published_since = 0.0  # overdue: the next commit deletes them
            raise
        self.batches += 1
        self.ops += len(outcomes)
        for future, ok, value in outcomes:
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        for effect in after:
            try:
                effect()
            except Exception:
                log.exception("after-commit effect failed")
        if events:
            self._on_commit(events)
        if changes and self.on_changes is not None:
            try:
                self.on_changes(changes)
            except Exception:
                log.exception("the run-change hook failed")

    async def _transaction(
        self,
        conn: WriterConnection,
        batch: list[tuple[Op[Any], asyncio.Future[Any]]],
        published: list[str],
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]],
        after: list[Callable[[], object]],
        changes: list[RunChange],
    ) -> list[dict[str, Any]]:
        async with conn.begin():
            if isinstance(conn, AsyncConnection) and conn.dialect.name == "postgresql":
                # SQLAlchemy's asyncpg adapter sends BEGIN with its first statement, not at
                # begin(): a statement sent to the driver before it (store/hot.py, the inserts)
                # would commit on its own. One statement through SQLAlchemy opens the
                # transaction for all of them: the lease check when replicas are fenced.
                if self.fence is None:
                    await conn.exec_driver_sql("SELECT 1")
                elif not await self.fence(conn):
                    if self.on_fenced is not None:
                        self.on_fenced()
                    raise Fenced()
            for start in range(0, len(published), 500):
                chunk = published[start : start + 500]
                await conn.execute(delete(db.outbox).where(db.outbox.c.event_id.in_(chunk)))
            work = _Batch(conn, changes=changes)
            events = work.events
            for op, future in batch:
                if future.done():  # caller gone
                    continue
                tx = Tx(work, on_final=self.on_final)
                try:
                    result = await op(tx)
                except CLEAN_ERRORS as error:
                    outcomes.append((future, False, error))
                    continue
                outcomes.append((future, True, result))
                after.extend(tx.after_commit)
            await work.flush()
            if events:
                await insert_rows(conn, db.outbox, events)
        return events
