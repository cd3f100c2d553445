"""RealtimeService: runs' versions in order and run streams, over gRPC and (see ``http.py``) SSE.

The service keeps no database and no credentials: every call forwards the caller's
``authorization`` to the scheduler (``GetRun``, ``ListRuns``, ``GetServerInfo``), and the
scheduler's refusal is the caller's. That is also how public access tokens are checked: the
scheduler holds the signing key and knows each token's scopes. See ``subscriptions.py`` for how
a subscription stays complete and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from runplane.v1 import realtime_service_pb2, realtime_service_pb2_grpc, run_pb2
from runplane_common import errors, subjects, telemetry
from runplane_common.auth import is_public_token
from runplane_common.config import RealtimeSettings
from runplane_common.grpcserver import Server, bearer_token
from runplane_realtime.events import NatsLink, RunEvents
from runplane_realtime.feed import Feed, token_expiry_ms
from runplane_realtime.scheduler import Metadata, Scheduler
from runplane_realtime.streams import Chunk, RunStreams, stream_id
from runplane_realtime.subscriptions import (
    RunSet,
    RunSetSubscription,
    RunSubscription,
    is_final,
)

log = logging.getLogger("runplane.realtime")

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")

SERVICE_NAME = "runplane.v1.RealtimeService"

# A tag subscription covers runs created this long ago at most (RUN_EVENTS keeps 7 days).
DEFAULT_TAG_WINDOW_MS = 24 * 3600 * 1000
MAX_TAG_WINDOW_MS = 7 * 24 * 3600 * 1000
# An AppendStream caller's right to write a run's stream is checked with the scheduler at most
# this often: about as often as the scheduler re-reads a key, so a revoked key stops writing
# within seconds.
WRITE_GRANT_TTL = 2.0


class Realtime:
    """What the gRPC servicer and the HTTP endpoints share: authorisation, then an iterator.

    Each ``open_*`` method checks the caller's rights (and raises the ServiceError to answer)
    before returning the iterator, so a refused caller gets a status, never a stream."""

    def __init__(self, settings: RealtimeSettings, link: NatsLink, scheduler: Scheduler) -> None:
        self.settings = settings
        self.link = link
        self.scheduler = scheduler
        self.streams = RunStreams(link, settings)
        # The subscribers' feeds that still read events (for tests and introspection).
        self.feeds: set[Feed[Any]] = set()
        self._write_grants: dict[tuple[str, str], tuple[float, str]] = {}

    async def open_run(
        self, credentials: Metadata, run_id: str, after_version: int, keep_open: bool
    ) -> Feed[run_pb2.Run]:
        if not run_id:
            raise errors.InvalidArgument("run_id", "must not be empty")
        if after_version < 0:
            raise errors.InvalidArgument("after_version", "must not be negative")
        # The authorisation check; the snapshot also names the run's environment, and so its
        # exact subject.
        current = await self.scheduler.get_run(run_id, credentials)
        subscription = RunSubscription(
            self.scheduler,
            self.link,
            RunEvents(self.link, subjects.run_event(current.environment_id, current.id)),
            credentials,
            run_id,
            after_version,
            self.settings.reconcile_interval,
        )
        has_final = is_final(current) and current.version <= after_version
        runs = _empty() if has_final and not keep_open else subscription.runs(keep_open)

        def resume(last: run_pb2.Run | None) -> dict[str, str]:
            return {"after_version": str(last.version if last is not None else after_version)}

        return self._feed(credentials, runs, _run_size, resume)

    def _feed(
        self,
        credentials: Metadata,
        source: AsyncGenerator[T, None],
        size: Callable[[T], int],
        resume: Callable[[T | None], dict[str, str]],
    ) -> Feed[T]:
        """The subscriber's bounded buffer over ``source``, ending when its token expires."""
        buffer, expires_at_ms = self.settings.subscriber_buffer, token_expiry_ms(credentials)
        feed = Feed(source, buffer, size, resume, expires_at_ms)
        self.feeds.add(feed)
        feed.when_stopped(lambda: self.feeds.discard(feed))
        return feed

    async def open_tag(
        self,
        credentials: Metadata,
        tag: str,
        created_after_ms: int | None,
        after_versions: Mapping[str, int],
        resume_cursor: int = 0,
    ) -> Feed[tuple[run_pb2.Run, int]]:
        if not tag:
            raise errors.InvalidArgument("tag", "must not be empty")
        now = int(time.time() * 1000)
        if created_after_ms is None:
            created_after_ms = now - DEFAULT_TAG_WINDOW_MS
        if created_after_ms < now - MAX_TAG_WINDOW_MS:
            raise errors.InvalidArgument("created_after", "at most 7 days back")
        return await self._open_set(
            credentials,
            RunSet.with_tag(tag, created_after_ms),
            after_versions,
            resume_cursor,
            "tag",
        )

    async def open_batch(
        self,
        credentials: Metadata,
        batch_id: str,
        after_versions: Mapping[str, int],
        resume_cursor: int = 0,
    ) -> Feed[tuple[run_pb2.Run, int]]:
        if not batch_id:
            raise errors.InvalidArgument("batch_id", "must not be empty")
        _check_resume(after_versions, resume_cursor)
        # A batch that is not the caller's (or no batch at all) is NOT_FOUND, as for GetBatch,
        # not a subscription that never sends anything.
        await self.scheduler.get_batch(batch_id, credentials)
        return await self._open_set(
            credentials, RunSet.of_batch(batch_id), after_versions, resume_cursor, "batch_id"
        )

    async def _open_set(
        self,
        credentials: Metadata,
        runs: RunSet,
        after_versions: Mapping[str, int],
        resume_cursor: int,
        field: str,
    ) -> Feed[tuple[run_pb2.Run, int]]:
        """``field`` names the request's tag or batch, which the scheduler checks as a filter."""
        _check_resume(after_versions, resume_cursor)
        environment_id = await self.scheduler.environment_id(credentials)
        # The authorisation check: a public token must be allowed the tag or batch.
        try:
            await self.scheduler.list_runs(
                credentials, tags=runs.tags, batch_id=runs.batch_id, first_page_of=1
            )
        except errors.InvalidArgument as error:  # it names its own field (tags[0])
            raise errors.InvalidArgument(field, error.problem) from None
        subscription = RunSetSubscription(
            self.scheduler,
            self.link,
            credentials,
            environment_id,
            runs,
            dict(after_versions),
            self.settings.reconcile_interval,
            resume_cursor,
        )

        def resume(last: tuple[run_pb2.Run, int] | None) -> dict[str, str]:
            # The SDK also sends the versions it has; an SSE client its Last-Event-ID.
            cursor = last[1] if last is not None and last[1] else resume_cursor
            return {"resume_cursor": str(cursor)}

        return self._feed(credentials, subscription.runs(), _set_size, resume)

    async def open_stream(
        self, credentials: Metadata, run_id: str, sid: str, after_index: int
    ) -> Feed[Chunk]:
        if not run_id:
            raise errors.InvalidArgument("run_id", "must not be empty")
        stream_id(sid)
        if after_index < 0:
            raise errors.InvalidArgument("after_index", "must not be negative")
        run = await self.scheduler.get_run(run_id, credentials)

        async def run_is_final() -> bool:
            try:
                return is_final(await self.scheduler.get_run(run_id, credentials))
            except errors.Unavailable:
                return False

        chunks = self.streams.read(run.environment_id, run.id, sid, after_index, run_is_final)

        def resume(last: Chunk | None) -> dict[str, str]:
            return {"after_index": str(last.index if last is not None else after_index)}

        return self._feed(credentials, chunks, _chunk_size, resume)

    async def append(
        self,
        credentials: Metadata,
        run_id: str,
        sid: str,
        chunks: list[str],
        close: bool,
        chunk_ids: list[str],
    ) -> int:
        if not run_id:
            raise errors.InvalidArgument("run_id", "must not be empty")
        stream_id(sid)
        token = bearer_token(credentials)
        if is_public_token(token):
            raise errors.PermissionDenied("writing a stream needs a secret key")
        environment_id = await self._write_grant(credentials, token, run_id)
        return await self.streams.append(environment_id, run_id, sid, chunks, close, chunk_ids)

    async def _write_grant(self, credentials: Metadata, token: str, run_id: str) -> str:
        """The run's environment if the secret key may write to it (cached briefly)."""
        key = (token, run_id)
        now = time.monotonic()
        grant = self._write_grants.get(key)
        if grant is not None and grant[0] > now:
            return grant[1]
        run = await self.scheduler.get_run(run_id, credentials)
        if len(self._write_grants) > 10_000:
            self._write_grants.clear()
        self._write_grants[key] = (now + WRITE_GRANT_TTL, run.environment_id)
        return run.environment_id


