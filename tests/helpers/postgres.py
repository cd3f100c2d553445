"""Throwaway PostgreSQL databases, one per test, on the server the tests are pointed at."""

from __future__ import annotations

import os
import uuid

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
CONNECT_TIMEOUT = 5.0

_unreachable: dict[str, str] = {}


def server_url() -> str:
    """The database the tests connect to for creating others: ``$RUNPLANE_TEST_POSTGRES_URL``."""
    return os.environ.get("RUNPLANE_TEST_POSTGRES_URL") or DEFAULT_URL


def _admin_engine(url: str) -> AsyncEngine:
    # CREATE/DROP DATABASE cannot run inside a transaction.
    return create_async_engine(
        url,
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"timeout": CONNECT_TIMEOUT},
    )


async def unreachable_reason(url: str) -> str | None:
    """Why the server at ``url`` cannot be used, or None; asked once per URL per session."""
    if url not in _unreachable:
        engine = _admin_engine(url)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            _unreachable[url] = ""
        except Exception as error:  # any failure to connect or log in
            _unreachable[url] = f"{type(error).__name__}: {error}".splitlines()[0]
        finally:
            await engine.dispose()
    return _unreachable[url] or None


async def create_database(url: str) -> tuple[str, str]:
    """Create an empty, uniquely named database; return its name and its URL."""
    name = f"runplane_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await engine.dispose()
    database_url = make_url(url).set(database=name).render_as_string(hide_password=False)
    return name, database_url


async def drop_database(url: str, name: str) -> None:
    """Drop database ``name``, first ending whatever connections a test left open to it."""
    engine = _admin_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        await engine.dispose()
