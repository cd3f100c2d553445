"""``wait``: durable waits inside a run (durations, dates, tokens) and the child-run waits behind
``trigger_and_wait``; tokens are created, completed and read from anywhere.

Inside a run every wait and every child trigger takes the next sequence number of the attempt
and goes to the executor (a "waiter" the executor puts in ``ctx.extra``); the scheduler journals
its result under that number. A run replayed after its executor was lost runs again from the top
and gets journaled results back at once, so code between waits may run more than once (like a
retry) while completed waits and child triggers are not repeated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from runplane import _durations
from runplane._context import current_context
from runplane._errors import ConfigurationError, TaskRunError, WaitpointTimeoutError
from runplane._idempotency import resolve
from runplane._models import _dt
from runplane._namespace import Namespace
from runplane._serde import dumps, loads
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import waitpoint_service_pb2 as wspb
from runplane.v1 import waitpoint_service_pb2_grpc

T = TypeVar("T")

WAITER = "runplane.waiter"  # key of the attempt's waiter in ctx.extra


class Waiter(Protocol):
    """The executor's side of the waits of one attempt."""

    async def wait(self, request: dict[str, Any]) -> tuple[bool, str, dict[str, str] | None]:
        """Block on ``request``; returns (ok, output JSON text, error dict)."""
        ...


@dataclass(frozen=True)
class Result(Generic[T]):
    """The outcome of a wait or child run: ``ok`` with ``output``, or ``error``."""

    ok: bool
    output: T | None = None
    error: Exception | None = None
    id: str = ""  # the child run's id, for child-run results

    def unwrap(self) -> T:
        """The output, or raise the error (TaskRunError for a failed child run)."""
        if not self.ok:
            raise self.error or TaskRunError("", "failed")
        return self.output  # type: ignore[return-value]


@dataclass(frozen=True)
class WaitToken:
    """A wait token: complete it with :func:`wait.complete_token` or by POSTing JSON to
    ``url`` (the URL carries its own secret; no SDK or key needed)."""

    id: str
    url: str
    status: str = "WAITING"  # WAITING | COMPLETED | TIMED_OUT
    idempotency_key: str | None = None
    tags: list[str] = field(default_factory=list)
    timeout_at: datetime | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None
    output: Any = None
    is_cached: bool = False
    # Completes this token only (``Client(secret_key=token.public_access_token)``); set on create.
    public_access_token: str = field(default="", repr=False)

    @classmethod
    def from_pb(
        cls, pb: wspb.WaitToken, is_cached: bool = False, public_access_token: str = ""
    ) -> WaitToken:
        return cls(
            id=pb.id,
            url=pb.url,
            status=wspb.WaitpointStatus.Name(pb.status).removeprefix("WAITPOINT_STATUS_"),
            idempotency_key=pb.idempotency_key or None,
            tags=list(pb.tags),
            timeout_at=_dt(pb.timeout_at, pb.HasField("timeout_at")),
            created_at=_dt(pb.created_at, pb.HasField("created_at")),
            completed_at=_dt(pb.completed_at, pb.HasField("completed_at")),
            output=loads(pb.output) if pb.output else None,
            is_cached=is_cached,
            public_access_token=public_access_token,
        )


def _waiter(what: str) -> Waiter:
    ctx = current_context()
    waiter = ctx.extra.get(WAITER) if ctx is not None else None
    if waiter is None:
        raise ConfigurationError(f"{what} can only be called inside a task run (async tasks)")
    return waiter  # type: ignore[no-any-return]


def _error(error: dict[str, str] | None) -> Exception:
    e = error or {}
    if e.get("type") == "WaitpointTimeoutError":
        return WaitpointTimeoutError(e.get("message", "the wait token timed out"))
    return TaskRunError(e.get("type", ""), e.get("message", ""), e.get("stack_trace", ""))


async def _wait(what: str, request: dict[str, Any]) -> tuple[bool, Any, dict[str, str] | None]:
    ok, output, error = await _waiter(what).wait(request)
    return ok, loads(output) if output else None, error


def _keyed(
    request: dict[str, Any],
    key: str | Sequence[str] | None,
    ttl: _durations.DurationLike | None,
) -> dict[str, Any]:
    if key:
        request["idempotency_key"] = resolve(key)
        if ttl is not None:
            request["idempotency_key_ttl_ms"] = round(_durations.seconds(ttl) * 1000)
    return request


async def wait_for_children(what: str, items: list[rpb.BatchTriggerItem]) -> list[Result[Any]]:
    """Trigger child runs and wait until every one has finished; results in item order."""
    ok, output, error = await _wait(
        what, {"children": [item.SerializeToString() for item in items]}
    )
    if not ok:
        raise _error(error)
    return [
        Result(ok=True, output=r["output"], id=r["id"])
        if r["ok"]
        else Result(ok=False, error=_error(r["error"]), id=r["id"])
        for r in output
    ]


