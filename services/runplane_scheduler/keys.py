"""Key storage and token minting, the scheduler's side of auth: secret and worker keys per
environment (stored hashed; created, listed, revoked and rotated with ``runplane keys``), the
authenticator that resolves a bearer credential to a Principal, the installation's signing key
for public access tokens, and the record of used single-use tokens.

Checking a credential's rights needs no database and lives in :mod:`runplane_common.auth`.
A revoked key, and every public token it minted, is refused within the authenticator's cache
time (2 s).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from runplane_common.auth import (
    ENVIRONMENT_SLUGS,
    RIGHT_API,
    RIGHT_EXECUTE,
    RUN_TOKEN_LIFETIME_MS,
    Principal,
    generate_key,
    hash_key,
    is_public_token,
    key_rights,
    now_ms,
    sign_jwt,
    verify_jwt,
)
from runplane_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from runplane_common.ids import new_id
from runplane_scheduler.store import keys as stored
from runplane_scheduler.store.keys import Database

V = TypeVar("V")


async def create_key(
    engine: Database, slug: str, kind: str = "secret", execute: bool = False, name: str = ""
) -> str:
    """Make a new key of ``kind`` for the environment ``slug``; only its hash is stored.

    A ``secret`` key may trigger, read and manage runs; with ``execute`` it may also connect an
    executor. A ``worker`` key may only connect an executor (WorkerService)."""
    if slug not in ENVIRONMENT_SLUGS:
        raise InvalidArgument(
            "env", f"unknown environment {slug!r}; one of {', '.join(ENVIRONMENT_SLUGS)}"
        )
    rights = key_rights(kind, execute)
    key = generate_key(slug, kind)
    await stored.insert_key(
        engine,
        slug,
        key_id=new_id("key"),
        key_hash=hash_key(key),
        created_at=int(time.time() * 1000),
        rights=",".join(sorted(rights)),
        name=name,
    )
    return key


@dataclass(frozen=True)
class KeyInfo:
    """A key as ``runplane keys ls`` shows it: never the key or its hash."""

    id: str
    environment: str
    rights: frozenset[str]
    name: str
    created_at: int  # ms
    revoked_at: int | None  # ms; in the future while a rotated key's grace lasts

    @property
    def kind(self) -> str:
        return "secret" if RIGHT_API in self.rights else "worker"

    def revoked(self, now_ms: int) -> bool:
        return self.revoked_at is not None and self.revoked_at <= now_ms


def _key_info(row: Any) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        environment=row.slug,
        rights=_rights(row.rights),
        name=row.name,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _rights(text: object) -> frozenset[str]:
    return frozenset(r for r in str(text).split(",") if r)


async def list_keys(engine: Database, slug: str | None = None) -> list[KeyInfo]:
    """Every key (of the environment ``slug``), oldest first."""
    return [_key_info(row) for row in await stored.list_keys(engine, slug)]


async def get_key(engine: Database, key_id: str) -> KeyInfo:
    """The key with id ``key_id``; NOT_FOUND when there is none."""
    row = await stored.get_key(engine, key_id)
    if row is None:
        raise NotFound(f"no key with id {key_id!r} (runplane keys ls lists them)")
    return _key_info(row)


async def revoke_key(engine: Database, key_id: str, at_ms: int | None = None) -> KeyInfo:
    """Revoke the key ``key_id`` now (or at ``at_ms``); every service refuses it within the
    authenticators' cache time. A key already revoked earlier keeps its earlier time."""
    at = now_ms() if at_ms is None else at_ms
    current = await get_key(engine, key_id)
    if current.revoked_at is not None and current.revoked_at <= at:
        return current
    await stored.revoke(engine, key_id, at)
    return await get_key(engine, key_id)


async def rotate_key(engine: Database, key_id: str, grace_ms: int = 0) -> tuple[str, KeyInfo]:
    """A new key with the environment, rights and name of ``key_id``, which is revoked now or
    after ``grace_ms`` (both work meanwhile). Returns the new key and the old key's info; a key
    already revoked cannot be rotated (FAILED_PRECONDITION)."""
    old = await get_key(engine, key_id)
    if old.revoked(now_ms()):
        raise FailedPrecondition(f"key {key_id} is revoked; create a new one instead")
    kind = old.kind
    key = await create_key(
        engine, old.environment, kind, execute=RIGHT_EXECUTE in old.rights, name=old.name
    )
    return key, await revoke_key(engine, key_id, now_ms() + max(0, grace_ms))


