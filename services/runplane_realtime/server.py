"""RealtimeService: a run's versions in order, from JetStream, checked against the scheduler.

A subscription reads the run's events with an ordered JetStream consumer from the stream's start
and yields every version newer than the last one sent. The database is the system of record, so
when events are missing (a version gap, nothing for ``reconcile_interval`` seconds, or NATS
unreachable) the subscription asks the scheduler for the run's snapshot and sends it if newer.
Authorisation is the scheduler's: the caller's credentials are forwarded to ``GetRun``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from runplane.v1 import (
    events_pb2,
    realtime_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
)
from runplane.v1 import (
    realtime_service_pb2 as rtpb,
)
from runplane_server import errors, subjects, telemetry
from runplane_server.config import RealtimeSettings
from runplane_server.grpcserver import Server

log = logging.getLogger("runplane.realtime")

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

FINAL = frozenset(
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

_ERRORS: dict[grpc.StatusCode, type[errors.ServiceError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
}


class NatsLink:
    """One NATS connection for the service; absent while NATS is unreachable."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.nc: NATS | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._connect(), name="nats-connect")

    async def _connect(self) -> None:
        delay = 0.2
        while True:
            try:
                self.nc = await nats.connect(
                    self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2
                )
                log.info("connected to NATS at %s", self.url)
                return
            except Exception as error:
                log.warning("NATS at %s not reachable (%s); retrying", self.url, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def jetstream(self) -> JetStreamContext | None:
        if self.nc is None or not self.nc.is_connected:
            return None
        return self.nc.jetstream()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()


class RealtimeServicer(realtime_service_pb2_grpc.RealtimeServiceServicer):
    def __init__(self, settings: RealtimeSettings, link: NatsLink) -> None:
        self.settings = settings
        self.link = link
        self._channel = grpc.aio.insecure_channel(settings.api_url)
        self._runs = run_service_pb2_grpc.RunServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def snapshot(self, run_id: str, credentials: tuple[tuple[str, str], ...]) -> run_pb2.Run:
        """The scheduler's view of the run, with the caller's rights."""
        try:
            reply = await self._runs.GetRun(
                run_service_pb2.GetRunRequest(run_id=run_id), metadata=credentials, timeout=10
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise errors.InvalidArgument("run_id", error.details() or "invalid") from None
            kind = _ERRORS.get(error.code(), errors.Unavailable)
            raise kind(error.details() or error.code().name) from None
        run: run_pb2.Run = reply.run
        return run

    async def SubscribeToRun(
        self, request: rtpb.SubscribeToRunRequest, context: Context
    ) -> AsyncIterator[rtpb.SubscribeToRunResponse]:
        if not request.run_id:
            raise errors.InvalidArgument("run_id", "must not be empty")
        if request.after_version < 0:
            raise errors.InvalidArgument("after_version", "must not be negative")
        credentials = tuple(
            (k, v if isinstance(v, str) else v.decode())
            for k, v in context.invocation_metadata() or ()
            if k in ("authorization", "traceparent", "tracestate")
        )
        current = await self.snapshot(request.run_id, credentials)
        last = request.after_version
        if current.status in FINAL and current.version <= last and not request.keep_open:
            return
        subject = subjects.run_event(current.environment_id, current.id)
        sub: Any = None
        try:
            while True:
                js = self.link.jetstream()
                if sub is None and js is not None:
                    with contextlib.suppress(Exception):
                        sub = await js.subscribe(
                            subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
                        )
                run: run_pb2.Run | None = None
                if sub is not None:
                    try:
                        msg = await sub.next_msg(timeout=self.settings.reconcile_interval)
                        event = events_pb2.RunEvent.FromString(msg.data)
                        if event.run.version <= last:
                            continue  # a duplicate, or history the subscriber already has
                        run = event.run
                        if run.version > last + 1:  # a gap: events lost or purged
                            run = None
                    except nats.errors.TimeoutError:
                        pass
                    except Exception as error:  # the consumer broke (NATS gone)
                        log.info("subscription to %s lost its consumer: %s", subject, error)
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                        sub = None
                else:
                    await asyncio.sleep(1.0)
                if run is None:
                    run = await self.snapshot(request.run_id, credentials)
                    if run.version <= last:
                        continue
                last = run.version
                yield rtpb.SubscribeToRunResponse(run=run)
                if run.status in FINAL and not request.keep_open:
                    return
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


class RealtimeService:
    """A running realtime service. Build with :func:`serve`."""

    def __init__(self, settings: RealtimeSettings) -> None:
        self.settings = settings
        self.link = NatsLink(settings.nats_url)
        self.servicer = RealtimeServicer(settings, self.link)
        self.server = Server(authenticate=None)
        self.port = 0

    async def start(self) -> None:
        self.link.start()
        self.server.add(
            realtime_service_pb2_grpc.add_RealtimeServiceServicer_to_server,
            self.servicer,
            "runplane.v1.RealtimeService",
        )
        self.port = await self.server.start(self.settings.listen)

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)
        await self.servicer.close()
        await self.link.stop()


async def serve(settings: RealtimeSettings) -> RealtimeService:
    service = RealtimeService(settings)
    await service.start()
    return service


async def _serve() -> None:
    settings = RealtimeSettings.from_env()
    telemetry.setup("runplane-realtime")
    service = await serve(settings)
    host = settings.listen.rsplit(":", 1)[0]
    log.info("realtime listening on %s:%d (scheduler %s)", host, service.port, settings.api_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await service.stop()
    telemetry.shutdown()


def main() -> None:
    from runplane._log import configure_logging, run_async

    configure_logging()
    run_async(_serve())
