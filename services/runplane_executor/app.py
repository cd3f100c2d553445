"""The executor process: one stream to the scheduler, a warm pool of task processes, and its own
ExecutorService (status, drain and resume), which only the executor's own credential may call."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import grpc
import orjson

from runplane import ConfigurationError, Task
from runplane.tls import open_channel
from runplane.v1 import (
    executor_service_pb2 as epb,
)
from runplane.v1 import (
    executor_service_pb2_grpc,
    meta_service_pb2,
    meta_service_pb2_grpc,
    worker_service_pb2_grpc,
)
from runplane.v1 import (
    worker_service_pb2 as wpb,
)
from runplane.worker import (
    DEFAULT_MACHINE,
    MACHINES,
    Attempt,
    AttemptResult,
    Logs,
    Metadata,
    MetadataUpdate,
    Report,
    Result,
    Started,
    Wait,
    configure_logging,
    declared_schedules,
    import_task_modules,
    run_async,
)
from runplane_common import telemetry
from runplane_common.auth import RIGHT_EXECUTE, Principal
from runplane_common.config import ExecutorSettings, TelemetrySettings
from runplane_common.errors import Unauthenticated
from runplane_common.grpcserver import Server
from runplane_common.ids import new_id
from runplane_common.protocol import BATCHES, MAX_BATCH, WORKER_PROTOCOL_VERSION
from runplane_executor import waits
from runplane_executor.counts import ExecutorCounts
from runplane_executor.pool import ProcessPool
from runplane_executor.starts import HeldStarts

log = logging.getLogger("runplane.executor")


def payload_schema(t: Task[Any]) -> str:
    """The JSON Schema of a task's pydantic payload model, '' when it takes any value."""
    schema = getattr(t.payload_type, "model_json_schema", None)
    return orjson.dumps(schema()).decode() if schema is not None else ""


# The longest wait between two tries to reach the scheduler (seconds).
RECONNECT_BACKOFF_CAP = 1.0

# Messages about attempts that must reach the scheduler: kept while disconnected, sent on reconnect.
REPORTS = ("started", "result", "metadata", "logs", "wait")
# An admin call's key, once the scheduler accepted it, is not asked about again for this long:
# a revoked key is refused here as soon as on the scheduler.
ADMIN_KEY_CHECK_SECONDS = 2.0


def code_hash(tasks: dict[str, Task[Any]]) -> str:
    """A hash of the source of the modules that define the tasks (imported here)."""
    digest = hashlib.sha256()
    for name in sorted({t.fn.__module__ for t in tasks.values()}):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        digest.update(name.encode() + b"\0")
        if path:
            with contextlib.suppress(OSError):
                digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def build_manifest(tasks: dict[str, Task[Any]], version: str = "") -> wpb.Manifest:
    """The manifest of the tasks (imported here, in the control process), registered as
    ``version``; without one, as a hash of the definitions and the task modules' source."""
    declared = declared_schedules()
    defs = []
    for t in sorted(tasks.values(), key=lambda t: t.id):
        schedule = declared.get(t.id)
        defs.append(
            wpb.TaskDefinition(
                id=t.id,
                queue=t.queue.name,
                queue_concurrency_limit=t.queue.concurrency_limit or 0,
                retry=wpb.RetryPolicy(
                    max_attempts=t.retry.max_attempts,
                    factor=t.retry.factor,
                    min_timeout_seconds=t.retry.min_timeout,
                    max_timeout_seconds=t.retry.max_timeout,
                    randomize=t.retry.randomize,
                ),
                max_duration_seconds=t.max_duration,
                machine=t.machine_name,
                description=t.description,
                ttl_seconds=t.ttl,
                queue_rate_limit=t.queue.rate_limit[0] if t.queue.rate_limit else 0,
                queue_rate_period_seconds=t.queue.rate_limit[1] if t.queue.rate_limit else 0,
                queue_total_concurrency_limit=t.queue.total_concurrency_limit or 0,
                payload_schema=payload_schema(t),
                schedule=wpb.DeclarativeSchedule(cron=schedule.cron, timezone=schedule.timezone)
                if schedule
                else None,
            )
        )
    manifest = wpb.Manifest(tasks=defs)
    if not version:
        digest = hashlib.sha256(manifest.SerializeToString(deterministic=True))
        digest.update(code_hash(tasks).encode())
        version = "h-" + digest.hexdigest()[:16]
    manifest.version = version
    return manifest