class WaitAPI(Namespace):
    """``wait.for_``, ``wait.until`` and the token calls."""

    async def for_(
        self,
        *,
        seconds: float = 0,
        minutes: float = 0,
        hours: float = 0,
        days: float = 0,
        idempotency_key: str | Sequence[str] | None = None,
        idempotency_key_ttl: _durations.DurationLike | None = None,
    ) -> None:
        """Block the run this long. It is WAITING meanwhile and holds no concurrency slot.
        With an idempotency key (scoped to the run unless made with ``idempotency_keys.create``)
        a later wait with the same key, e.g. in a retry, ends when the first one does."""
        total = timedelta(seconds=seconds, minutes=minutes, hours=hours, days=days)
        if total < timedelta(0):
            raise ConfigurationError("wait.for_: the duration must not be negative")
        request = {"duration_ms": round(total.total_seconds() * 1000)}
        await _wait("wait.for_", _keyed(request, idempotency_key, idempotency_key_ttl))

    async def until(
        self,
        date: datetime,
        *,
        throw_if_in_the_past: bool = False,
        idempotency_key: str | Sequence[str] | None = None,
        idempotency_key_ttl: _durations.DurationLike | None = None,
    ) -> None:
        """Block the run until ``date`` (timezone-aware, or UTC when naive)."""
        if date.tzinfo is None:
            date = date.replace(tzinfo=UTC)
        if throw_if_in_the_past and date < datetime.now(UTC):
            raise ConfigurationError(f"wait.until: {date.isoformat()} is in the past")
        request = {"until_ms": int(date.timestamp() * 1000)}
        await _wait("wait.until", _keyed(request, idempotency_key, idempotency_key_ttl))

    async def create_token(
        self,
        *,
        timeout: _durations.DurationLike | None = None,
        idempotency_key: str | None = None,
        idempotency_key_ttl: _durations.DurationLike | None = None,
        tags: Sequence[str] | str | None = None,
    ) -> WaitToken:
        """A token a run can wait on with :meth:`for_token`; callable anywhere."""
        request = wspb.CreateTokenRequest(
            idempotency_key=idempotency_key or "",
            tags=[tags] if isinstance(tags, str) else list(tags or []),
        )
        if timeout is not None:
            request.timeout.CopyFrom(_durations.to_pb(timeout, "timeout"))
        if idempotency_key_ttl is not None:
            request.idempotency_key_ttl.CopyFrom(
                _durations.to_pb(idempotency_key_ttl, "idempotency_key_ttl")
            )
        response = await self._call("CreateToken", request)
        return WaitToken.from_pb(response.token, response.is_cached, response.public_access_token)

    async def for_token(self, token: WaitToken | str) -> Result[Any]:
        """Block the run until the token is completed (ok, with its data) or times out
        (``ok=False``, error :class:`WaitpointTimeoutError`)."""
        token_id = token.id if isinstance(token, WaitToken) else token
        ok, output, error = await _wait("wait.for_token", {"token_id": token_id})
        return Result(ok=True, output=output) if ok else Result(ok=False, error=_error(error))

    async def complete_token(self, token: WaitToken | str, data: Any = None) -> WaitToken:
        """Complete the token with ``data``; the runs waiting on it resume."""
        token_id = token.id if isinstance(token, WaitToken) else token
        response = await self._call(
            "CompleteToken", wspb.CompleteTokenRequest(token_id=token_id, data=dumps(data))
        )
        return WaitToken.from_pb(response.token)

    async def retrieve_token(self, token: WaitToken | str) -> WaitToken:
        token_id = token.id if isinstance(token, WaitToken) else token
        response = await self._call("GetToken", wspb.GetTokenRequest(token_id=token_id))
        return WaitToken.from_pb(response.token)

    async def list_tokens(
        self,
        *,
        status: Sequence[str] | str | None = None,
        tags: Sequence[str] | str | None = None,
        idempotency_key: str | None = None,
        limit: int = 100,
    ) -> list[WaitToken]:
        """Tokens newest first, filtered by status (WAITING, COMPLETED, TIMED_OUT), any of
        ``tags`` and the idempotency key."""
        statuses = [status] if isinstance(status, str) else list(status or [])
        request = wspb.ListTokensRequest(
            statuses=[wspb.WaitpointStatus.Value(f"WAITPOINT_STATUS_{s}") for s in statuses],
            tags=[tags] if isinstance(tags, str) else list(tags or []),
            idempotency_key=idempotency_key or "",
            page_size=limit,
        )
        response = await self._call("ListTokens", request)
        return [WaitToken.from_pb(t) for t in response.tokens]

    def create_token_sync(self, **kwargs: Any) -> WaitToken:
        return self._transport.run_sync(self.create_token(**kwargs))

    def complete_token_sync(self, token: WaitToken | str, data: Any = None) -> WaitToken:
        return self._transport.run_sync(self.complete_token(token, data))

    def retrieve_token_sync(self, token: WaitToken | str) -> WaitToken:
        return self._transport.run_sync(self.retrieve_token(token))

    def list_tokens_sync(self, **kwargs: Any) -> list[WaitToken]:
        return self._transport.run_sync(self.list_tokens(**kwargs))

    async def _call(self, method: str, request: Any) -> Any:
        transport = self._transport
        stub = waitpoint_service_pb2_grpc.WaitpointServiceStub(transport.channel())
        return await transport.call(getattr(stub, method), request)


wait = WaitAPI(None)
