"""WorkerService: one bidirectional stream per executor, between the executor and the engine.

The servicer owns the worker plane's protobuf: it checks each ``ConnectRequest`` and turns it
into a :mod:`runplane_scheduler.worker_messages` report for the engine (:func:`registration`,
:func:`report`), and turns what the engine puts on the executor's outbox into a
``ConnectResponse`` as it is sent (:func:`response`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, assert_never

from runplane.v1 import run_pb2, worker_service_pb2_grpc
from runplane.v1 import worker_service_pb2 as wpb
from runplane_common import protocol
from runplane_common.auth import principal
from runplane_common.config import Limits, SchedulerSettings
from runplane_common.errors import InvalidArgument, ServiceError
from runplane_scheduler import validation
from runplane_scheduler.api import Context
from runplane_scheduler.engine import RunEngine
from runplane_scheduler.retry import RetryPolicy
from runplane_scheduler.specs import TaskDef
from runplane_scheduler.store import run_to_pb
from runplane_scheduler.worker_messages import (
    Ack,
    Assignment,
    AttemptResult,
    CancelAttempt,
    ChildRuns,
    Heartbeat,
    LogBatch,
    LogEntry,
    ManifestTask,
    MetadataOperation,
    MetadataUpdate,
    Registration,
    Resume,
    RunCanceled,
    RunError,
    Started,
    ToExecutor,
    WaitRequest,
    WaitResult,
    WorkerReport,
)

log = logging.getLogger("runplane.scheduler")


class WorkerServicer(worker_service_pb2_grpc.WorkerServiceServicer):
    """One bidirectional stream per executor."""

    def __init__(self, engine: RunEngine, settings: SchedulerSettings) -> None:
        self.engine = engine
        self.settings = settings

    async def Connect(
        self, request_iterator: AsyncIterator[wpb.ConnectRequest], context: Context
    ) -> AsyncIterator[wpb.ConnectResponse]:
        env = principal().environment_id
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "register":
            raise InvalidArgument("register", "the first message on a stream must be a Register")
        outbox: asyncio.Queue[ToExecutor] = asyncio.Queue()
        register = validation.register(first.register)
        ex = await self.engine.register_executor(env, registration(register), outbox)
        version = protocol.effective_version(register.protocol_version)
        yield wpb.ConnectResponse(
            registered=wpb.Registered(
                executor_id=ex.executor_id,
                heartbeat_interval_ms=int(self.settings.heartbeat_interval * 1000),
                session_token=ex.session_token,
                protocol_version=version,
            )
        )
        limits = self.settings.limits

        async def read() -> None:
            async for msg in request_iterator:
                for one in unbatched(msg):
                    try:
                        self.engine.on_message(ex, report(one, limits))
                    except Exception:
                        log.exception("message from executor %s failed: %s", ex.executor_id, one)

        reader = asyncio.create_task(read(), name=f"executor-{ex.executor_id}")
        get: asyncio.Future[ToExecutor] | None = None
        try:
            while True:
                get = asyncio.ensure_future(outbox.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                if version < protocol.BATCHES:
                    yield response(get.result())
                    while not outbox.empty():
                        yield response(outbox.get_nowait())
                    continue
                # Version 2: what the engine queued meanwhile goes in one message.
                messages = [response(get.result())]
                while not outbox.empty() and len(messages) < protocol.MAX_BATCH:
                    messages.append(response(outbox.get_nowait()))
                if len(messages) == 1:
                    yield messages[0]
                else:
                    yield wpb.ConnectResponse(batch=wpb.ResponseBatch(messages=messages))
        finally:
            if get is not None:
                get.cancel()  # the stream ended (or was cancelled) while waiting for the outbox
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.engine.executor_disconnected(ex)


# -- protobuf to the engine ------------------------------------------------------------------------


def registration(message: wpb.Register) -> Registration:
    """A registration (checked by :func:`validation.register`) with its tasks' definitions."""
    return Registration(
        executor_id=message.executor_id,
        capacity=message.capacity,
        manifest=tuple(
            ManifestTask(task_def(t), cron=t.schedule.cron, timezone=t.schedule.timezone)
            for t in message.manifest.tasks
        ),
        running_attempt_ids=tuple(message.running_attempt_ids),
        session_token=message.session_token,
        version=message.manifest.version,
    )


def task_def(t: wpb.TaskDefinition) -> TaskDef:
    """A manifest's task as the engine defines it, with the defaults of unset fields."""
    return TaskDef(
        task_id=t.id,
        queue=t.queue or f"task/{t.id}",
        queue_concurrency_limit=t.queue_concurrency_limit,
        retry=RetryPolicy(
            max_attempts=t.retry.max_attempts or 3,
            factor=t.retry.factor or 2.0,
            min_timeout=t.retry.min_timeout_seconds or 1.0,
            max_timeout=t.retry.max_timeout_seconds or 60.0,
            randomize=t.retry.randomize,
        )
        if t.HasField("retry")
        else RetryPolicy(),
        max_duration=int(t.max_duration_seconds),
        machine=t.machine or "small-1x",
        ttl_ms=int(t.ttl_seconds * 1000),
        queue_rate_limit=t.queue_rate_limit,
        queue_rate_period=t.queue_rate_period_seconds,
        queue_total_limit=t.queue_total_concurrency_limit,
        payload_schema=t.payload_schema,
    )