def assignment_to_attempt(a: wpb.Assignment, task: Task[Any] | None, version: str = "") -> Attempt:
    """The attempt as the task process gets it, with its effective machine and max_duration.

    The machine is the trigger's (``Run.machine``) or the task's. An attempt gets a process of
    its own with that machine's memory limit when the machine was chosen explicitly (the task
    sets ``machine=``, or the trigger asks for a different one); otherwise it runs in the warm
    pool. max_duration is the trigger's (``Run.max_duration``) or the task's. ``version``: the
    worker version of this executor's code (``ctx.version``)."""
    r = a.run
    task_machine = task.machine_name if task is not None else DEFAULT_MACHINE
    machine = r.machine if r.machine in MACHINES else task_machine
    explicit = (task is not None and task.machine is not None) or machine != task_machine
    if r.HasField("max_duration"):
        max_duration = r.max_duration.ToTimedelta().total_seconds()
    else:
        max_duration = task.max_duration if task is not None else 0
    oom_machine = task.retry.out_of_memory_machine if task is not None else None
    return {
        "attempt_id": a.attempt_id,
        "number": a.attempt_number,
        "traceparent": a.traceparent,
        "environment_slug": a.environment_slug,
        "environment_id": a.environment_id,
        "machine": machine,
        "memory_limit": int(MACHINES[machine][1] * 2**30) if explicit else 0,
        "max_duration": max_duration,
        # An out-of-memory attempt is retried on this machine, unless it already ran on it.
        "oom_retry_machine": oom_machine if oom_machine and oom_machine != machine else "",
        "version": r.worker_version or version,
        "run": {
            "id": r.id,
            "task_id": r.task_id,
            "payload": r.payload,
            "metadata": r.metadata or "{}",
            "tags": list(r.tags),
            "is_test": r.is_test,
            "created_at": r.created_at.ToMilliseconds() if r.HasField("created_at") else 0,
            "started_at": r.started_at.ToMilliseconds() if r.HasField("started_at") else 0,
            "idempotency_key": r.idempotency_key,
            "max_attempts": r.max_attempts,
            "priority": r.priority,
            "parent_run_id": r.parent_run_id,
            "root_run_id": r.root_run_id,
            "batch_id": r.batch_id,
            "queue": r.queue,
            "replayed_from_run_id": r.replayed_from_run_id,
        },
    }


def result_message(attempt_id: str, result: AttemptResult) -> wpb.ConnectRequest:
    out = wpb.AttemptResult(
        attempt_id=attempt_id,
        skip_retrying=bool(result.get("skip_retrying")),
        canceled=bool(result.get("canceled")),
        lost=bool(result.get("lost")),
        timed_out=bool(result.get("timed_out")),
        out_of_memory=bool(result.get("out_of_memory")),
        retry_machine=result.get("retry_machine") or "",
    )
    if "output" in result:
        out.output = result["output"]
    elif "error" in result:
        e = result["error"]
        out.error.type, out.error.message, out.error.stack_trace = (
            e["type"],
            e["message"],
            e["stack_trace"],
        )
    if (retry_delay_ms := result.get("retry_delay_ms")) is not None:
        out.retry_delay_ms = retry_delay_ms
    if (retry_at_ms := result.get("retry_at_ms")) is not None:
        out.retry_at.FromMilliseconds(retry_at_ms)
    return wpb.ConnectRequest(result=out)


def metadata_message(attempt_id: str, update: MetadataUpdate) -> wpb.ConnectRequest:
    return wpb.ConnectRequest(
        metadata=wpb.MetadataUpdate(
            run_id=update["run_id"],
            attempt_id=attempt_id,
            operations=[
                wpb.MetadataOperation(type=kind, key=key, value=value)
                for kind, key, value in update["operations"]
            ],
        )
    )


