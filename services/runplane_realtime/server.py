"""RealtimeService: a run's versions in order, from JetStream, checked against the scheduler.

A subscription reads the run's events with an ordered JetStream consumer from the stream's start
and sends every version newer than the last one sent, once and in order. The scheduler's database
is the system of record, so whenever the stream cannot say what happened next the subscription
asks the scheduler for the run's snapshot and sends it if it is newer:

- a version gap (events lost or purged): at once;
- no event for ``reconcile_interval`` seconds: in case the last events never reached NATS;
- NATS unreachable: every second until it returns, then the stream again.

The service keeps no database and no credentials: each subscription forwards the caller's
``authorization`` to the scheduler's ``GetRun``, and the scheduler's refusal is the subscriber's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeAlias

import grpc
from opentelemetry import propagate

from runplane.v1 import (
    realtime_service_pb2,
    realtime_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
)
from runplane_realtime.events import EventsUnavailable, NatsLink, RunEvents
from runplane_server import errors, subjects, telemetry
from runplane_server.config import RealtimeSettings
from runplane_server.grpcserver import Server

log = logging.getLogger("runplane.realtime")

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Metadata: TypeAlias = tuple[tuple[str, str], ...]

SERVICE_NAME = "runplane.v1.RealtimeService"

FINAL_STATUSES = frozenset(
    {
        run_pb2.RUN_STATUS_COMPLETED,
        run_pb2.RUN_STATUS_CANCELED,
        run_pb2.RUN_STATUS_FAILED,
        run_pb2.RUN_STATUS_CRASHED,
        run_pb2.RUN_STATUS_SYSTEM_FAILURE,
        run_pb2.RUN_STATUS_EXPIRED,
        run_pb2.RUN_STATUS_TIMED_OUT,
    }
)

# While the stream cannot be read, ask the scheduler this often.
OUTAGE_POLL_INTERVAL = 1.0
# A waiting subscription looks up from the stream this often, to notice a NATS outage promptly.
READ_SLICE = 1.0
SNAPSHOT_TIMEOUT = 10.0
MIN_RECONCILE_INTERVAL = 0.1

# The scheduler's refusals, passed on to the subscriber as the same status.
_REFUSALS: dict[grpc.StatusCode, type[errors.ServiceError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
}


def is_final(run: run_pb2.Run) -> bool:
    return run.status in FINAL_STATUSES


class Scheduler:
    """The scheduler's ``GetRun``, called with each subscriber's own credentials."""

    def __init__(self, api_url: str) -> None:
        self._channel = grpc.aio.insecure_channel(api_url)
        self._runs = run_service_pb2_grpc.RunServiceStub(self._channel)

    async def get_run(self, run_id: str, credentials: Metadata) -> run_pb2.Run:
        """The run as the scheduler has it now; raises the ServiceError matching its status."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the subscriber's trace continues into the scheduler
        try:
            reply = await self._runs.GetRun(
                run_service_pb2.GetRunRequest(run_id=run_id),
                metadata=(*credentials, *carrier.items()),
                timeout=SNAPSHOT_TIMEOUT,
            )
        except grpc.aio.AioRpcError as error:
            message = error.details() or error.code().name
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise errors.InvalidArgument("run_id", message) from None
            refusal = _REFUSALS.get(error.code())
            if refusal is not None:
                raise refusal(message) from None
            raise errors.Unavailable(f"the scheduler cannot say: {message}") from None
        run: run_pb2.Run = reply.run
        return run

    async def close(self) -> None:
        await self._channel.close()