def _check_resume(after_versions: Mapping[str, int], resume_cursor: int) -> None:
    if resume_cursor < 0:
        raise errors.InvalidArgument("resume_cursor", "must not be negative")
    for run_id, version in after_versions.items():
        if version < 0:
            raise errors.InvalidArgument(f"after_versions[{run_id[:80]}]", "must not be negative")


def _run_size(run: run_pb2.Run) -> int:
    return int(run.ByteSize())


def _set_size(item: tuple[run_pb2.Run, int]) -> int:
    return int(item[0].ByteSize())


def _chunk_size(chunk: Chunk) -> int:
    return len(chunk.data)


async def _empty() -> AsyncGenerator[run_pb2.Run, None]:
    return
    yield  # an async generator that yields nothing


class RealtimeServicer(realtime_service_pb2_grpc.RealtimeServiceServicer):
    """``runplane.v1.RealtimeService``: authorised by the scheduler, fed by JetStream."""

    def __init__(self, realtime: Realtime) -> None:
        self.realtime = realtime
        # The tasks serving open subscriptions: gRPC's stop cancels them without waiting, and
        # they must be gone before the NATS connection and the scheduler channel close.
        self.serving: set[asyncio.Task[Any]] = set()

    async def close(self, timeout: float = 5.0) -> None:
        """End every open subscription and wait for each to remove its consumer."""
        tasks = [task for task in self.serving if not task.done()]
        for task in tasks:
            # A task gRPC already cancelled is cleaning up; cancelling it again would cut that
            # short and leave its consumer behind.
            if not task.cancelling():
                task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    @contextlib.asynccontextmanager
    async def tracked(self) -> AsyncIterator[None]:
        task = asyncio.current_task()
        assert task is not None  # gRPC and aiohttp serve each call in a task
        self.serving.add(task)
        try:
            yield
        finally:
            self.serving.discard(task)

    async def SubscribeToRun(
        self, request: realtime_service_pb2.SubscribeToRunRequest, context: Context
    ) -> AsyncIterator[realtime_service_pb2.SubscribeToRunResponse]:
        async with self.tracked():
            runs = await self.realtime.open_run(
                _credentials(context), request.run_id, request.after_version, request.keep_open
            )
            # aclosing: the consumer is removed as soon as this stream ends, however it ends.
            async with contextlib.aclosing(runs):
                async for run in runs:
                    yield realtime_service_pb2.SubscribeToRunResponse(run=run)

    async def SubscribeToRunsWithTag(
        self, request: realtime_service_pb2.SubscribeToRunsWithTagRequest, context: Context
    ) -> AsyncIterator[realtime_service_pb2.SubscribeToRunsWithTagResponse]:
        async with self.tracked():
            after = (
                _timestamp_ms("created_after", request.created_after)
                if request.HasField("created_after")
                else None
            )
            runs = await self.realtime.open_tag(
                _credentials(context),
                request.tag,
                after,
                request.after_versions,
                request.resume_cursor,
            )
            async with contextlib.aclosing(runs):
                async for run, cursor in runs:
                    yield realtime_service_pb2.SubscribeToRunsWithTagResponse(
                        run=run, cursor=cursor
                    )

    async def SubscribeToBatch(
        self, request: realtime_service_pb2.SubscribeToBatchRequest, context: Context
    ) -> AsyncIterator[realtime_service_pb2.SubscribeToBatchResponse]:
        async with self.tracked():
            runs = await self.realtime.open_batch(
                _credentials(context),
                request.batch_id,
                request.after_versions,
                request.resume_cursor,
            )
            async with contextlib.aclosing(runs):
                async for run, cursor in runs:
                    yield realtime_service_pb2.SubscribeToBatchResponse(run=run, cursor=cursor)

    async def ReadStream(
        self, request: realtime_service_pb2.ReadStreamRequest, context: Context
    ) -> AsyncIterator[realtime_service_pb2.ReadStreamResponse]:
        async with self.tracked():
            chunks = await self.realtime.open_stream(
                _credentials(context), request.run_id, request.stream_id, request.after_index
            )
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield realtime_service_pb2.ReadStreamResponse(
                        index=chunk.index, data=chunk.data
                    )

    async def AppendStream(
        self, request: realtime_service_pb2.AppendStreamRequest, context: Context
    ) -> realtime_service_pb2.AppendStreamResponse:
        last = await self.realtime.append(
            _credentials(context),
            request.run_id,
            request.stream_id,
            list(request.chunks),
            request.close,
            list(request.chunk_ids),
        )
        return realtime_service_pb2.AppendStreamResponse(last_index=last)