def logs_message(entries: list[dict[str, Any]]) -> wpb.ConnectRequest:
    batch = wpb.LogBatch()
    for e in entries:
        pb = batch.entries.add(
            run_id=e["run_id"],
            attempt_id=e["attempt_id"],
            attempt_number=e["attempt_number"],
            level=e["level"],
            message=e["message"],
            attributes=e["attributes"],
            trace_id=e["trace_id"],
            span_id=e["span_id"],
        )
        pb.time.FromMilliseconds(e["time_ms"])
    return wpb.ConnectRequest(logs=batch)


class _HttpPort(Protocol):
    async def start(self, listen: str, ssl_context: ssl.SSLContext | None = None) -> int: ...
    async def stop(self) -> None: ...


# What the executor's HTTP port needs beyond `pip install runplane`: the server extra's.
_HTTP_PACKAGES = ("aiohttp", "prometheus_client")


def _http_port(executor: Executor) -> _HttpPort | None:
    """The executor's /metrics, /healthz and /readyz port; None without the server extra (an
    error when RUNPLANE_EXECUTOR_HTTP_LISTEN asks for the port)."""
    try:
        from runplane_executor.metrics import probe_server
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if missing not in _HTTP_PACKAGES:
            raise
        why = f'the server extra ({missing} is not installed): pip install "runplane[server]"'
        if executor.settings.http_listen:
            raise ConfigurationError(
                f"RUNPLANE_EXECUTOR_HTTP_LISTEN is set, but the executor's HTTP port needs {why}"
            ) from None
        log.info("executor HTTP port (/metrics, /healthz, /readyz) off: it needs %s", why)
        return None
    return probe_server(executor.counts, executor, executor.not_ready)


