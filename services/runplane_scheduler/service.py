"""gRPC servicers of the scheduler: RunService, WorkerService and MetaService."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
import orjson
from sqlalchemy import exc as sa_exc

from runplane.v1 import (
    meta_service_pb2 as mpb,
)
from runplane.v1 import (
    meta_service_pb2_grpc,
    queue_service_pb2_grpc,
    run_pb2,
    run_service_pb2_grpc,
    waitpoint_service_pb2_grpc,
    worker_service_pb2_grpc,
)
from runplane.v1 import queue_service_pb2 as qpb
from runplane.v1 import (
    run_service_pb2 as rpb,
)
from runplane.v1 import waitpoint_service_pb2 as wspb
from runplane.v1 import (
    worker_service_pb2 as wpb,
)
from runplane_common import auth
from runplane_common.auth import principal
from runplane_common.config import SchedulerSettings
from runplane_common.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from runplane_scheduler import keys, validation
from runplane_scheduler.engine import RunEngine
from runplane_scheduler.engine.waitpoints import token_status
from runplane_scheduler.keys import PublicTokens
from runplane_scheduler.states import FINAL, Status
from runplane_scheduler.store import now_ms, run_to_pb, timestamp

log = logging.getLogger("runplane.scheduler")

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class RunServicer(run_service_pb2_grpc.RunServiceServicer):
    def __init__(
        self, engine: RunEngine, settings: SchedulerSettings, tokens: PublicTokens | None = None
    ) -> None:
        self.engine = engine
        self.limits = settings.limits
        self.tokens = tokens

    async def TriggerRun(
        self, request: rpb.TriggerRunRequest, context: Context
    ) -> rpb.TriggerRunResponse:
        who = principal()
        auth.authorize_trigger(who, request.task_id)
        if who.is_public:
            auth.authorize_trigger_options(who, [f.name for f, _ in request.options.ListFields()])
        spec = validation.trigger(request, self.limits)
        guard = keys.SingleUse(who) if who.single_use else None
        try:
            row, cached = await self.engine.trigger(who.environment_id, spec, guard)
        except sa_exc.IntegrityError:
            if guard is None:
                raise
            raise Unauthenticated(keys.SingleUse.USED) from None  # another scheduler took it
        run = run_to_pb(row)
        token = ""
        if self.tokens is not None:
            token = await self.tokens.read_token(who, "runs", run.id)
        return rpb.TriggerRunResponse(run=run, is_cached=cached, public_access_token=token)

    async def GetRun(self, request: rpb.GetRunRequest, context: Context) -> rpb.GetRunResponse:
        run_id = validation.run_id(request.run_id)
        who = principal()
        row = await self.engine.store.get_run(who.environment_id, run_id)
        if row is None:
            if who.is_public:  # a token learns nothing, not even whether a run exists
                raise PermissionDenied(f"this public access token may not read run {run_id}")
            raise NotFound(f"run {run_id} not found")
        run = run_to_pb(row)
        auth.authorize_read(who, run.id, run.tags, run.batch_id)
        return rpb.GetRunResponse(run=run)

    async def ListRuns(
        self, request: rpb.ListRunsRequest, context: Context
    ) -> rpb.ListRunsResponse:
        validation.filter_sizes(request, ("task_ids", "tags", "statuses"), self.limits)
        size = validation.page_size(request.page_size, self.limits.page_size)
        for i, t in enumerate(request.task_ids):
            validation.task_id(t, f"task_ids[{i}]")
        for i, tag in enumerate(request.tags):
            validation.text(f"tags[{i}]", tag, self.limits.tag_length)
        auth.authorize_list(principal(), request.tags, request.batch_id)
        rows = await self.engine.store.list_runs(
            principal().environment_id,
            statuses=validation.statuses(list(request.statuses)),
            task_ids=list(request.task_ids),
            tags=list(request.tags),
            batch_id=validation.batch_id(request.batch_id) if request.batch_id else "",
            created_after=validation.timestamp_ms("created_after", request.created_after)
            if request.HasField("created_after")
            else None,
            created_before=validation.timestamp_ms("created_before", request.created_before)
            if request.HasField("created_before")
            else None,
            before_id=validation.decode_page_token(request.page_token),
            limit=size + 1,
        )
        more = len(rows) > size
        rows = rows[:size]
        return rpb.ListRunsResponse(
            runs=[run_to_pb(r) for r in rows],
            next_page_token=validation.encode_page_token(rows[-1].id) if more else "",
        )

    async def CancelRun(
        self, request: rpb.CancelRunRequest, context: Context
    ) -> rpb.CancelRunResponse:
        run_id = validation.run_id(request.run_id)
        row = await self.engine.cancel(principal().environment_id, run_id)
        return rpb.CancelRunResponse(run=run_to_pb(row))

    async def BatchTriggerRuns(
        self, request: rpb.BatchTriggerRunsRequest, context: Context
    ) -> rpb.BatchTriggerRunsResponse:
        specs = validation.batch(request, self.limits)
        batch_id, rows, cached = await self.engine.batch_trigger(
            principal().environment_id, specs, request.idempotency_key
        )
        return rpb.BatchTriggerRunsResponse(
            batch_id=batch_id, runs=[run_to_pb(r) for r in rows], is_cached=cached
        )

    async def GetBatch(
        self, request: rpb.GetBatchRequest, context: Context
    ) -> rpb.GetBatchResponse:
        batch_id = validation.batch_id(request.batch_id)
        # Before the lookup: a token learns nothing of batches outside its scope.
        auth.authorize_batch(principal(), batch_id)
        batch, runs = await self.engine.store.get_batch(principal().environment_id, batch_id)
        final = [r.status for r in runs if Status(r.status) in FINAL]
        if len(final) < len(runs):
            status = rpb.BATCH_STATUS_PROCESSING
        elif all(s == Status.COMPLETED for s in final):
            status = rpb.BATCH_STATUS_COMPLETED
        else:
            status = rpb.BATCH_STATUS_PARTIAL_FAILED
        return rpb.GetBatchResponse(
            batch=rpb.Batch(
                id=batch.id,
                status=status,
                run_count=batch.run_count,
                run_ids=[r.id for r in runs],
                idempotency_key=batch.idempotency_key or "",
                created_at=timestamp(batch.created_at),
            )
        )

    async def ReplayRun(
        self, request: rpb.ReplayRunRequest, context: Context
    ) -> rpb.ReplayRunResponse:
        run_id = validation.run_id(request.run_id)
        row = await self.engine.replay(principal().environment_id, run_id)
        return rpb.ReplayRunResponse(run=run_to_pb(row))

    async def RescheduleRun(
        self, request: rpb.RescheduleRunRequest, context: Context
    ) -> rpb.RescheduleRunResponse:
        run_id = validation.run_id(request.run_id)
        if request.HasField("delay") == request.HasField("delay_until"):
            raise InvalidArgument("delay", "give exactly one of delay and delay_until")
        if request.HasField("delay"):
            delay_until = now_ms() + validation.duration_ms("delay", request.delay)
        else:
            delay_until = validation.timestamp_ms("delay_until", request.delay_until)
        row = await self.engine.reschedule(principal().environment_id, run_id, delay_until)
        return rpb.RescheduleRunResponse(run=run_to_pb(row))

    async def ResetIdempotencyKey(
        self, request: rpb.ResetIdempotencyKeyRequest, context: Context
    ) -> rpb.ResetIdempotencyKeyResponse:
        task = validation.task_id(request.task_id)
        if not request.idempotency_key:
            raise InvalidArgument("idempotency_key", "must not be empty")
        key = validation.text(
            "idempotency_key", request.idempotency_key, self.limits.idempotency_key_length
        )
        released = await self.engine.reset_idempotency_key(principal().environment_id, task, key)
        return rpb.ResetIdempotencyKeyResponse(released=released)

    async def UpdateRunMetadata(
        self, request: rpb.UpdateRunMetadataRequest, context: Context
    ) -> rpb.UpdateRunMetadataResponse:
        run_id = validation.run_id(request.run_id)
        metadata = validation.metadata_object("metadata", request.metadata, self.limits)
        row = await self.engine.update_metadata(principal().environment_id, run_id, metadata)
        return rpb.UpdateRunMetadataResponse(run=run_to_pb(row))

    async def AddRunTags(
        self, request: rpb.AddRunTagsRequest, context: Context
    ) -> rpb.AddRunTagsResponse:
        run_id = validation.run_id(request.run_id)
        tags = validation.tags_to_add(list(request.tags), self.limits)
        row = await self.engine.add_tags(principal().environment_id, run_id, tags)
        return rpb.AddRunTagsResponse(run=run_to_pb(row))

    async def ListRunLogs(
        self, request: rpb.ListRunLogsRequest, context: Context
    ) -> rpb.ListRunLogsResponse:
        run_id = validation.run_id(request.run_id)
        size = validation.log_page_size(request.page_size)
        after = validation.decode_page_token(request.page_token, validation.LOG_ID)
        env = principal().environment_id
        # Logs are stored by the run id the executor reported; the run itself must be the
        # caller's, as for GetRun.
        if await self.engine.store.get_run(env, run_id) is None:
            raise NotFound(f"run {run_id} not found")
        rows = await self.engine.list_logs(env, run_id, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        response = rpb.ListRunLogsResponse(
            next_page_token=validation.encode_page_token(rows[-1].id) if more else ""
        )
        for row in rows:
            entry = response.entries.add(
                run_id=row.run_id,
                attempt_id=row.attempt_id,
                attempt_number=row.attempt_number,
                level=row.level,
                message=row.message,
                attributes=row.attributes,
                trace_id=row.trace_id,
                span_id=row.span_id,
            )
            entry.time.FromMilliseconds(row.time)
        return response


class QueueServicer(queue_service_pb2_grpc.QueueServiceServicer):
    """QueueService: counts come from the database, pauses and overrides persist there."""

    def __init__(self, engine: RunEngine, settings: SchedulerSettings) -> None:
        self.engine = engine
        self.limits = settings.limits

    async def _queue_pb(self, row: Any) -> qpb.Queue:
        [queue] = await self._queues_pb([row])
        return queue

    async def _queues_pb(self, rows: list[Any]) -> list[qpb.Queue]:
        counts = await self.engine.store.queue_counts(
            principal().environment_id, [r.name for r in rows]
        )
        out = []
        for r in rows:
            running, queued = counts[r.name]
            queue = qpb.Queue(
                id=r.id,
                name=r.name,
                running=running,
                queued=queued,
                paused=r.paused,
                concurrency_limit=r.concurrency_limit
                if r.limit_override is None
                else r.limit_override,
                base_concurrency_limit=r.concurrency_limit,
            )
            if r.limit_override is not None:
                queue.override_concurrency_limit = r.limit_override
                if (at := timestamp(r.overridden_at)) is not None:
                    queue.overridden_at.CopyFrom(at)
            out.append(queue)
        return out

    async def ListQueues(
        self, request: qpb.ListQueuesRequest, context: Context
    ) -> qpb.ListQueuesResponse:
        size = validation.page_size(request.page_size, self.limits.page_size)
        after = validation.decode_page_token(request.page_token, validation.TASK_ID)
        rows = await self.engine.store.list_queues(principal().environment_id, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return qpb.ListQueuesResponse(
            queues=await self._queues_pb(rows),
            next_page_token=validation.encode_page_token(rows[-1].name) if more else "",
        )

    async def GetQueue(
        self, request: qpb.GetQueueRequest, context: Context
    ) -> qpb.GetQueueResponse:
        name = validation.queue_ref(request.queue)
        rows = await self.engine.store.find_queue(principal().environment_id, name)
        return qpb.GetQueueResponse(queue=await self._queue_pb(rows))

    async def _update(self, queue: str, **values: Any) -> qpb.Queue:
        row = await self.engine.update_queue(
            principal().environment_id, validation.queue_ref(queue), **values
        )
        return await self._queue_pb(row)

    async def PauseQueue(
        self, request: qpb.PauseQueueRequest, context: Context
    ) -> qpb.PauseQueueResponse:
        return qpb.PauseQueueResponse(queue=await self._update(request.queue, paused=True))

    async def ResumeQueue(
        self, request: qpb.ResumeQueueRequest, context: Context
    ) -> qpb.ResumeQueueResponse:
        return qpb.ResumeQueueResponse(queue=await self._update(request.queue, paused=False))

    async def OverrideQueueConcurrencyLimit(
        self, request: qpb.OverrideQueueConcurrencyLimitRequest, context: Context
    ) -> qpb.OverrideQueueConcurrencyLimitResponse:
        if not 0 <= request.concurrency_limit <= 100_000:
            raise InvalidArgument(
                "concurrency_limit", f"must be 0..100000, got {request.concurrency_limit}"
            )
        queue = await self._update(
            request.queue, limit_override=request.concurrency_limit, overridden_at=now_ms()
        )
        return qpb.OverrideQueueConcurrencyLimitResponse(queue=queue)

    async def ResetQueueConcurrencyLimit(
        self, request: qpb.ResetQueueConcurrencyLimitRequest, context: Context
    ) -> qpb.ResetQueueConcurrencyLimitResponse:
        queue = await self._update(request.queue, limit_override=None, overridden_at=None)
        return qpb.ResetQueueConcurrencyLimitResponse(queue=queue)


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
        outbox: asyncio.Queue[wpb.ConnectResponse] = asyncio.Queue()
        ex = await self.engine.register_executor(env, validation.register(first.register), outbox)
        yield wpb.ConnectResponse(
            registered=wpb.Registered(
                executor_id=ex.executor_id,
                heartbeat_interval_ms=int(self.settings.heartbeat_interval * 1000),
                session_token=ex.session_token,
            )
        )

        async def read() -> None:
            async for msg in request_iterator:
                try:
                    self.engine.on_message(ex, msg)
                except Exception:
                    log.exception("message from executor %s failed: %s", ex.executor_id, msg)

        reader = asyncio.create_task(read(), name=f"executor-{ex.executor_id}")
        get: asyncio.Future[wpb.ConnectResponse] | None = None
        try:
            while True:
                get = asyncio.ensure_future(outbox.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    yield get.result()
                    while not outbox.empty():
                        yield outbox.get_nowait()
                else:
                    get.cancel()
                    break
        finally:
            if get is not None:
                get.cancel()  # the stream ended (or was cancelled) while waiting for the outbox
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.engine.executor_disconnected(ex)


class MetaServicer(meta_service_pb2_grpc.MetaServiceServicer):
    def __init__(self, settings: SchedulerSettings, http_url: str = "") -> None:
        self.settings = settings
        self.http_url = http_url

    async def GetServerInfo(
        self, request: mpb.GetServerInfoRequest, context: Context
    ) -> mpb.GetServerInfoResponse:
        from runplane import __version__

        return mpb.GetServerInfoResponse(
            realtime_url=self.settings.realtime_url,
            version=__version__,
            environment=principal().environment_slug,
            http_url=self.http_url,
            realtime_http_url=self.settings.realtime_http_url,
            environment_id=principal().environment_id,
        )


class WaitpointServicer(waitpoint_service_pb2_grpc.WaitpointServiceServicer):
    """Wait tokens: create, complete, read."""

    def __init__(
        self,
        engine: RunEngine,
        settings: SchedulerSettings,
        http_url: str,
        tokens: PublicTokens,
    ) -> None:
        self.waits = engine.waits
        self.limits = settings.limits
        self.http_url = http_url
        self.tokens = tokens

    def _token_pb(self, m: Any) -> wspb.WaitToken:
        error = None
        if m["error"]:
            e = orjson.loads(m["error"])
            error = run_pb2.RunError(type=e.get("type", ""), message=e.get("message", ""))
        return wspb.WaitToken(
            id=m["id"],
            status=wspb.WaitpointStatus.Value(f"WAITPOINT_STATUS_{token_status(m)}"),
            url=f"{self.http_url}/api/v1/waitpoints/tokens/{m['id']}/complete?secret={m['secret']}",
            idempotency_key=m["idempotency_key"] or "",
            idempotency_key_expires_at=timestamp(m["idempotency_key_expires_at"]),
            tags=orjson.loads(m["tags"]),
            timeout_at=timestamp(m["due_at"]),
            created_at=timestamp(m["created_at"]),
            completed_at=timestamp(m["completed_at"]),
            output=m["output"] or "",
            error=error,
        )

    async def CreateToken(
        self, request: wspb.CreateTokenRequest, context: Context
    ) -> wspb.CreateTokenResponse:
        tags = list(validation.tag_list("tags", list(request.tags), self.limits))
        validation.text(
            "idempotency_key", request.idempotency_key, self.limits.idempotency_key_length
        )
        row, cached = await self.waits.create_token(
            principal().environment_id,
            timeout_ms=validation.duration_ms("timeout", request.timeout, minimum_ms=1)
            if request.HasField("timeout")
            else 0,
            idempotency_key=request.idempotency_key,
            idempotency_key_ttl_ms=validation.duration_ms(
                "idempotency_key_ttl", request.idempotency_key_ttl, minimum_ms=1000
            )
            if request.HasField("idempotency_key_ttl")
            else 0,
            tags=tags,
        )
        who = principal()
        access = await self.tokens.mint(
            who, [f"write:waitpoints:{row['id']}"], now_ms() + TOKEN_ACCESS_LIFETIME_MS
        )
        return wspb.CreateTokenResponse(
            token=self._token_pb(row), is_cached=cached, public_access_token=access
        )

    async def CompleteToken(
        self, request: wspb.CompleteTokenRequest, context: Context
    ) -> wspb.CompleteTokenResponse:
        token_id = _token_id(request.token_id)
        auth.authorize_complete_token(principal(), token_id)
        data = validation.json_text(
            "data",
            request.data,
            self.limits.payload_bytes,
            "payload",
            default="null",
            depth=self.limits.json_depth,
        )
        row = await self.waits.complete_token(token_id, data, env=principal().environment_id)
        return wspb.CompleteTokenResponse(token=self._token_pb(row))

    async def GetToken(
        self, request: wspb.GetTokenRequest, context: Context
    ) -> wspb.GetTokenResponse:
        row = await self.waits.get_token(principal().environment_id, _token_id(request.token_id))
        return wspb.GetTokenResponse(token=self._token_pb(row))

    async def ListTokens(
        self, request: wspb.ListTokensRequest, context: Context
    ) -> wspb.ListTokensResponse:
        validation.filter_sizes(request, ("tags", "statuses"), self.limits)
        size = validation.page_size(request.page_size, self.limits.page_size)
        statuses = []
        for i, v in enumerate(request.statuses):
            if v not in wspb.WaitpointStatus.values() or v == wspb.WAITPOINT_STATUS_UNSPECIFIED:
                raise InvalidArgument(f"statuses[{i}]", f"{v} is not a waitpoint status")
            statuses.append(wspb.WaitpointStatus.Name(v).removeprefix("WAITPOINT_STATUS_"))
        for i, tag in enumerate(request.tags):
            validation.text(f"tags[{i}]", tag, self.limits.tag_length)
        validation.text(
            "idempotency_key", request.idempotency_key, self.limits.idempotency_key_length
        )
        after = validation.decode_page_token(request.page_token, TOKEN_ID)
        rows = await self.waits.list_tokens(
            principal().environment_id,
            statuses=statuses,
            tags=list(request.tags),
            idempotency_key=request.idempotency_key,
            after=after,
            limit=size + 1,
        )
        more = len(rows) > size
        rows = rows[:size]
        return wspb.ListTokensResponse(
            tokens=[self._token_pb(r) for r in rows],
            next_page_token=validation.encode_page_token(rows[-1]["id"]) if more else "",
        )


TOKEN_ID = re.compile(r"^waitpoint_[0-9a-z]{1,36}\Z")
TOKEN_ACCESS_LIFETIME_MS = 24 * 3600 * 1000


def _token_id(value: str, field: str = "token_id") -> str:
    if not TOKEN_ID.match(value):
        raise InvalidArgument(field, f"{value[:80]!r} is not a token id (waitpoint_...)")
    return value
