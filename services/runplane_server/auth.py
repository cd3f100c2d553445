"""Who may call: secret keys per environment (stored hashed), public access tokens (signed,
scoped, expiring JWTs minted from a secret key), and the principal of the current call.

A secret key sees everything in its environment. A public token sees only what its scopes name
(``read:runs:<id>``, ``read:tags:<tag>``, ``read:batch:<id>``, ``trigger:tasks:<id>``,
``write:waitpoints:<id>``) and may call only the read and trigger methods: out of scope is
PERMISSION_DENIED, expired or forged is UNAUTHENTICATED.

Keys are listed, revoked and rotated with ``runplane keys`` (:func:`list_keys`,
:func:`revoke_key`, :func:`rotate_key`). A revoked key, and every public token it minted, is
refused within the authenticator's cache time (2 s). A public token living longer than 30 days
is refused even when correctly signed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import delete, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from runplane_server import db
from runplane_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from runplane_server.ids import new_id

ENVIRONMENT_SLUGS = ("dev", "staging", "prod")

V = TypeVar("V")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the environment a secret key or public token belongs to.

    ``scopes`` is None for a secret key (the whole environment) and the token's scopes for a
    public token."""

    environment_id: str
    environment_slug: str
    scopes: frozenset[str] | None = None
    token_id: str = ""
    single_use: bool = False
    expires_at: int = 0  # ms; public tokens only
    # What a secret key may do: RIGHT_API (trigger, read, manage) and RIGHT_EXECUTE (connect to
    # WorkerService as an executor). A public token has RIGHT_API, narrowed by its scopes.
    rights: frozenset[str] = frozenset({"api"})
    # The key's id; for a public token, the id of the key that minted it ("" for older tokens).
    key_id: str = ""

    @property
    def is_public(self) -> bool:
        return self.scopes is not None


current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("runplane_principal")


def principal() -> Principal:
    try:
        return current_principal.get()
    except LookupError:
        raise Unauthenticated("no credentials on this call") from None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


RIGHT_API = "api"
RIGHT_EXECUTE = "execute"
# A key's kind names its rights: a secret key triggers, reads and manages (and executes only
# when made with ``execute=True``); a worker key only connects executors to WorkerService.
KEY_KINDS = ("secret", "worker")


def key_rights(kind: str, execute: bool = False) -> frozenset[str]:
    """The rights of a new key of ``kind``; INVALID_ARGUMENT for an unknown kind."""
    if kind == "worker":
        return frozenset({RIGHT_EXECUTE})
    if kind == "secret":
        return frozenset({RIGHT_API, RIGHT_EXECUTE} if execute else {RIGHT_API})
    raise InvalidArgument("kind", f"unknown key kind {kind!r}; one of {', '.join(KEY_KINDS)}")


def generate_key(slug: str, kind: str = "secret") -> str:
    prefix = "rpw" if kind == "worker" else "rp"
    return f"{prefix}_{slug}_{secrets.token_urlsafe(32)}"


