"""The migrations build exactly the schema that ``store.tables.metadata`` describes."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select
from sqlalchemy.engine import Connection

from runplane_scheduler.store.tables import create_engine, environments, metadata, upgrade


def _schema_diff(connection: Connection) -> list[Any]:
    diff: list[Any] = compare_metadata(MigrationContext.configure(connection), metadata)
    return diff


async def test_migrations_produce_the_metadata_schema(migrated_database_url: str) -> None:
    engine = create_engine(migrated_database_url)
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(_schema_diff)
    finally:
        await engine.dispose()
    assert diff == []


async def test_migrations_seed_the_three_environments_once(migrated_database_url: str) -> None:
    engine = create_engine(migrated_database_url)
    try:
        await upgrade(engine)  # at head already: must change nothing
        async with engine.connect() as conn:
            rows = (await conn.execute(select(environments.c.slug, environments.c.type))).all()
    finally:
        await engine.dispose()
    assert sorted(rows) == [("dev", "DEVELOPMENT"), ("prod", "PRODUCTION"), ("staging", "STAGING")]
