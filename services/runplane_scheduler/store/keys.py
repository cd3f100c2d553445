"""Key queries: API keys (stored hashed) with their environment, the installation's signing
key, and the record of used single-use public tokens."""

from __future__ import annotations

import contextlib
from typing import Any

from sqlalchemy import delete, exc, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from runplane_scheduler.store import tables as db
from runplane_scheduler.store.writer import RunRow

# What the key functions are given: the database (a SQLAlchemy engine, opaque outside the store).
Database = AsyncEngine

k = db.api_keys.c
e = db.environments.c
used = db.used_public_tokens


async def insert_key(
    database: AsyncEngine,
    slug: str,
    *,
    key_id: str,
    key_hash: str,
    created_at: int,
    rights: str,
    name: str,
) -> None:
    """Store a key of the environment ``slug`` (which must exist)."""
    async with database.begin() as conn:
        env_id = (await conn.execute(select(e.id).where(e.slug == slug))).scalar_one()
        await conn.execute(
            insert(db.api_keys).values(
                id=key_id,
                environment_id=env_id,
                key_hash=key_hash,
                created_at=created_at,
                rights=rights,
                name=name,
            )
        )


def _keys_query() -> Any:
    return (
        select(k.id, e.slug, k.rights, k.name, k.created_at, k.revoked_at)
        .select_from(db.api_keys.join(db.environments, e.id == k.environment_id))
        .order_by(k.created_at, k.id)
    )


async def list_keys(database: AsyncEngine, slug: str | None) -> list[RunRow]:
    """Keys (id, slug, rights, name, created_at, revoked_at), oldest first."""
    query = _keys_query()
    if slug is not None:
        query = query.where(e.slug == slug)
    async with database.connect() as conn:
        return list((await conn.execute(query)).all())


async def get_key(database: AsyncEngine, key_id: str) -> RunRow | None:
    async with database.connect() as conn:
        return (await conn.execute(_keys_query().where(k.id == key_id))).first()


async def revoke(database: AsyncEngine, key_id: str, at: int) -> None:
    async with database.begin() as conn:
        await conn.execute(update(db.api_keys).where(k.id == key_id).values(revoked_at=at))


async def by_hash(database: AsyncEngine, digest: str) -> RunRow | None:
    """The key with hash ``digest``: its environment (id, slug), key_id, rights, revoked_at."""
    query: Any = (
        select(e.id, e.slug, k.id.label("key_id"), k.rights, k.revoked_at)
        .select_from(db.api_keys.join(db.environments, e.id == k.environment_id))
        .where(k.key_hash == digest)
    )
    async with database.connect() as conn:
        return (await conn.execute(query)).first()


async def revoked_at(database: AsyncEngine, key_id: str) -> tuple[bool, int | None]:
    """(the key exists, its revocation time)."""
    async with database.connect() as conn:
        row = (await conn.execute(select(k.revoked_at).where(k.id == key_id))).first()
    return (False, None) if row is None else (True, row.revoked_at)


async def signing_key(database: AsyncEngine) -> str | None:
    async with database.begin() as conn:
        row = (
            await conn.execute(
                select(db.signing_keys.c.secret).where(db.signing_keys.c.id == "default")
            )
        ).first()
    return None if row is None else str(row.secret)


async def insert_signing_key(database: AsyncEngine, secret: str, created_at: int) -> None:
    """Store the signing key, unless another scheduler stored one first."""
    with contextlib.suppress(exc.IntegrityError):
        async with database.begin() as conn:
            await conn.execute(
                insert(db.signing_keys).values(id="default", secret=secret, created_at=created_at)
            )


async def token_used(tx: Any, token_id: str) -> bool:
    seen = await tx.execute(select(used.c.token_id).where(used.c.token_id == token_id))
    return seen.first() is not None


async def record_token_use(tx: Any, token_id: str, now: int, expires_at: int) -> None:
    # Records of expired tokens are useless: the signature check refuses them first.
    await tx.execute(delete(used).where(used.c.expires_at < now))
    await tx.execute(insert(used).values(token_id=token_id, used_at=now, expires_at=expires_at))