class Executor:
    def __init__(self, settings: ExecutorSettings) -> None:
        if not settings.secret_key:
            raise ConfigurationError(
                "the executor needs a worker key: RUNPLANE_WORKER_KEY "
                "(runplane keys create --env ENV --kind worker)"
            )
        self.settings = settings
        self.executor_id = new_id("exec")
        # From the scheduler's Registered: proves a reconnect is this executor.
        self._session_token = ""
        self.tasks = import_task_modules(settings.modules)
        self.manifest = build_manifest(self.tasks, settings.version)
        self.pool = ProcessPool(
            settings.modules,
            settings.processes,
            self._on_pool_event,
            settings.cancel_grace,
            max_resident_waits=settings.max_resident_waits,
            evict_waits_after=settings.evict_waits_after,
            output_limit=settings.output_limit,
        )
        self.connected = False
        self.draining = False
        # The stream's queue; None in it ends the stream (the executor then registers again).
        self._outgoing: asyncio.Queue[wpb.ConnectRequest | None] | None = None
        # The worker protocol version this executor registers with: its own, or 1 once a
        # scheduler that speaks only 1 refused it (an older scheduler during an upgrade).
        self._protocol_version = WORKER_PROTOCOL_VERSION
        self._channel: grpc.aio.Channel | None = None
        self._registered_draining = False
        self._admin_key_checked = 0.0
        # The scheduler refused this executor's key (revoked): so does the admin port.
        self._key_refused = False
        # Attempt reports (started, result) produced while disconnected, sent on reconnect.
        self._unsent: list[wpb.ConnectRequest] = []
        self.starts = HeldStarts(self._send)
        self._task: asyncio.Task[None] | None = None
        self.server = Server(authenticate=self.authenticate_admin, tls=settings.tls)
        self.port = 0
        self.counts = ExecutorCounts()
        # /metrics, /healthz and /readyz on an HTTP port of its own, with the server extra.
        self.http = _http_port(self)
        self.http_url = ""

    async def start(self) -> None:
        provided = await self.pool.start()
        log.info(
            "executor %s (version %s): %d task processes ready with tasks %s",
            self.executor_id,
            self.manifest.version,
            self.pool.size,
            ", ".join(provided),
        )
        self.server.add(
            executor_service_pb2_grpc.add_ExecutorServiceServicer_to_server,
            _ExecutorServicer(self),
            "runplane.v1.ExecutorService",
        )
        self.port = await self.server.start(self.settings.listen)
        tls = self.settings.tls
        if self.http is not None:
            http_listen = self.settings.http_listen or "127.0.0.1:0"
            http_port = await self.http.start(
                http_listen, tls.server_ssl_context() if tls.serves_tls else None
            )
            scheme = "https" if tls.serves_tls else "http"
            self.http_url = f"{scheme}://{http_listen.rsplit(':', 1)[0]}:{http_port}"
        self._task = asyncio.create_task(self._connect_forever(), name="scheduler-stream")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.server.stop(grace=1.0)
        if self.http is not None:
            await self.http.stop()
        await self.pool.stop()

    # What the metrics read (runplane_executor.metrics.ExecutorState).
    @property
    def capacity(self) -> int:
        return self.settings.capacity

    @property
    def running_attempts(self) -> int:
        return self.pool.running

    @property
    def task_processes(self) -> int:
        return self.pool.size

    async def not_ready(self) -> str | None:
        """Why the executor takes no attempts now (None: it is registered)."""
        if self.connected:
            return None
        if self._key_refused:
            return "the scheduler refuses this executor's key"
        return f"not registered with the scheduler at {self.settings.api_url}"

    def status(self) -> epb.ExecutorStatus:
        return epb.ExecutorStatus(
            executor_id=self.executor_id,
            connected=self.connected,
            draining=self.draining,
            capacity=self.settings.capacity,
            running_attempts=self.pool.running,
            task_ids=[t.id for t in self.manifest.tasks],
            task_processes=self.pool.size,
        )

    def drain(self) -> None:
        self.draining = True
        self._send(wpb.ConnectRequest(heartbeat=wpb.Heartbeat(draining=True)))

    def resume(self) -> None:
        """Undo a drain. A stream registered while draining told the scheduler a capacity of 0,
        so it is ended and the executor registers again with its capacity."""
        if not self.draining:
            return
        self.draining = False
        if self._outgoing is not None and self._registered_draining:
            log.info("resumed: registering again with capacity %d", self.settings.capacity)
            self._outgoing.put_nowait(None)
        else:
            self._send(wpb.ConnectRequest(heartbeat=wpb.Heartbeat(draining=False)))

    async def authenticate_admin(self, token: str) -> Principal:
        """ExecutorService calls need the key this executor connects with (compared in constant
        time) and, while connected, one the scheduler still accepts: a revoked key is refused
        here within seconds. Without a scheduler to ask the key alone decides."""
        if not hmac.compare_digest(token.encode(), self.settings.secret_key.encode()):
            raise Unauthenticated(
                "ExecutorService needs this executor's own key (its RUNPLANE_WORKER_KEY)"
            )
        if self._key_refused:
            raise Unauthenticated("the scheduler refuses this executor's key")
        channel = self._channel
        if channel is not None and time.monotonic() - self._admin_key_checked > (
            ADMIN_KEY_CHECK_SECONDS
        ):
            try:
                await meta_service_pb2_grpc.MetaServiceStub(channel).GetServerInfo(
                    meta_service_pb2.GetServerInfoRequest(),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=5,
                )
                self._admin_key_checked = time.monotonic()
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise Unauthenticated(
                        f"the scheduler refuses this key: {error.details()}"
                    ) from None
                log.warning("admin call: the scheduler cannot check the key: %s", error.details())
        return Principal(environment_id="", environment_slug="", rights=frozenset({RIGHT_EXECUTE}))

    # -- the stream ----------------------------------------------------------------------------

    def _send(self, message: wpb.ConnectRequest) -> None:
        if self._outgoing is not None and self.connected:
            self._outgoing.put_nowait(message)
        elif message.WhichOneof("message") in REPORTS:
            self._unsent.append(message)

    def _on_pool_event(self, report: Report) -> None:
        match report:
            case Started(attempt_id=attempt_id):
                self.starts.started(attempt_id)
            case Result(attempt_id=attempt_id, result=result):
                self.counts.finished(result)
                message = result_message(attempt_id, result)
                started_at = self.starts.ended(attempt_id)
                if started_at is not None:
                    message.result.started_at.FromMilliseconds(started_at)
                self._send(message)
            case Metadata(attempt_id=attempt_id, update=update):
                self.starts.release(attempt_id)  # the scheduler sees the start before this
                self._send(metadata_message(attempt_id, update))
            case Logs(entries=entries):  # of any attempts: they release nothing
                self._send(logs_message(entries))
            case Wait(attempt_id=attempt_id, seq=seq, request=request):
                self.starts.release(attempt_id)
                self._send(wpb.ConnectRequest(wait=waits.wait_request(attempt_id, seq, request)))

    async def _connect_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._session()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as error:
                self.counts.stream_failed()
                if error.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    log.error("the scheduler refused this executor: %s", error.details())
                    self._key_refused = True
                elif (
                    error.code() == grpc.StatusCode.FAILED_PRECONDITION
                    and "protocol version" in (error.details() or "")
                    and self._protocol_version > 1
                ):
                    log.warning(
                        "the scheduler does not speak worker protocol version %d (%s); "
                        "registering with version 1",
                        self._protocol_version,
                        error.details(),
                    )
                    self._protocol_version = 1
                else:
                    log.warning("scheduler stream ended: %s %s", error.code().name, error.details())
            except Exception:
                self.counts.stream_failed()
                log.exception("scheduler stream failed")
            self.connected = False
            log.info("reconnecting to the scheduler in %.1f s", backoff)
            await asyncio.sleep(backoff)
            # Capped well below a lease: after a scheduler restart the attempts this executor
            # runs are only its own again once it reconnects and claims them, and a reconnect
            # that waited past the lease would see them run a second time elsewhere.
            backoff = min(backoff * 2, RECONNECT_BACKOFF_CAP)

    async def _session(self) -> None:
        outgoing: asyncio.Queue[wpb.ConnectRequest | None] = asyncio.Queue()
        self._registered_draining = self.draining
        outgoing.put_nowait(
            wpb.ConnectRequest(
                register=wpb.Register(
                    protocol_version=self._protocol_version,
                    executor_id=self.executor_id,
                    session_token=self._session_token,
                    manifest=self.manifest,
                    capacity=0 if self.draining else self.settings.capacity,
                    # Attempts with results still to report are ours too.
                    running_attempt_ids=[
                        *self.pool.running_attempts(),
                        *(m.result.attempt_id for m in self._unsent if m.HasField("result")),
                    ],
                )
            )
        )

        batches = False  # the scheduler answered a version with batches

        async def requests() -> AsyncIterator[wpb.ConnectRequest]:
            while (message := await outgoing.get()) is not None:
                if not batches or outgoing.empty():
                    yield message
                    continue
                # Version 2: the reports queued meanwhile go in one message, in order.
                reports = [message]
                end = False
                while not outgoing.empty() and len(reports) < MAX_BATCH:
                    more = outgoing.get_nowait()
                    if more is None:
                        end = True
                        break
                    reports.append(more)
                yield wpb.ConnectRequest(batch=wpb.ReportBatch(reports=reports))
                if end:
                    return

        async with open_channel(self.settings.api_url, self.settings.tls) as channel:
            stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
            self._channel = channel
            call = stub.Connect(
                requests(), metadata=(("authorization", f"Bearer {self.settings.secret_key}"),)
            )
            heartbeat: asyncio.Task[None] | None = None
            try:
                async for response in call:
                    if response.WhichOneof("message") == "registered":
                        registered = response.registered
                        self._session_token = registered.session_token
                        self._key_refused = False
                        self._outgoing = outgoing
                        self.connected = True
                        batches = registered.protocol_version >= BATCHES
                        for message in self._unsent:
                            outgoing.put_nowait(message)
                        self._unsent.clear()
                        if self.draining:
                            outgoing.put_nowait(
                                wpb.ConnectRequest(heartbeat=wpb.Heartbeat(draining=True))
                            )
                        interval = registered.heartbeat_interval_ms / 1000 or 2.0
                        heartbeat = asyncio.create_task(self._heartbeat(outgoing, interval))
                        log.info("connected to the scheduler at %s", self.settings.api_url)
                    elif response.WhichOneof("message") == "batch":
                        for one in response.batch.messages:
                            self._received(one)
                    else:
                        self._received(response)
            finally:
                self.connected = False
                self._outgoing = None
                self._channel = None
                # Reports the stream never took go out again on the next connection.
                while not outgoing.empty():
                    left = outgoing.get_nowait()
                    if left is not None and left.WhichOneof("message") in REPORTS:
                        self._unsent.append(left)
                if heartbeat is not None:
                    heartbeat.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await heartbeat

    def _received(self, response: wpb.ConnectResponse) -> None:
        """One of the scheduler's messages after the registration (alone or from a batch)."""
        kind = response.WhichOneof("message")
        if kind == "assignment":
            a = response.assignment
            if self.pool.has(a.attempt_id):
                # A duplicate of an attempt running here: acknowledged again, never run twice
                # (docs/worker-protocol.md).
                log.info("attempt %s assigned again: acknowledged", a.attempt_id)
                self._send(wpb.ConnectRequest(ack=wpb.AssignmentAck(attempt_id=a.attempt_id)))
                return
            self.counts.assigned()
            self.starts.assigned(a.attempt_id)
            self.pool.submit(
                assignment_to_attempt(a, self.tasks.get(a.run.task_id), self.manifest.version)
            )
        elif kind == "cancel":
            self.pool.cancel(response.cancel.attempt_id)
        elif kind == "run_canceled":
            c = response.run_canceled
            assignment = wpb.Assignment(
                run=c.run,
                attempt_id="",
                environment_slug=c.environment_slug,
                environment_id=c.environment_id,
            )
            task = self.tasks.get(c.run.task_id)
            self.pool.cancel_hooks(assignment_to_attempt(assignment, task, self.manifest.version))
        elif kind == "resume":
            r = response.resume
            self.pool.resume(r.attempt_id, waits.resume_results(r))

    async def _heartbeat(
        self, outgoing: asyncio.Queue[wpb.ConnectRequest | None], interval: float
    ) -> None:
        while True:
            await asyncio.sleep(interval)
            outgoing.put_nowait(wpb.ConnectRequest(heartbeat=wpb.Heartbeat(draining=self.draining)))


