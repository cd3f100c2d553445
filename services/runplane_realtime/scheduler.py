"""The scheduler as the realtime service sees it: every call made with the subscriber's own
credentials, so the scheduler's authorisation (secret key or public token scopes) is the
subscriber's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, TypeAlias, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate

from runplane.tls import TlsSettings, open_channel
from runplane.v1 import (
    meta_service_pb2,
    meta_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
)
from runplane_common import deadlines, errors

Metadata: TypeAlias = tuple[tuple[str, str], ...]
T = TypeVar("T")

SNAPSHOT_TIMEOUT = 10.0
# Calls to the scheduler in flight at once from this process. When thousands of subscribers
# arrive together (a realtime replica restarts, every client reconnects), their checks queue
# here instead of reaching the scheduler as thousands of concurrent calls.
MAX_CALLS_IN_FLIGHT = 32
LIST_PAGE_SIZE = 100

# The scheduler's refusals, passed on to the subscriber as the same status.
_REFUSALS: dict[grpc.StatusCode, type[errors.ServiceError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
}


def _refusal(error: grpc.aio.AioRpcError, field: str) -> errors.ServiceError:
    message = error.details() or error.code().name
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        # The scheduler names the field in its message ("task_id: ..."); keep it.
        name, _, problem = message.partition(": ")
        return errors.InvalidArgument(name if problem else field, problem or message)
    refusal = _REFUSALS.get(error.code())
    if refusal is not None:
        return refusal(message)
    return errors.Unavailable(f"the scheduler cannot say: {message}")


class NextTrip:
    """Identical reads share trips to the scheduler. A caller joins the next trip to *start*
    for its key, never one already under way (whose answer may predate the question), so what
    it gets is at least as new as its question; at most one trip per key is under way. A
    thousand subscribers to one tag re-listing it then cost a few lists, not a thousand."""

    def __init__(self) -> None:
        self._next: dict[Hashable, tuple[asyncio.Future[Any], Callable[[], Awaitable[Any]]]] = {}
        self._under_way: set[Hashable] = set()
        self._trips: set[asyncio.Task[None]] = set()

    async def call(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        waiting = self._next.get(key)
        if waiting is None:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.add_done_callback(_retrieve)
            waiting = self._next[key] = (future, read)
            if key not in self._under_way:
                self._start(key)
        result: T = await asyncio.shield(waiting[0])
        return result

    def _start(self, key: Hashable) -> None:
        future, read = self._next.pop(key)
        self._under_way.add(key)
        trip = asyncio.get_running_loop().create_task(self._trip(key, future, read))
        self._trips.add(trip)
        trip.add_done_callback(self._trips.discard)

    async def _trip(
        self, key: Hashable, future: asyncio.Future[Any], read: Callable[[], Awaitable[Any]]
    ) -> None:
        # A shared trip is for every caller that joins it, so no one caller's deadline limits it.
        deadlines.set_caller_deadline(None)
        try:
            future.set_result(await read())
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as error:  # every caller of the trip gets its failure
            future.set_exception(error)
        finally:
            self._under_way.discard(key)
            if key in self._next:
                self._start(key)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """A trip nobody waits for any more must not log its failure as unretrieved."""
    if not future.cancelled():
        future.exception()


class Scheduler:
    """The scheduler's RunService and MetaService, called with each caller's credentials."""

    def __init__(self, api_url: str, tls: TlsSettings | None = None) -> None:
        self._channel = open_channel(api_url, tls or TlsSettings())
        self._runs = run_service_pb2_grpc.RunServiceStub(self._channel)
        self._meta = meta_service_pb2_grpc.MetaServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._lists = NextTrip()
        self._in_flight = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)

    async def _call(self, method: Any, request: Any, credentials: Metadata, field: str) -> Any:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the subscriber's trace continues into the scheduler
        async with self._in_flight:
            try:
                return await method(
                    request,
                    metadata=(*credentials, *carrier.items()),
                    timeout=deadlines.inner_timeout(SNAPSHOT_TIMEOUT),
                )
            except grpc.aio.AioRpcError as error:
                raise _refusal(error, field) from None

    async def get_run(self, run_id: str, credentials: Metadata) -> run_pb2.Run:
        """The run as the scheduler has it now; raises the ServiceError matching its status."""
        request = run_service_pb2.GetRunRequest(run_id=run_id)
        reply = await self._call(self._runs.GetRun, request, credentials, "run_id")
        run: run_pb2.Run = reply.run
        return run

    async def get_batch(self, batch_id: str, credentials: Metadata) -> run_service_pb2.Batch:
        """The batch as the scheduler has it; raises the ServiceError matching its status."""
        request = run_service_pb2.GetBatchRequest(batch_id=batch_id)
        reply = await self._call(self._runs.GetBatch, request, credentials, "batch_id")
        batch: run_service_pb2.Batch = reply.batch
        return batch

    async def list_runs(
        self,
        credentials: Metadata,
        *,
        tags: Sequence[str] = (),
        batch_id: str = "",
        created_after_ms: int | None = None,
        first_page_of: int = 0,
    ) -> list[run_pb2.Run]:
        """Every run matching, all pages, oldest first; or only the newest ``first_page_of``
        (an authorisation check). Callers with the same credentials and filter share trips
        (:class:`NextTrip`); the list they get is shared too, and must not be changed."""
        key = (credentials, tuple(tags), batch_id, created_after_ms, first_page_of)
        return await self._lists.call(
            key,
            lambda: self._list_runs(credentials, tags, batch_id, created_after_ms, first_page_of),
        )

    async def _list_runs(
        self,
        credentials: Metadata,
        tags: Sequence[str],
        batch_id: str,
        created_after_ms: int | None,
        first_page_of: int,
    ) -> list[run_pb2.Run]:
        request = run_service_pb2.ListRunsRequest(
            tags=list(tags), batch_id=batch_id, page_size=first_page_of or LIST_PAGE_SIZE
        )
        if created_after_ms is not None:
            request.created_after.FromMilliseconds(created_after_ms)
        found: list[run_pb2.Run] = []
        while True:
            reply = await self._call(self._runs.ListRuns, request, credentials, "tag")
            found.extend(reply.runs)
            if not reply.next_page_token or first_page_of:
                return found[::-1]
            request.page_token = reply.next_page_token

    async def environment_id(self, credentials: Metadata) -> str:
        """The environment the credentials belong to."""
        request = meta_service_pb2.GetServerInfoRequest()
        reply = await self._call(self._meta.GetServerInfo, request, credentials, "authorization")
        env: str = reply.environment_id
        return env

    async def trigger_run(
        self, request: run_service_pb2.TriggerRunRequest, credentials: Metadata
    ) -> run_service_pb2.TriggerRunResponse:
        reply: run_service_pb2.TriggerRunResponse = await self._call(
            self._runs.TriggerRun, request, credentials, "task_id"
        )
        return reply

    async def not_serving(self, timeout: float = 1.0) -> str | None:
        """Why the scheduler cannot be used now (None: it reports SERVING), by its gRPC
        health service; for the readiness probe."""
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            return f"the scheduler is unreachable ({error.code().name})"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return "the scheduler is not serving"
        return None

    async def close(self) -> None:
        await self._channel.close()