def _timestamp_ms(field: str, value: Timestamp) -> int:
    try:
        return int(value.ToMilliseconds())  # checks the range: years 1..9999, valid nanos
    except ValueError:
        raise errors.InvalidArgument(
            field, "not a valid timestamp (years 1..9999, nanos 0..999999999)"
        ) from None


def _credentials(context: Context) -> Metadata:
    return tuple(
        (key, value if isinstance(value, str) else value.decode())
        for key, value in context.invocation_metadata() or ()
        if key == "authorization"
    )


class RealtimeService:
    """A running realtime service; build it with :func:`serve`."""

    def __init__(self, settings: RealtimeSettings) -> None:
        from runplane_realtime.http import HttpServer

        self.settings = settings
        self.link = NatsLink(settings.nats_url)
        self.scheduler = Scheduler(settings.api_url, settings.tls)
        self.realtime = Realtime(settings, self.link, self.scheduler)
        # No authenticator: the scheduler authorises each call (see Realtime); the interceptor
        # still maps errors and continues traces.
        self.server = Server(authenticate=None, tls=settings.tls)
        self.servicer = RealtimeServicer(self.realtime)
        self.server.add(
            realtime_service_pb2_grpc.add_RealtimeServiceServicer_to_server,
            self.servicer,
            SERVICE_NAME,
        )
        self.http = HttpServer(self.realtime, self.servicer) if settings.http_listen else None
        self.port = 0
        self.http_port = 0
        self._stopped = False

    async def start(self) -> None:
        """Listen on ``settings.listen`` (port 0 picks one: see :attr:`port`) and on
        ``settings.http_listen`` if set (:attr:`http_port`); NATS may be down."""
        self.link.start()
        self.port = await self.server.start(self.settings.listen)
        if self.http is not None:
            self.http_port = await self.http.start(self.settings.http_listen)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving (open subscriptions end after ``grace`` seconds); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self.server.stop(grace)
        await self.servicer.close()
        if self.http is not None:
            await self.http.stop()
        await self.scheduler.close()
        await self.link.stop()


async def serve(settings: RealtimeSettings) -> RealtimeService:
    """Start a realtime service with ``settings``; stop it with :meth:`RealtimeService.stop`."""
    service = RealtimeService(settings)
    await service.start()
    return service


async def _serve() -> None:
    settings = RealtimeSettings.from_env()
    telemetry.setup("runplane-realtime")
    service = await serve(settings)
    host = settings.listen.rsplit(":", 1)[0]
    log.info(
        "realtime listening on %s:%d, HTTP on %s (scheduler %s, NATS %s)",
        host,
        service.port,
        f"port {service.http_port}" if service.http_port else "no port",
        settings.api_url,
        settings.nats_url,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("realtime stopping")
    await service.stop()
    telemetry.shutdown()


def main() -> None:
    """Run the realtime service from ``RUNPLANE_*`` settings until SIGTERM or SIGINT."""
    from runplane._log import configure_logging, run_async

    configure_logging()
    run_async(_serve())