class _ExecutorServicer(executor_service_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    async def GetExecutorStatus(
        self, request: epb.GetExecutorStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> epb.GetExecutorStatusResponse:
        return epb.GetExecutorStatusResponse(status=self.executor.status())

    async def DrainExecutor(
        self, request: epb.DrainExecutorRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> epb.DrainExecutorResponse:
        self.executor.drain()
        return epb.DrainExecutorResponse(status=self.executor.status())

    async def ResumeExecutor(
        self, request: epb.ResumeExecutorRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> epb.ResumeExecutorResponse:
        self.executor.resume()
        return epb.ResumeExecutorResponse(status=self.executor.status())


async def _serve(settings: ExecutorSettings) -> None:
    telemetry.setup(TelemetrySettings.from_env("runplane-executor"))
    executor = Executor(settings)
    await executor.start()
    log.info("executor status service on 127.0.0.1:%d", executor.port)
    if executor.http_url:
        log.info("executor HTTP (/metrics, /healthz, /readyz) on %s", executor.http_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("executor stopping")
    await executor.stop()
    telemetry.shutdown()


def main(
    modules: list[str],
    *,
    processes: int | None = None,
    capacity: int | None = None,
    max_resident_waits: int | None = None,
    evict_waits_after: float | None = None,
    version: str | None = None,
) -> None:
    """``runplane executor``: the settings from the environment, where the command line's
    (those not None) win."""
    configure_logging()
    settings = ExecutorSettings.from_env(
        modules,
        processes=processes,
        capacity=capacity,
        max_resident_waits=max_resident_waits,
        evict_waits_after=evict_waits_after,
        version=version,
    )
    run_async(_serve(settings))


__all__ = ["Executor", "main"]