async def create_key(
    engine: AsyncEngine, slug: str, kind: str = "secret", execute: bool = False, name: str = ""
) -> str:
    """Make a new key of ``kind`` for the environment ``slug``; only its hash is stored.

    A ``secret`` key may trigger, read and manage runs; with ``execute`` it may also connect an
    executor. A ``worker`` key may only connect an executor (WorkerService)."""
    if slug not in ENVIRONMENT_SLUGS:
        raise InvalidArgument(
            "env", f"unknown environment {slug!r}; one of {', '.join(ENVIRONMENT_SLUGS)}"
        )
    rights = key_rights(kind, execute)
    async with engine.begin() as conn:
        env_id = (
            await conn.execute(select(db.environments.c.id).where(db.environments.c.slug == slug))
        ).scalar_one()
        key = generate_key(slug, kind)
        await conn.execute(
            insert(db.api_keys).values(
                id=new_id("key"),
                environment_id=env_id,
                key_hash=hash_key(key),
                created_at=int(time.time() * 1000),
                rights=",".join(sorted(rights)),
                name=name,
            )
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


def _keys_query() -> Any:
    k = db.api_keys.c
    return (
        select(k.id, db.environments.c.slug, k.rights, k.name, k.created_at, k.revoked_at)
        .select_from(db.api_keys.join(db.environments, db.environments.c.id == k.environment_id))
        .order_by(k.created_at, k.id)
    )


async def list_keys(engine: AsyncEngine, slug: str | None = None) -> list[KeyInfo]:
    """Every key (of the environment ``slug``), oldest first."""
    query = _keys_query()
    if slug is not None:
        query = query.where(db.environments.c.slug == slug)
    async with engine.connect() as conn:
        return [_key_info(row) for row in await conn.execute(query)]


async def get_key(engine: AsyncEngine, key_id: str) -> KeyInfo:
    """The key with id ``key_id``; NOT_FOUND when there is none."""
    async with engine.connect() as conn:
        row = (await conn.execute(_keys_query().where(db.api_keys.c.id == key_id))).first()
    if row is None:
        raise NotFound(f"no key with id {key_id!r} (runplane keys ls lists them)")
    return _key_info(row)


async def revoke_key(engine: AsyncEngine, key_id: str, at_ms: int | None = None) -> KeyInfo:
    """Revoke the key ``key_id`` now (or at ``at_ms``); every service refuses it within the
    authenticators' cache time. A key already revoked earlier keeps its earlier time."""
    at = _now_ms() if at_ms is None else at_ms
    current = await get_key(engine, key_id)
    if current.revoked_at is not None and current.revoked_at <= at:
        return current
    async with engine.begin() as conn:
        await conn.execute(
            update(db.api_keys).where(db.api_keys.c.id == key_id).values(revoked_at=at)
        )
    return await get_key(engine, key_id)


async def rotate_key(engine: AsyncEngine, key_id: str, grace_ms: int = 0) -> tuple[str, KeyInfo]:
    """A new key with the environment, rights and name of ``key_id``, which is revoked now or
    after ``grace_ms`` (both work meanwhile). Returns the new key and the old key's info; a key
    already revoked cannot be rotated (FAILED_PRECONDITION)."""
    old = await get_key(engine, key_id)
    if old.revoked(_now_ms()):
        raise FailedPrecondition(f"key {key_id} is revoked; create a new one instead")
    kind = old.kind
    key = await create_key(
        engine, old.environment, kind, execute=RIGHT_EXECUTE in old.rights, name=old.name
    )
    return key, await revoke_key(engine, key_id, _now_ms() + max(0, grace_ms))


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
        self, engine: AsyncEngine, tokens: PublicTokens | None = None, cache_seconds: float = 2.0
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
        if revoked_at is not None and revoked_at <= _now_ms():
            raise Unauthenticated("this key has been revoked")
        return found

    async def _load(self, digest: str) -> tuple[Principal, int | None]:
        k = db.api_keys.c
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        db.environments.c.id,
                        db.environments.c.slug,
                        k.id.label("key_id"),
                        k.rights,
                        k.revoked_at,
                    )
                    .select_from(
                        db.api_keys.join(db.environments, db.environments.c.id == k.environment_id)
                    )
                    .where(k.key_hash == digest)
                )
            ).first()
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
            async with self._engine.connect() as conn:
                row = (
                    await conn.execute(
                        select(db.api_keys.c.revoked_at).where(db.api_keys.c.id == key_id)
                    )
                ).first()
            if row is None:
                raise Unauthenticated("public access token: the key that minted it is gone")
            revoked_at = row.revoked_at
            self._by_id.put(key_id, revoked_at)
        if revoked_at is not None and revoked_at <= _now_ms():
            raise Unauthenticated("public access token: the key that minted it has been revoked")


# -- public access tokens ----------------------------------------------------------------------

DEFAULT_TOKEN_LIFETIME_MS = 15 * 60 * 1000
MAX_TOKEN_LIFETIME_MS = 30 * 24 * 3600 * 1000
# ``iat`` is whole seconds, so a 30-day token may read as up to a second longer.
TOKEN_CLOCK_SLACK_MS = 1000
# The lifetime of the token a trigger hands back for reading its run.
RUN_TOKEN_LIFETIME_MS = DEFAULT_TOKEN_LIFETIME_MS
# The resource: 1..256 characters, none of them blank or a control character.
_SCOPE = re.compile(
    r"^(read:(runs|tags|batch)|trigger:tasks|write:waitpoints):[^\s\x00-\x1f\x7f]{1,256}\Z"
)
_HEADER = {"alg": "HS256", "typ": "JWT"}

