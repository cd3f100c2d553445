"""Who may call: secret keys per environment (stored hashed), public access tokens (signed,
scoped, expiring JWTs minted from a secret key), and the principal of the current call.

A secret key sees everything in its environment. A public token sees only what its scopes name
(``read:runs:<id>``, ``read:tags:<tag>``, ``read:batch:<id>``, ``trigger:tasks:<id>``,
``write:waitpoints:<id>``) and may call only the read and trigger methods: out of scope is
PERMISSION_DENIED, expired or forged is UNAUTHENTICATED.

This module needs no database: key storage, the authenticator and token minting are the
scheduler's (:mod:`runplane_scheduler.keys`). A public token living longer than 30 days is
refused even when correctly signed.
"""

from __future__ import annotations

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
from typing import Any, TypeVar

from runplane_common.errors import (
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)

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


def now_ms() -> int:
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
