"""Idempotency keys and their scopes (reference §6).

Inside a run, a plain string key is scoped to the run: the same code in a retried attempt
finds the runs the first attempt made, while another run with the same string does not. Scope
``attempt`` adds the attempt number; ``global`` uses the key as given. Outside a run every scope
is global. Scoped keys are the SHA-256 of the key parts joined with ``-`` (64 hex characters).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal

from runplane._context import current_context
from runplane._errors import ConfigurationError
from runplane._namespace import Namespace
from runplane.v1 import run_service_pb2 as rpb

Scope = Literal["run", "attempt", "global"]


class IdempotencyKey(str):
    """A key already scoped by :func:`create`: triggers use it exactly as it is."""

    __slots__ = ()


def create(key: str | Sequence[str], *, scope: Scope = "run") -> IdempotencyKey:
    """The idempotency key for ``key`` (a string or parts) in ``scope``."""
    parts = [key] if isinstance(key, str) else list(key)
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise ConfigurationError("an idempotency key needs one or more non-empty strings")
    if scope not in ("run", "attempt", "global"):
        raise ConfigurationError(f"unknown idempotency key scope {scope!r}")
    ctx = current_context()
    if ctx is None or scope == "global":
        if len(parts) == 1:
            return IdempotencyKey(parts[0])
        suffix: list[str] = []
    elif scope == "run":
        suffix = [ctx.run.id]
    else:
        suffix = [ctx.run.id, str(ctx.attempt.number)]
    return IdempotencyKey(hashlib.sha256("-".join([*parts, *suffix]).encode()).hexdigest())


def resolve(key: str | Sequence[str] | None) -> str:
    """What a trigger sends: scoped keys as they are, plain strings scoped to the run."""
    if key is None or key == "":
        return ""
    if isinstance(key, IdempotencyKey):
        return str(key)
    return str(create(key, scope="run"))


class IdempotencyKeysAPI(Namespace):
    """``idempotency_keys.create`` (pure) and ``idempotency_keys.reset`` (a call)."""

    @staticmethod
    def create(key: str | Sequence[str], *, scope: Scope = "run") -> IdempotencyKey:
        return create(key, scope=scope)

    async def reset(self, task_id: str, key: str | Sequence[str], *, scope: Scope = "run") -> int:
        """Release ``key`` for ``task_id`` (scoped as a trigger here would scope it): the next
        trigger with it makes a new run. Returns how many runs held it."""
        resolved = str(key) if isinstance(key, IdempotencyKey) else str(create(key, scope=scope))
        transport = self._transport
        response = await transport.call(
            transport.run_stub().ResetIdempotencyKey,
            rpb.ResetIdempotencyKeyRequest(task_id=task_id, idempotency_key=resolved),
        )
        return int(response.released)

    def reset_sync(self, task_id: str, key: str | Sequence[str], **kwargs: Any) -> int:
        return self._transport.run_sync(self.reset(task_id, key, **kwargs))


idempotency_keys = IdempotencyKeysAPI(None)