# The methods a public token may call; its scopes then decide what it sees.
PUBLIC_TOKEN_METHODS = frozenset(
    {
        "/runplane.v1.RunService/GetRun",
        "/runplane.v1.RunService/ListRuns",
        "/runplane.v1.RunService/GetBatch",
        "/runplane.v1.RunService/TriggerRun",
        "/runplane.v1.MetaService/GetServerInfo",
        "/runplane.v1.WaitpointService/CompleteToken",
    }
)


def is_public_token(token: str) -> bool:
    """A JWT (three dot-separated parts); secret keys never contain a dot."""
    return token.count(".") == 2


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_HEAD = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())


def sign_jwt(key: bytes, claims: dict[str, Any]) -> str:
    """An HS256 JWT of ``claims``."""
    head = _HEAD
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    mac = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


def verify_jwt(key: bytes, token: str, now_ms: int) -> dict[str, Any]:
    """The claims of an HS256 JWT signed with ``key`` and not expired; UNAUTHENTICATED else."""
    try:
        head, body, mac = token.split(".")
        expected = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(mac)):
            raise Unauthenticated("public access token: bad signature")
        header = json.loads(_unb64(head))
        claims = json.loads(_unb64(body))
    except (ValueError, binascii.Error):
        raise Unauthenticated("public access token: malformed") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
        raise Unauthenticated("public access token: malformed")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp * 1000 <= now_ms:
        raise Unauthenticated("public access token: expired")
    # A token living longer than any this installation mints is refused even when signed
    # (a leaked signing key must not yield everlasting tokens): its lifetime counts from its
    # ``iat``, or from now when it has none.
    iat = claims.get("iat")
    start = iat * 1000 if isinstance(iat, int | float) and iat * 1000 <= now_ms else now_ms
    if exp * 1000 - start > MAX_TOKEN_LIFETIME_MS + TOKEN_CLOCK_SLACK_MS:
        raise Unauthenticated("public access token: lives longer than the 30-day maximum")
    return claims


def validate_scopes(scopes: Sequence[str]) -> list[str]:
    """The scopes, checked for shape; INVALID_ARGUMENT names the first bad one."""
    if not scopes:
        raise InvalidArgument("scopes", "a public token needs at least one scope")
    for i, scope in enumerate(scopes):
        if not _SCOPE.match(scope):
            raise InvalidArgument(
                f"scopes[{i}]",
                f"{scope!r} is not one of read:runs:<id>, read:tags:<tag>, read:batch:<id>, "
                "trigger:tasks:<id>, write:waitpoints:<id>",
            )
    return list(dict.fromkeys(scopes))