class Subscription:
    """One subscriber's cursor over one run: the last version sent and where the next comes from."""

    def __init__(
        self,
        scheduler: Scheduler,
        link: NatsLink,
        events: RunEvents,
        credentials: Metadata,
        run_id: str,
        after_version: int,
        reconcile_interval: float,
    ) -> None:
        self._scheduler = scheduler
        self._link = link
        self._events = events
        self._credentials = credentials
        self._run_id = run_id
        # A floor, so that a zero setting cannot turn reconciling into a busy loop.
        self._interval = max(reconcile_interval, MIN_RECONCILE_INTERVAL)
        self.last_version = after_version

    async def runs(self, keep_open: bool) -> AsyncGenerator[run_pb2.Run, None]:
        """Every version newer than the last sent, in order; ends after a final one unless
        ``keep_open``."""
        try:
            while True:
                run = await self._next()
                self.last_version = run.version
                yield run
                if is_final(run) and not keep_open:
                    return
        finally:
            await self._events.close()

    async def _next(self) -> run_pb2.Run:
        """The next version to send: from the stream, or the scheduler's snapshot when the
        stream falls short."""
        loop = asyncio.get_running_loop()
        reconcile_at = loop.time() + self._interval
        while True:
            if loop.time() >= reconcile_at:
                # Nothing new for a while: the last events may never have reached NATS.
                reconcile_at = loop.time() + self._interval
                if snapshot := await self._newer_snapshot():
                    return snapshot
                continue
            try:
                run = await self._events.next(min(READ_SLICE, reconcile_at - loop.time()))
            except EventsUnavailable as error:
                log.debug("run %s: events unreadable (%s)", self._run_id, error)
                nats_down = not self._link.connected
                # NATS down: give it up to a poll interval to come back (a service just started,
                # a blip) before asking the scheduler; that wait also paces the polling.
                if nats_down and await self._link.wait_connected(OUTAGE_POLL_INTERVAL):
                    continue
                if snapshot := await self._newer_snapshot():
                    return snapshot
                if not nats_down:  # connected, but no stream or consumer yet: pace the retries
                    await asyncio.sleep(OUTAGE_POLL_INTERVAL)
                continue
            if run is None or run.version <= self.last_version:
                continue  # a quiet slice, or a duplicate, or history the subscriber already has
            if run.version == self.last_version + 1:
                if self._events.truncated:  # too big for NATS: the scheduler has it whole
                    snapshot = await self._newer_snapshot()
                    if snapshot is not None and snapshot.version >= run.version:
                        return snapshot
                return run
            # A gap: versions between were lost or purged. The snapshot is at least as new as
            # this event unless the scheduler is unreachable; send whichever is newer.
            snapshot = await self._newer_snapshot()
            return snapshot if snapshot is not None and snapshot.version > run.version else run

    async def _newer_snapshot(self) -> run_pb2.Run | None:
        """The scheduler's snapshot if newer than the last version sent."""
        try:
            run = await self._scheduler.get_run(self._run_id, self._credentials)
        except errors.Unavailable as error:
            # The stream may still deliver; the subscriber keeps it. A refusal (key revoked,
            # run gone) is not caught: it ends the subscription.
            log.warning("run %s: no snapshot from the scheduler: %s", self._run_id, error.message)
            return None
        return run if run.version > self.last_version else None


class RealtimeServicer(realtime_service_pb2_grpc.RealtimeServiceServicer):
    """``runplane.v1.RealtimeService``: authorised by the scheduler, fed by JetStream."""

    def __init__(self, settings: RealtimeSettings, link: NatsLink, scheduler: Scheduler) -> None:
        self._settings = settings
        self._link = link
        self._scheduler = scheduler
        # The tasks serving open subscriptions: gRPC's stop cancels them without waiting, and
        # they must be gone before the NATS connection and the scheduler channel close.
        self._serving: set[asyncio.Task[Any]] = set()

    async def close(self, timeout: float = 5.0) -> None:
        """End every open subscription and wait for each to remove its consumer."""
        tasks = [task for task in self._serving if not task.done()]
        for task in tasks:
            # A task gRPC already cancelled is cleaning up; cancelling it again would cut that
            # short and leave its consumer behind.
            if not task.cancelling():
                task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def SubscribeToRun(
        self, request: realtime_service_pb2.SubscribeToRunRequest, context: Context
    ) -> AsyncIterator[realtime_service_pb2.SubscribeToRunResponse]:
        if not request.run_id:
            raise errors.InvalidArgument("run_id", "must not be empty")
        if request.after_version < 0:
            raise errors.InvalidArgument("after_version", "must not be negative")
        task = asyncio.current_task()
        assert task is not None  # gRPC serves each call in a task
        self._serving.add(task)
        try:
            credentials = _credentials(context)
            # The authorisation check; the snapshot also names the run's environment, and so its
            # exact subject.
            current = await self._scheduler.get_run(request.run_id, credentials)
            has_final = is_final(current) and current.version <= request.after_version
            if has_final and not request.keep_open:
                return  # the subscriber already has the final version
            subscription = Subscription(
                self._scheduler,
                self._link,
                RunEvents(self._link, subjects.run_event(current.environment_id, current.id)),
                credentials,
                request.run_id,
                request.after_version,
                self._settings.reconcile_interval,
            )
            # aclosing: the consumer is removed as soon as this stream ends, however it ends.
            async with contextlib.aclosing(subscription.runs(request.keep_open)) as runs:
                async for run in runs:
                    yield realtime_service_pb2.SubscribeToRunResponse(run=run)
        finally:
            self._serving.discard(task)


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
        self.link = NatsLink(settings.nats_url)
        self.scheduler = Scheduler(settings.api_url)
        # No authenticator: the scheduler authorises each subscription (see SubscribeToRun); the
        # interceptor still maps errors and continues traces.
        self.server = Server(authenticate=None)
        self.servicer = RealtimeServicer(settings, self.link, self.scheduler)
        self.server.add(
            realtime_service_pb2_grpc.add_RealtimeServiceServicer_to_server,
            self.servicer,
            SERVICE_NAME,
        )
        self.port = 0
        self._stopped = False

    async def start(self) -> None:
        """Listen on ``settings.listen`` (port 0 picks one: see :attr:`port`); NATS may be down."""
        self.link.start()
        self.port = await self.server.start(self.settings.listen)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving (open subscriptions end after ``grace`` seconds); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self.server.stop(grace)
        await self.servicer.close()
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
        "realtime listening on %s:%d (scheduler %s, NATS %s)",
        host,
        service.port,
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
