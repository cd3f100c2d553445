"""Database schema (SQLAlchemy Core tables), engine factory and migrations.

Times are integer milliseconds since the epoch: portable across SQLite and PostgreSQL and cheap
to compare. JSON values are stored as text, exactly as the API carries them.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    event,
)
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

metadata = MetaData()

environments = Table(
    "environments",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("slug", String(32), nullable=False, unique=True),
    Column("type", String(16), nullable=False),
    Column("concurrency_limit", Integer, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("environment_id", String(40), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
    # Comma-separated: "api" (trigger, read, manage), "execute" (WorkerService.Connect).
    Column("rights", String(64), nullable=False, server_default="api"),
    Column("name", String(128), nullable=False, server_default=""),
    Column("revoked_at", BigInteger, nullable=True),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("environment_id", String(40), nullable=False),
    Column("task_id", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("payload", Text, nullable=False),
    Column("output", Text),
    Column("error", Text),
    Column("tags", Text, nullable=False),
    Column("metadata", Text, nullable=False),
    Column("queue", String(128), nullable=False),
    Column("idempotency_key", String(2048)),
    Column("concurrency_key", String(256), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("attempt_count", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("is_test", Boolean, nullable=False),
    Column("parent_run_id", String(40)),
    Column("root_run_id", String(40)),
    Column("batch_id", String(40)),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("queued_at", BigInteger),
    Column("started_at", BigInteger),
    Column("finished_at", BigInteger),
    Column("duration_ms", BigInteger, nullable=False),
    Column("traceparent", String(64), nullable=False),
    Column("current_attempt_id", String(40)),
    Column("executor_id", String(40)),
    # When a DELAYED run is queued.
    Column("delay_until", BigInteger),
    # Expire if not started within this long of being queued; NULL: never.
    Column("ttl_ms", BigInteger),
    # Trigger-time overrides of the task's settings; NULL/'': the task's.
    Column("max_duration_ms", BigInteger),
    Column("machine", String(32), nullable=False, server_default=""),
    Column("replayed_from_run_id", String(40)),
    Column("idempotency_key_expires_at", BigInteger),
    Column("depth", Integer, nullable=False, server_default="0"),
    # Triggers with this key collapse into the run while it is DELAYED.
    Column("debounce_key", String(512)),
    # The worker version the run is locked to for life ('' : none yet, any executor may run it).
    Column("worker_version", String(64), nullable=False, server_default=""),
    # Set while a run waits in PENDING_VERSION after leaving WAITING (its waits completed and
    # no executor of its version was connected): 'WAITING', so it resumes rather than restarts.
    Column("parked_from", String(16)),
    # A schedule's run: "schedule id:tick". Unique, so one tick makes one run whatever races
    # (replicas, retries), beyond what its idempotency key (which can expire) promises.
    Column("schedule_tick", String(80)),
    Index("ix_runs_env_id", "environment_id", "id"),
    Index(
        "ux_runs_schedule_tick",
        "schedule_tick",
        unique=True,
        sqlite_where=sqlalchemy.text("schedule_tick IS NOT NULL"),
        postgresql_where=sqlalchemy.text("schedule_tick IS NOT NULL"),
    ),
    Index("ix_runs_status", "status"),
    Index("ix_runs_idempotency", "environment_id", "task_id", "idempotency_key"),
    Index("ix_runs_batch", "batch_id"),
    Index("ix_runs_parent", "parent_run_id"),
    Index("ix_runs_debounce", "environment_id", "task_id", "debounce_key"),
    Index("ix_runs_worker_version", "environment_id", "worker_version", "status"),
)

run_tags = Table(
    "run_tags",
    metadata,
    Column("run_id", String(40), primary_key=True),
    Column("tag", String(128), primary_key=True),
    Column("environment_id", String(40), nullable=False),
    Index("ix_run_tags_env_tag", "environment_id", "tag", "run_id"),
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("run_id", String(40), nullable=False),
    Column("number", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("executor_id", String(40)),
    Column("created_at", BigInteger, nullable=False),
    Column("started_at", BigInteger),
    Column("finished_at", BigInteger),
    Column("error", Text),
    Index("ix_attempts_run", "run_id", "number"),
)

outbox = Table(
    "outbox",
    metadata,
    # Time-sortable and monotonic per scheduler: the relay publishes in id order.
    Column("event_id", String(40), primary_key=True),
    Column("subject", String(256), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("traceparent", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

timers = Table(
    "timers",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("due_at", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("target", String(40), nullable=False),
    Column("data", Text, nullable=False),
    Index("ix_timers_due", "due_at"),
)

task_definitions = Table(
    "task_definitions",
    metadata,
    Column("environment_id", String(40), primary_key=True),
    Column("task_id", String(128), primary_key=True),
    Column("queue", String(128), nullable=False),
    Column("queue_concurrency_limit", Integer, nullable=False),
    # JSON text of the retry policy.
    Column("retry", Text, nullable=False),
    Column("max_duration", BigInteger, nullable=False),
    Column("machine", String(32), nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("ttl_ms", BigInteger, nullable=False, server_default="0"),
    # JSON Schema text of the payload; '' when the task takes any JSON value.
    Column("payload_schema", Text, nullable=False, server_default=""),
    # The worker version these definitions are of: the task's current version.
    Column("version", String(64), nullable=False, server_default=""),
)

# Every worker version an executor registered, with its manifest. A version's definitions never
# change: an executor registering a known version with another manifest is refused.
worker_versions = Table(
    "worker_versions",
    metadata,
    Column("environment_id", String(40), primary_key=True),
    Column("version", String(64), primary_key=True),
    # JSON: the manifest's tasks (definitions and declarative schedules).
    Column("manifest", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # Last made current (NULL: never); a rollback marks the version it undoes.
    Column("promoted_at", BigInteger),
    Column("rolled_back", Boolean, nullable=False, server_default=sqlalchemy.false()),
)


queues = Table(
    "queues",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("environment_id", String(40), nullable=False),
    Column("name", String(128), nullable=False),
    # The limit the code declares (0: bounded by the environment only).
    Column("concurrency_limit", Integer, nullable=False),
    # Set by QueueService.OverrideConcurrencyLimit until reset.
    Column("limit_override", Integer),
    Column("overridden_at", BigInteger),
    Column("paused", Boolean, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Index("ux_queues_env_name", "environment_id", "name", unique=True),
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("environment_id", String(40), nullable=False),
    Column("run_count", Integer, nullable=False),
    Column("idempotency_key", String(2048)),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_batches_env_idempotency", "environment_id", "idempotency_key"),
)


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine; SQLite files get WAL, NORMAL sync and a busy timeout.

    A new SQLite file (and the directory made for it) is readable by its owner only: it holds
    the signing key of public tokens. SQLite gives its -wal and -shm files the file's mode."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1].split("?", 1)[0] if "///" in url else ""
        if path and path != ":memory:" and not path.startswith("file:"):
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("pool_pre_ping", True)
    if "asyncpg" in url:
        # A transaction left open by a process that froze (paused, cut off) is ended by the
        # server, so it cannot hold the replicas' lease row, and a takeover, for ever.
        settings = {"idle_in_transaction_session_timeout": "15000"}
        kwargs.setdefault("connect_args", {}).setdefault("server_settings", settings)
    return create_async_engine(url, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def create_sync_engine(url: URL) -> Engine:
    """A synchronous SQLite engine with the same settings (the scheduler's writer uses it)."""
    engine = sqlalchemy.create_engine(url)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _alembic_upgrade(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


async def upgrade(engine: AsyncEngine) -> None:
    """Apply every pending migration (``runplane db upgrade``)."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Replicas starting together: one migrates, the others wait and find it done.
            await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7070707070)")
        await conn.run_sync(_alembic_upgrade)


def upgrade_url(url: str) -> None:
    async def run() -> None:
        engine = create_engine(url)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())


# -- run logs -----------------------------------------------------------------------------------

# Log lines (and finished user spans) of attempts, as executors send them; read oldest first.
run_logs = Table(
    "run_logs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("environment_id", String(40), nullable=False),
    Column("run_id", String(40), nullable=False),
    Column("attempt_id", String(40), nullable=False),
    Column("attempt_number", Integer, nullable=False),
    Column("level", String(16), nullable=False),
    Column("message", Text, nullable=False),
    # JSON text of the attributes object.
    Column("attributes", Text, nullable=False),
    Column("time", BigInteger, nullable=False),
    Column("trace_id", String(32), nullable=False),
    Column("span_id", String(16), nullable=False),
    Index("ix_run_logs_run", "environment_id", "run_id", "id"),
)


# -- schedules (cron) -----------------------------------------------------------------------------

schedules = Table(
    "schedules",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("environment_id", String(40), nullable=False),
    # DECLARATIVE (from a task's code) or IMPERATIVE (from the API).
    Column("type", String(16), nullable=False),
    Column("task_id", String(128), nullable=False),
    Column("cron", String(256), nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("external_id", String(256)),
    # NULL for declarative schedules (one per task) and imperative ones created without a key.
    Column("deduplication_key", String(256)),
    Column("active", Boolean, nullable=False),
    # Nominal times on the schedule clock: the next tick to fire, the last one that fired.
    Column("next_run_at", BigInteger),
    Column("last_run_at", BigInteger),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Index("ix_schedules_env_id", "environment_id", "id"),
    Index("ux_schedules_dedup", "environment_id", "deduplication_key", unique=True),
    Index("ix_schedules_env_task", "environment_id", "task_id"),
)


# -- waitpoints (issue 4: durable waits and child runs) ----------------------------------------

waitpoints = Table(
    "waitpoints",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("environment_id", String(40), nullable=False),
    # DURATION | TOKEN | BATCH (trigger_and_wait is a batch of one).
    Column("kind", String(16), nullable=False),
    # PENDING | COMPLETED
    Column("status", String(16), nullable=False),
    # The waiting run, its attempt number and the wait's sequence number in that attempt:
    # unique, so this row is the journal entry a replay (same attempt number) reads back; a
    # retry (next number) starts a fresh journal. NULL for a token itself (runs wait on it
    # through rows of their own whose target is the token).
    Column("run_id", String(40)),
    Column("attempt", Integer),
    Column("seq", Integer),
    # The token, or the batch of child runs, this wait is on.
    Column("target", String(40)),
    Column("ok", Boolean),
    # JSON text: the token's data, the child runs' results, or null.
    Column("output", Text),
    # JSON text {type, message, stack_trace} when not ok.
    Column("error", Text),
    Column("due_at", BigInteger),  # a duration's end, a token's timeout
    Column("idempotency_key", String(2048)),
    Column("idempotency_key_expires_at", BigInteger),
    Column("tags", Text, nullable=False),
    # Completing the token by plain HTTP needs this secret in its URL.
    Column("secret", String(64)),
    Column("created_at", BigInteger, nullable=False),
    Column("completed_at", BigInteger),
    Index("ux_waitpoints_run_seq", "run_id", "attempt", "seq", unique=True),
    Index("ix_waitpoints_target", "target"),
    Index("ix_waitpoints_env_key", "environment_id", "idempotency_key"),
)

# The child runs a BATCH waitpoint waits for, in item order (an item may be an existing run
# found by its idempotency key, outside the batch).
waitpoint_children = Table(
    "waitpoint_children",
    metadata,
    Column("waitpoint_id", String(40), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("run_id", String(40), nullable=False),
    Index("ix_waitpoint_children_run", "run_id"),
)


# -- access: public access tokens (realtime) ---------------------------------------------------

signing_keys = Table(
    "signing_keys",
    metadata,
    # "default": the installation's key for public access tokens (unless RUNPLANE_SIGNING_KEY).
    Column("id", String(40), primary_key=True),
    Column("secret", String(128), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

used_public_tokens = Table(
    "used_public_tokens",
    metadata,
    # The jti of a single-use token that has been used; kept until it expires.
    Column("token_id", String(40), primary_key=True),
    Column("used_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
)


# -- scheduler replicas -----------------------------------------------------------------------

# The lease the leading replica holds (name "scheduler"). Every write transaction of the leader
# checks it (store/leases.py): a replica that lost it cannot commit over the one that took it.
scheduler_leases = Table(
    "scheduler_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    # The fencing token: one more at every change of holder.
    Column("token", BigInteger, nullable=False),
    # Epoch seconds on the database's clock: replicas never compare their own clocks.
    Column("expires_at", Float, nullable=False),
    # Where the other replicas forward calls while this one leads.
    Column("grpc_address", String(256), nullable=False),
    Column("http_address", String(256), nullable=False),
)
