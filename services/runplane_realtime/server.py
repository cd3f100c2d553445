"""RealtimeService: runs' versions in order and run streams, over gRPC and (see ``http.py``) SSE.
This module holds the gRPC servicer and the service that wires it, the HTTP endpoints and the
shared core (``core.py``) together.

The service keeps no database and no credentials: every call forwards the caller's
``authorization`` to the scheduler (``GetRun``, ``ListRuns``, ``GetServerInfo``), and the
scheduler's refusal is the caller's. That is also how public access tokens are checked: the
scheduler holds the signing key and knows each token's scopes. See ``subscriptions.py`` for how
a subscription stays complete and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from runplane.v1 import realtime_service_pb2, realtime_service_pb2_grpc, run_pb2
from runplane.worker import configure_logging, run_async
from runplane_common import errors, telemetry
from runplane_common.config import RealtimeSettings, TelemetrySettings
from runplane_common.grpcserver import Server
from runplane_common.metrics import Probes, new_registry
from runplane_realtime.core import Realtime
from runplane_realtime.events import NatsLink
from runplane_realtime.feed import Feed
from runplane_realtime.http import HttpServer
from runplane_realtime.metrics import RealtimeMetrics
from runplane_realtime.scheduler import Metadata, Scheduler

log = logging.getLogger("runplane.realtime")

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = "runplane.v1.RealtimeService"
# gc.set_threshold for the service's process (Python's default: 700, 10, 10).
GC_THRESHOLDS = (70_000, 10, 10)
# Subscription calls that may wait to be taken in at once (see Server).
MAX_PENDING_SUBSCRIBERS = 20_000
# The set subscriptions' max_changes_per_response is capped at this.
MAX_CHANGES_PER_RESPONSE = 256
# ReadStream's max_chunks_per_response is capped at this.
MAX_CHUNKS_PER_RESPONSE = 1000


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
        _follows(run_id=request.run_id)
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
        _follows(tag=request.tag)
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
                async for run, cursor, more in grouped(runs, request.max_changes_per_response):
                    yield realtime_service_pb2.SubscribeToRunsWithTagResponse(
                        run=run, cursor=cursor, more_changes=more
                    )

    async def SubscribeToBatch(
        self, request: realtime_service_pb2.SubscribeToBatchRequest, context: Context
    ) -> AsyncIterator[realtime_service_pb2.SubscribeToBatchResponse]:
        _follows(batch_id=request.batch_id)
        async with self.tracked():
            runs = await self.realtime.open_batch(
                _credentials(context),
                request.batch_id,
                request.after_versions,
                request.resume_cursor,
            )
            async with contextlib.aclosing(runs):
                async for run, cursor, more in grouped(runs, request.max_changes_per_response):
                    yield realtime_service_pb2.SubscribeToBatchResponse(
                        run=run, cursor=cursor, more_changes=more
                    )

    async def ReadStream(
        self, request: realtime_service_pb2.ReadStreamRequest, context: Context
    ) -> AsyncIterator[realtime_service_pb2.ReadStreamResponse]:
        _follows(run_id=request.run_id, stream_id=request.stream_id)
        async with self.tracked():
            chunks = await self.realtime.open_stream(
                _credentials(context), request.run_id, request.stream_id, request.after_index
            )
            most = min(max(request.max_chunks_per_response, 1), MAX_CHUNKS_PER_RESPONSE)
            async with contextlib.aclosing(chunks):
                async for first_ready in chunks:
                    # What else is buffered goes along: a reader that fell behind a fast
                    # stream catches up in a few messages.
                    more = chunks.take_ready(most - 1)
                    ready = [chunk for part in (first_ready, *more) for chunk in part]
                    for start in range(0, len(ready), most):
                        first, *rest = ready[start : start + most]
                        yield realtime_service_pb2.ReadStreamResponse(
                            index=first.index,
                            data=first.data,
                            more_chunks=[
                                realtime_service_pb2.StreamChunk(index=c.index, data=c.data)
                                for c in rest
                            ],
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


def _follows(**names: str) -> None:
    """What a subscription follows, on the call's server span (the interceptor opens it)."""
    span = trace.get_current_span()
    for name, value in names.items():
        span.set_attribute(f"runplane.{name}", value)


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
        self.settings = settings
        self.link = NatsLink(settings.nats_servers)
        self.scheduler = Scheduler(settings.api_url, settings.tls)
        self.realtime = Realtime(settings, self.link, self.scheduler)
        # No authenticator: the scheduler authorises each call (see Realtime); the interceptor
        # still maps errors and continues traces.
        # Subscribers arrive in thousands at once when a replica restarts and every client
        # reconnects: take them in rather than have gRPC cancel all past its default 1,000.
        self.server = Server(
            authenticate=None, tls=settings.tls, max_pending_calls=MAX_PENDING_SUBSCRIBERS
        )
        self.servicer = RealtimeServicer(self.realtime)
        self.server.add(
            realtime_service_pb2_grpc.add_RealtimeServiceServicer_to_server,
            self.servicer,
            SERVICE_NAME,
        )
        # /metrics, /healthz and /readyz on the HTTP port; a registry per instance.
        self.registry = new_registry()
        self.metrics = RealtimeMetrics(self.registry, self.realtime)
        self.http = (
            HttpServer(
                self.realtime,
                self.servicer.tracked,
                probes=Probes(self.registry, self.metrics.not_ready),
            )
            if settings.http_listen
            else None
        )
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
        await self.realtime.hubs.close()
        await self.scheduler.close()
        await self.link.stop()


async def grouped(
    runs: Feed[tuple[run_pb2.Run, int]], most: int
) -> AsyncIterator[tuple[run_pb2.Run, int, list[realtime_service_pb2.RunChange]]]:
    """Each change with, if the subscriber asked for groups of up to ``most``, the changes
    already buffered after it: a burst costs each subscriber one message, not one a change."""
    most = min(max(most, 1), MAX_CHANGES_PER_RESPONSE)
    async for run, cursor in runs:
        more = [
            realtime_service_pb2.RunChange(run=ready, cursor=at)
            for ready, at in runs.take_ready(most - 1)
        ]
        yield run, cursor, more


async def serve(settings: RealtimeSettings) -> RealtimeService:
    """Start a realtime service with ``settings``; stop it with :meth:`RealtimeService.stop`."""
    service = RealtimeService(settings)
    await service.start()
    return service


async def _serve() -> None:
    settings = RealtimeSettings.from_env()
    telemetry.setup(TelemetrySettings.from_env("runplane-realtime"))
    service = await serve(settings)
    # Thousands of subscribers hold tens of thousands of long-lived objects, and every delivery
    # allocates a few more: at Python's default thresholds the cyclic collector runs every few
    # hundred deliveries and walks them all (15 % of the CPU of a 1,000-subscriber fan-out).
    # What exists after start-up is never collected; the young generation is collected a
    # hundred times less often. Reference counting frees nearly everything anyway.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
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
    configure_logging()
    run_async(_serve())
