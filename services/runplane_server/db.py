"""Database schema (SQLAlchemy Core tables), engine factory and migrations.

Times are integer milliseconds since the epoch: portable across SQLite and PostgreSQL and cheap
to compare. JSON values are stored as text, exactly as the API carries them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
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
    Index("ix_runs_env_id", "environment_id", "id"),
    Index("ix_runs_status", "status"),
    Index("ix_runs_idempotency", "environment_id", "task_id", "idempotency_key"),
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
)


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine; SQLite files get WAL, NORMAL sync and a busy timeout."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("pool_pre_ping", True)
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
        await conn.run_sync(_alembic_upgrade)


def upgrade_url(url: str) -> None:
    async def run() -> None:
        engine = create_engine(url)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())


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
