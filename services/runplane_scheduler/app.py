"""The scheduler process: database, run engine, outbox relay and gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from typing import IO

from runplane.v1 import (
    auth_service_pb2_grpc,
    meta_service_pb2_grpc,
    queue_service_pb2_grpc,
    run_service_pb2_grpc,
    schedule_service_pb2_grpc,
    version_service_pb2_grpc,
    waitpoint_service_pb2_grpc,
    worker_service_pb2_grpc,
)
from runplane.worker import configure_logging, run_async
from runplane_common import telemetry
from runplane_common.config import SchedulerSettings, TelemetrySettings
from runplane_common.errors import ServiceError
from runplane_common.forwarding import ForwardInterceptor
from runplane_common.grpcserver import Server
from runplane_common.metrics import Probes, new_registry
from runplane_scheduler.api.auth import AuthServicer
from runplane_scheduler.api.meta import MetaServicer
from runplane_scheduler.api.queues import QueueServicer
from runplane_scheduler.api.runs import RunServicer
from runplane_scheduler.api.token_http import TokenHttpServer
from runplane_scheduler.api.versions import VersionServicer
from runplane_scheduler.api.waitpoints import WaitpointServicer
from runplane_scheduler.api.worker import WorkerServicer
from runplane_scheduler.engine import RunEngine
from runplane_scheduler.keys import KeyAuthenticator, PublicTokens
from runplane_scheduler.metrics import SchedulerMetrics
from runplane_scheduler.relay import Relay
from runplane_scheduler.replicas import Leadership
from runplane_scheduler.schedules import ScaledClock, ScheduleRunner, ScheduleServicer
from runplane_scheduler.store import Store, leases
from runplane_scheduler.store import tables as db
from runplane_scheduler.store.errors import map_database_error

log = logging.getLogger("runplane.scheduler")


class Scheduler:
    """A running scheduler. Build with :func:`start_scheduler`."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.engine_db = db.create_engine(settings.database_url)
        self.relay: Relay
        self.store = Store(self.engine_db, on_commit=lambda events: self.relay.committed(events))
        self.relay = Relay(self.store, settings.nats_servers, settings.nats_replicas)
        self.engine = RunEngine(self.store, settings)
        self.schedules = ScheduleRunner(self.engine, ScaledClock.from_settings(settings))
        self.engine.on_register = self.schedules.sync_declarative
        self.tokens = PublicTokens(self.engine_db, settings.signing_key)
        # Replicas: the lease decides whether this one runs the engine or forwards every call
        # to the one that does (see replicas.py). Its addresses are known once the ports are.
        self.sqlite = settings.database_url.startswith("sqlite")
        self._sqlite_lock: IO[str] | None = None
        self.leadership = Leadership(
            self.engine_db, settings.replica_id, settings.replica_lease, "", "", single=self.sqlite
        )
        self.forward = ForwardInterceptor(self.leadership, settings.tls)
        self.server = Server(
            KeyAuthenticator(self.engine_db, self.tokens),
            tls=settings.tls,
            map_errors=[map_database_error],
            interceptors=[self.forward],
        )
        self._stepping_down: asyncio.Task[None] | None = None
        self.port = 0
        # /metrics, /healthz and /readyz on the token HTTP port; a registry per instance.
        self.registry = new_registry()
        self.metrics = SchedulerMetrics(
            self.registry, self.engine.index, self.relay, self.store.writer
        )
        self.store.writer.on_changes = self.metrics.observe
        self.metrics.leading(lambda: self.leadership.leading)
        self.http = TokenHttpServer(
            self.engine.waits,
            Probes(self.registry, self.not_ready),
            leader=self.leadership.leader_http,
            tls=settings.tls,
        )
        self.http_url = ""

    async def start(self) -> None:
        if self.sqlite:
            self._sqlite_lock = leases.lock_sqlite(self.settings.database_url)
        try:
            await self._start()
        except BaseException:
            leases.unlock_sqlite(self._sqlite_lock)
            raise

    async def _start(self) -> None:
        await db.upgrade(self.engine_db)
        await self.tokens.load()
        # Wait tokens are completed by POSTing to a URL on this endpoint.
        host = self.settings.listen.rsplit(":", 1)[0]
        http_listen = self.settings.http_listen or f"{host}:0"
        tls = self.settings.tls
        http_port = await self.http.start(
            http_listen, tls.server_ssl_context() if tls.serves_tls else None
        )
        scheme = "https" if tls.serves_tls else "http"
        self.http_url = self.settings.http_url or (
            f"{scheme}://{http_listen.rsplit(':', 1)[0]}:{http_port}"
        )
        self.server.add(
            waitpoint_service_pb2_grpc.add_WaitpointServiceServicer_to_server,
            WaitpointServicer(self.engine, self.settings, self.http_url, self.tokens),
            "runplane.v1.WaitpointService",
        )
        self.server.add(
            run_service_pb2_grpc.add_RunServiceServicer_to_server,
            RunServicer(self.engine, self.settings, self.tokens),
            "runplane.v1.RunService",
        )
        self.server.add(
            queue_service_pb2_grpc.add_QueueServiceServicer_to_server,
            QueueServicer(self.engine, self.settings),
            "runplane.v1.QueueService",
        )
        self.server.add(
            worker_service_pb2_grpc.add_WorkerServiceServicer_to_server,
            WorkerServicer(self.engine, self.settings),
            "runplane.v1.WorkerService",
        )
        self.server.add(
            meta_service_pb2_grpc.add_MetaServiceServicer_to_server,
            MetaServicer(self.settings, self.http_url),
            "runplane.v1.MetaService",
        )
        self.server.add(
            schedule_service_pb2_grpc.add_ScheduleServiceServicer_to_server,
            ScheduleServicer(self.schedules, self.settings),
            "runplane.v1.ScheduleService",
        )
        self.server.add(
            version_service_pb2_grpc.add_VersionServiceServicer_to_server,
            VersionServicer(self.engine),
            "runplane.v1.VersionService",
        )
        self.server.add(
            auth_service_pb2_grpc.add_AuthServiceServicer_to_server,
            AuthServicer(self.tokens),
            "runplane.v1.AuthService",
        )
        self.port = await self.server.start(self.settings.listen)
        leadership = self.leadership
        leadership.grpc_address = self.settings.advertise or f"{advertised(host)}:{self.port}"
        # Replica to replica: the address this one's HTTP port is reached at, not the public
        # URL of the tokens (which may name a load balancer in front of every replica).
        http_host = http_listen.rsplit(":", 1)[0]
        leadership.http_address = f"{scheme}://{advertised(http_host)}:{http_port}"
        if self.settings.advertise:
            leadership.http_address = (
                f"{scheme}://{self.settings.advertise.rsplit(':', 1)[0]}:{http_port}"
            )
        if await leadership.try_take():
            await self._lead()
        elif leadership.lease is not None:
            log.info(
                "scheduler replica %s stands by: %s leads at %s; calls are forwarded there",
                self.settings.replica_id,
                leadership.lease.holder,
                leadership.lease.grpc_address,
            )
        leadership.start(self._lead)
        self._stepping_down = asyncio.create_task(self._step_down_when_lost())

    async def _lead(self) -> None:
        """Run the engine: this replica holds the lease."""
        lease = self.leadership.lease
        assert lease is not None
        writer = self.store.writer
        if not self.sqlite:
            writer.fence = lambda conn: leases.fence(conn, lease)
        writer.on_fenced = lambda: self.leadership.lose("a write found its lease taken")
        await self.engine.start()
        await self.schedules.start()
        self.relay.start()
        self.leadership.led()

    async def _step_down_when_lost(self) -> None:
        """A replica that lost its lease stops acting at once (its process then ends)."""
        await self.leadership.lost.wait()
        await self._stop_engine()

    async def _stop_engine(self) -> None:
        await self.schedules.stop()
        await self.engine.stop()
        await self.relay.stop()

    async def not_ready(self) -> str | None:
        """Why the scheduler cannot serve now (None: it can): its gRPC port, its database,
        then NATS."""
        if not self.port:
            return "starting: the gRPC port is not open yet"
        try:
            await self.store.ping()
        except Exception as error:
            return f"the database is unreachable ({type(error).__name__})"
        if not self.leadership.leading:
            try:
                self.leadership.route(forwarded=False)
            except ServiceError as error:
                return error.message
            return None  # a standby: it forwards to the leader
        if not self.relay.nats_connected:
            return f"not connected to NATS at {self.settings.nats_url}"
        return None

    async def stop(self) -> None:
        await self.server.stop(grace=2.0)
        await self.http.stop()
        if self._stepping_down is not None:
            self._stepping_down.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stepping_down
        await self._stop_engine()
        # After the engine: its last writes commit under the lease; then a standby takes over.
        await self.leadership.stop()
        await self.forward.close()
        await self.engine_db.dispose()
        leases.unlock_sqlite(self._sqlite_lock)
        self._sqlite_lock = None


