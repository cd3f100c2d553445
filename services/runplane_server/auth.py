"""Secret keys per environment, stored hashed, and the principal of the current call."""

from __future__ import annotations

import contextvars
import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from runplane_server import db
from runplane_server.errors import InvalidArgument, Unauthenticated
from runplane_server.ids import new_id

ENVIRONMENT_SLUGS = ("dev", "staging", "prod")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the environment a secret key belongs to."""

    environment_id: str
    environment_slug: str


current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("runplane_principal")


def principal() -> Principal:
    try:
        return current_principal.get()
    except LookupError:
        raise Unauthenticated("no credentials on this call") from None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key(slug: str) -> str:
    return f"rp_{slug}_{secrets.token_urlsafe(32)}"


async def create_key(engine: AsyncEngine, slug: str) -> str:
    """Make a new secret key for the environment ``slug``; only its hash is stored."""
    if slug not in ENVIRONMENT_SLUGS:
        raise InvalidArgument(
            "env", f"unknown environment {slug!r}; one of {', '.join(ENVIRONMENT_SLUGS)}"
        )
    async with engine.begin() as conn:
        env_id = (
            await conn.execute(select(db.environments.c.id).where(db.environments.c.slug == slug))
        ).scalar_one()
        key = generate_key(slug)
        await conn.execute(
            insert(db.api_keys).values(
                id=new_id("key"),
                environment_id=env_id,
                key_hash=hash_key(key),
                created_at=int(time.time() * 1000),
            )
        )
    return key


class KeyAuthenticator:
    """Resolves ``authorization: Bearer <secret key>`` to a Principal, caching hits."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._cache: dict[str, Principal] = {}

    async def __call__(self, token: str) -> Principal:
        digest = hash_key(token)
        found = self._cache.get(digest)
        if found is not None:
            return found
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(db.environments.c.id, db.environments.c.slug)
                    .select_from(
                        db.api_keys.join(
                            db.environments, db.environments.c.id == db.api_keys.c.environment_id
                        )
                    )
                    .where(db.api_keys.c.key_hash == digest)
                )
            ).first()
        if row is None:
            raise Unauthenticated("unknown secret key")
        found = Principal(environment_id=row.id, environment_slug=row.slug)
        self._cache[digest] = found
        return found