def unbatched(msg: wpb.ConnectRequest) -> list[wpb.ConnectRequest]:
    """The reports a message carries: itself, or a batch's (protocol version 2), in order. A
    batch inside a batch, or a Register in one, carries nothing the engine acts on."""
    if msg.WhichOneof("message") != "batch":
        return [msg]
    return [m for m in msg.batch.reports if m.WhichOneof("message") not in ("batch", "register")]


def report(msg: wpb.ConnectRequest, limits: Limits) -> WorkerReport | None:
    """A message of a registered executor as the engine's report; None for one the engine does
    not act on (none set, or another Register)."""
    kind = msg.WhichOneof("message")
    if kind == "heartbeat":
        return Heartbeat(draining=msg.heartbeat.draining)
    if kind == "ack":
        return Ack(attempt_id=msg.ack.attempt_id)
    if kind == "started":
        return Started(attempt_id=msg.started.attempt_id, started_at=ms(msg.started, "started_at"))
    if kind == "result":
        return attempt_result(msg.result)
    if kind == "metadata":
        update = msg.metadata
        return MetadataUpdate(
            run_id=update.run_id,
            attempt_id=update.attempt_id,
            operations=tuple(
                MetadataOperation(type=o.type, key=o.key, value=o.value) for o in update.operations
            ),
        )
    if kind == "logs":
        return LogBatch(
            entries=tuple(
                LogEntry(
                    run_id=e.run_id,
                    attempt_id=e.attempt_id,
                    attempt_number=e.attempt_number,
                    level=e.level,
                    message=e.message,
                    attributes=e.attributes,
                    time=int(e.time.ToMilliseconds()),
                    trace_id=e.trace_id,
                    span_id=e.span_id,
                )
                for e in msg.logs.entries
            )
        )
    if kind == "wait":
        return wait_request(msg.wait, limits)
    return None


def ms(message: Any, field: str) -> int:
    """A Timestamp field in milliseconds, 0 when unset."""
    return int(getattr(message, field).ToMilliseconds()) if message.HasField(field) else 0


def attempt_result(result: wpb.AttemptResult) -> AttemptResult:
    return AttemptResult(
        attempt_id=result.attempt_id,
        output=result.output if result.WhichOneof("outcome") == "output" else None,
        error=RunError(
            type=result.error.type,
            message=result.error.message,
            stack_trace=result.error.stack_trace,
        ),
        skip_retrying=result.skip_retrying,
        canceled=result.canceled,
        lost=result.lost,
        retry_delay_ms=result.retry_delay_ms if result.HasField("retry_delay_ms") else None,
        retry_at=int(result.retry_at.ToMilliseconds()) if result.HasField("retry_at") else None,
        timed_out=result.timed_out,
        out_of_memory=result.out_of_memory,
        retry_machine=result.retry_machine,
        started_at=ms(result, "started_at"),
    )


def wait_request(req: wpb.WaitRequest, limits: Limits) -> WaitRequest:
    """A wait request; child runs are checked here as a batch's items, and a bad one is kept
    as the error the wait completes with."""
    kind = req.WhichOneof("wait")
    children = None
    if kind == "children":
        try:
            children = ChildRuns(
                specs=tuple(
                    validation.trigger_spec(
                        item.task_id, item.payload, item.options, limits, f"items[{i}]."
                    )
                    for i, item in enumerate(req.children.items)
                )
            )
        except ServiceError as e:
            children = ChildRuns(invalid=e)
    return WaitRequest(
        attempt_id=req.attempt_id,
        seq=req.seq,
        duration_ms=req.duration_ms if kind == "duration_ms" else None,
        until_ms=req.until_ms if kind == "until_ms" else None,
        token_id=req.token_id if kind == "token_id" else None,
        children=children,
        idempotency_key=req.idempotency_key,
        idempotency_key_ttl_ms=req.idempotency_key_ttl_ms,
        traceparent=req.traceparent,
    )


# -- the engine to protobuf ------------------------------------------------------------------------


def response(message: ToExecutor) -> wpb.ConnectResponse:
    """What the engine sends an executor, as the stream's message."""
    if isinstance(message, Assignment):
        return wpb.ConnectResponse(
            assignment=wpb.Assignment(
                run=run_to_pb(message.run),
                attempt_id=message.attempt_id,
                attempt_number=message.attempt_number,
                traceparent=message.traceparent,
                environment_slug=message.environment_slug,
                environment_id=message.environment_id,
            )
        )
    if isinstance(message, CancelAttempt):
        return wpb.ConnectResponse(
            cancel=wpb.CancelAttempt(attempt_id=message.attempt_id, run_id=message.run_id)
        )
    if isinstance(message, Resume):
        return wpb.ConnectResponse(
            resume=wpb.Resume(
                attempt_id=message.attempt_id, results=[result_pb(r) for r in message.results]
            )
        )
    if isinstance(message, RunCanceled):
        return wpb.ConnectResponse(
            run_canceled=wpb.RunCanceled(
                run=run_to_pb(message.run),
                environment_slug=message.environment_slug,
                environment_id=message.environment_id,
            )
        )
    assert_never(message)


def result_pb(result: WaitResult) -> wpb.WaitResult:
    out = wpb.WaitResult(seq=result.seq, ok=result.ok, output=result.output)
    if result.error is not None:
        out.error.CopyFrom(
            run_pb2.RunError(
                type=result.error.type,
                message=result.error.message,
                stack_trace=result.error.stack_trace,
            )
        )
    return out