class PublicTokens:
    """Mints and verifies public tokens with the installation's signing key.

    The key is ``signing_key`` (RUNPLANE_SIGNING_KEY) when set, else a random key generated once
    and kept in the ``signing_keys`` table, so every scheduler of one database signs alike and
    tokens survive restarts. Only the scheduler needs it: the realtime service passes tokens on
    to the scheduler, which authorises every read."""

    def __init__(self, engine: AsyncEngine, signing_key: str = "") -> None:
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
        table = db.signing_keys
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(select(table.c.secret).where(table.c.id == "default"))
            ).first()
        if row is None:
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(
                        insert(table).values(
                            id="default", secret=secrets.token_hex(32), created_at=_now_ms()
                        )
                    )
            except sa_exc.IntegrityError:
                pass  # another scheduler made it first: use theirs
            async with self._engine.begin() as conn:
                row = (
                    await conn.execute(select(table.c.secret).where(table.c.id == "default"))
                ).one()
        return str(row.secret).encode()

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
            "iat": _now_ms() // 1000,
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
            _now_ms() + RUN_TOKEN_LIFETIME_MS,
        )

    async def verify(self, token: str) -> Principal:
        claims = verify_jwt(await self._signing_key(), token, _now_ms())
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
        used = db.used_public_tokens
        seen = await tx.execute(select(used.c.token_id).where(used.c.token_id == self.who.token_id))
        if seen.first() is not None:
            raise Unauthenticated(self.USED)

    async def record(self, tx: Any) -> None:
        now = _now_ms()
        used = db.used_public_tokens
        # Records of expired tokens are useless: the signature check refuses them first.
        await tx.execute(delete(used).where(used.c.expires_at < now))
        await tx.execute(
            insert(used).values(
                token_id=self.who.token_id, used_at=now, expires_at=self.who.expires_at
            )
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


# Callable with any credential of the environment.
ANY_KEY_METHODS = frozenset({"/runplane.v1.MetaService/GetServerInfo"})
WORKER_SERVICE = "/runplane.v1.WorkerService/"
# An executor's own admin port: it authenticates only its own credential, which has the execute
# right.
EXECUTOR_SERVICE = "/runplane.v1.ExecutorService/"


def authorize_method(who: Principal, method: str) -> None:
    """A public token may call only the read and trigger methods; WorkerService needs the
    execute right (a worker key), every other service the api right (a secret key)."""
    if who.is_public:
        if method not in PUBLIC_TOKEN_METHODS:
            raise PermissionDenied(f"a public access token cannot call {method}; use a secret key")
        return
    if method in ANY_KEY_METHODS:
        return
    if method.startswith((WORKER_SERVICE, EXECUTOR_SERVICE)):
        if RIGHT_EXECUTE not in who.rights:
            raise PermissionDenied(
                f"this key may not connect an executor ({method}); use a worker key "
                "(runplane keys create --kind worker)"
            )
    elif RIGHT_API not in who.rights:
        raise PermissionDenied(
            f"a worker key may only connect an executor, not call {method}; use a secret key"
        )


def authorize_read(who: Principal, run_id: str, tags: Iterable[str], batch_id: str) -> None:
    """The caller may read this run: a secret key, or a token naming it, a tag of it or its
    batch."""
    if who.scopes is None or f"read:runs:{run_id}" in who.scopes:
        return
    if batch_id and f"read:batch:{batch_id}" in who.scopes:
        return
    if any(f"read:tags:{tag}" in who.scopes for tag in tags):
        return
    raise PermissionDenied(f"this public access token may not read run {run_id}")


def authorize_list(who: Principal, tags: Iterable[str], batch_id: str) -> None:
    """A listing is in scope when one of its filters is: every run it returns then has that tag
    or batch."""
    if who.scopes is None:
        return
    if batch_id and f"read:batch:{batch_id}" in who.scopes:
        return
    if any(f"read:tags:{tag}" in who.scopes for tag in tags):
        return
    raise PermissionDenied(
        "this public access token may list only runs filtered by a tag or batch it may read"
    )


def authorize_batch(who: Principal, batch_id: str) -> None:
    """The caller may read this batch: a secret key, or a token naming it."""
    if who.scopes is not None and f"read:batch:{batch_id}" not in who.scopes:
        raise PermissionDenied(f"this public access token may not read batch {batch_id}")


def authorize_complete_token(who: Principal, token_id: str) -> None:
    if who.scopes is not None and f"write:waitpoints:{token_id}" not in who.scopes:
        raise PermissionDenied(f"this public access token may not complete {token_id}")


# What a browser holding a trigger token may set; anything else could reach other callers'
# runs (idempotency keys, debounce keys, a parent) or lift limits the server sets (priority,
# attempts, machine, queue, concurrency key, max duration).
PUBLIC_TRIGGER_OPTIONS = frozenset({"tags", "metadata", "delay", "delay_until", "ttl"})


def authorize_trigger_options(who: Principal, options: Iterable[str]) -> None:
    """A public token may set only PUBLIC_TRIGGER_OPTIONS (``options``: the set ones' names)."""
    if who.scopes is None:
        return
    refused = sorted(set(options) - PUBLIC_TRIGGER_OPTIONS)
    if refused:
        raise PermissionDenied(
            f"a public access token may not set options.{', options.'.join(refused)}; it may "
            f"set only {', '.join(sorted(PUBLIC_TRIGGER_OPTIONS))} (trigger from a server with "
            "a secret key for the others)"
        )


def authorize_trigger(who: Principal, task_id: str) -> None:
    if who.scopes is not None and f"trigger:tasks:{task_id}" not in who.scopes:
        raise PermissionDenied(f"this public access token may not trigger task {task_id}")