class _Recent(Generic[V]):
    """Values read from the database, trusted for ``seconds``; at most 10,000 of them."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._items: dict[str, tuple[float, V]] = {}

    def has(self, key: str) -> bool:
        item = self._items.get(key)
        return item is not None and time.monotonic() - item[0] < self._seconds

    def get(self, key: str) -> V | None:
        """The value, while it is trusted; None otherwise (``has`` tells a stored None)."""
        return self._items[key][1] if self.has(key) else None

    def put(self, key: str, value: V) -> None:
        if len(self._items) >= 10_000:
            self._items.clear()
        self._items[key] = (time.monotonic(), value)


class KeyAuthenticator:
    """Resolves ``authorization: Bearer <secret key or public token>`` to a Principal. Without
    ``tokens`` public tokens are refused.

    What the database says about a key (its environment, rights, revocation time) is cached for
    ``cache_seconds``, so a key revoked (or deleted) stops working on every scheduler within that
    long; a revocation time in the future (a rotated key's grace) is compared with the clock on
    every call. A public token naming the key that minted it (its ``key`` claim) is refused once
    that key is revoked, checked with the same cache."""

    def __init__(
        self, engine: Database, tokens: PublicTokens | None = None, cache_seconds: float = 2.0
    ) -> None:
        self._engine = engine
        self._tokens = tokens
        # By key hash (secret keys) and by key id (the keys public tokens name).
        self._cache: _Recent[tuple[Principal, int | None]] = _Recent(cache_seconds)
        self._by_id: _Recent[int | None] = _Recent(cache_seconds)

    async def __call__(self, token: str) -> Principal:
        if is_public_token(token):
            if self._tokens is None:
                raise Unauthenticated("public access tokens are not accepted here")
            who = await self._tokens.verify(token)
            if who.key_id:
                await self._check_minting_key(who.key_id)
            return who
        digest = hash_key(token)
        cached = self._cache.get(digest)
        if cached is None:
            cached = await self._load(digest)
            self._cache.put(digest, cached)
        found, revoked_at = cached
        if revoked_at is not None and revoked_at <= now_ms():
            raise Unauthenticated("this key has been revoked")
        return found

    async def _load(self, digest: str) -> tuple[Principal, int | None]:
        row = await stored.by_hash(self._engine, digest)
        if row is None:  # not cached: unknown keys would fill the cache
            raise Unauthenticated("unknown secret key")
        found = Principal(
            environment_id=row.id,
            environment_slug=row.slug,
            rights=_rights(row.rights),
            key_id=row.key_id,
        )
        return found, row.revoked_at

    async def _check_minting_key(self, key_id: str) -> None:
        if self._by_id.has(key_id):
            revoked_at = self._by_id.get(key_id)
        else:
            exists, revoked_at = await stored.revoked_at(self._engine, key_id)
            if not exists:
                raise Unauthenticated("public access token: the key that minted it is gone")
            self._by_id.put(key_id, revoked_at)
        if revoked_at is not None and revoked_at <= now_ms():
            raise Unauthenticated("public access token: the key that minted it has been revoked")


class PublicTokens:
    """Mints and verifies public tokens with the installation's signing key.

    The key is ``signing_key`` (RUNPLANE_SIGNING_KEY) when set, else a random key generated once
    and kept in the ``signing_keys`` table, so every scheduler of one database signs alike and
    tokens survive restarts. Only the scheduler needs it: the realtime service passes tokens on
    to the scheduler, which authorises every read."""

    def __init__(self, engine: Database, signing_key: str = "") -> None:
        self._engine = engine
        self._key = signing_key.encode() if signing_key else b""
        self._loading = asyncio.Lock()

    async def _signing_key(self) -> bytes:
        if self._key:
            return self._key
        async with self._loading:  # concurrent first calls load it once
            if not self._key:
                self._key = await self._load_signing_key()
        return self._key

    async def _load_signing_key(self) -> bytes:
        secret = await stored.signing_key(self._engine)
        if secret is None:
            # Another scheduler may store one first: then its key is the one used.
            await stored.insert_signing_key(self._engine, secrets.token_hex(32), now_ms())
            secret = await stored.signing_key(self._engine)
            if secret is None:
                raise RuntimeError("the signing key was not stored")
        return secret.encode()

    async def load(self) -> None:
        """Load (or make) the signing key now rather than on the first call that needs it."""
        await self._signing_key()

    async def mint(
        self, who: Principal, scopes: Iterable[str], expires_at_ms: int, single_use: bool = False
    ) -> str:
        """A token for ``who``'s environment with ``scopes``; a public token cannot mint."""
        if who.is_public:
            raise PermissionDenied("a public access token cannot mint tokens; use a secret key")
        claims = {
            "sub": who.environment_id,
            "env": who.environment_slug,
            "scopes": list(scopes),
            "iat": now_ms() // 1000,
            "exp": expires_at_ms / 1000,
            "jti": new_id("tok"),
        }
        if who.key_id:  # the token dies with the key that minted it
            claims["key"] = who.key_id
        if single_use:
            claims["single_use"] = True
        return sign_jwt(await self._signing_key(), claims)

    async def read_token(self, who: Principal, kind: str, resource_id: str) -> str:
        """A 15-minute token reading one run (``kind="runs"``) or one batch (``"batch"``): what
        a trigger or a batch trigger hands back, minted for the caller's environment."""
        return await self.mint(
            Principal(who.environment_id, who.environment_slug, key_id=who.key_id),
            [f"read:{kind}:{resource_id}"],
            now_ms() + RUN_TOKEN_LIFETIME_MS,
        )

    async def verify(self, token: str) -> Principal:
        claims = verify_jwt(await self._signing_key(), token, now_ms())
        scopes = claims.get("scopes")
        env_id, slug = claims.get("sub"), claims.get("env")
        if not isinstance(scopes, list) or not isinstance(env_id, str) or not isinstance(slug, str):
            raise Unauthenticated("public access token: malformed claims")
        return Principal(
            environment_id=env_id,
            environment_slug=slug,
            scopes=frozenset(str(s) for s in scopes),
            token_id=str(claims.get("jti", "")),
            single_use=bool(claims.get("single_use", False)),
            expires_at=int(float(claims["exp"]) * 1000),
            key_id=str(claims.get("key", "")),
        )


class SingleUse:
    """A single-use token's use (``who.single_use``), recorded in the transaction of what it is
    used for: ``check`` before that writes anything (a refusal leaves the shared transaction
    untouched), ``record`` once it succeeded. So a trigger that fails does not use it up."""

    USED = "this single-use public access token has been used"

    def __init__(self, who: Principal) -> None:
        self.who = who

    async def check(self, tx: Any) -> None:
        if await stored.token_used(tx, self.who.token_id):
            raise Unauthenticated(self.USED)

    async def record(self, tx: Any) -> None:
        await stored.record_token_use(tx, self.who.token_id, now_ms(), self.who.expires_at)