def advertised(host: str) -> str:
    """The host other replicas reach this one at, when it listens on ``host``."""
    if host in ("", "0.0.0.0", "[::]", "::"):
        return socket.gethostname()
    return host


async def start_scheduler(settings: SchedulerSettings) -> Scheduler:
    scheduler = Scheduler(settings)
    await scheduler.start()
    return scheduler


async def _serve() -> None:
    settings = SchedulerSettings.from_env()
    telemetry.setup(TelemetrySettings.from_env("runplane-scheduler"))
    scheduler = await start_scheduler(settings)
    host = settings.listen.rsplit(":", 1)[0]
    log.info(
        "scheduler listening on %s:%d (database %s)",
        host,
        scheduler.port,
        _redact(settings.database_url),
    )
    log.info("scheduler HTTP (tokens, /metrics, /healthz, /readyz) on %s", scheduler.http_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    lost = asyncio.create_task(scheduler.leadership.lost.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((lost, stopping), return_when=asyncio.FIRST_COMPLETED)
    log.info("scheduler stopping")
    await scheduler.stop()
    telemetry.shutdown()
    if scheduler.leadership.lost.is_set():
        # Crash-only: whatever runs this process starts it again, as a standby.
        sys.exit(f"scheduler replica lost its lease ({scheduler.leadership.lost_why})")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.split("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
    return url


def main() -> None:
    configure_logging()
    run_async(_serve())
