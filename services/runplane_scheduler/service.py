"""gRPC servicers of the scheduler: RunService, WorkerService and MetaService."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from runplane.v1 import (
    meta_service_pb2 as mpb,
)
from runplane.v1 import (
    meta_service_pb2_grpc,
    run_service_pb2_grpc,
    worker_service_pb2_grpc,
)
from runplane.v1 import (
    run_service_pb2 as rpb,
)
from runplane.v1 import (
    worker_service_pb2 as wpb,
)
from runplane_scheduler import validation
from runplane_scheduler.engine import RunEngine
from runplane_scheduler.store import run_to_pb
from runplane_server.auth import principal
from runplane_server.config import SchedulerSettings
from runplane_server.errors import InvalidArgument, NotFound

log = logging.getLogger("runplane.scheduler")

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class RunServicer(run_service_pb2_grpc.RunServiceServicer):
    def __init__(self, engine: RunEngine, settings: SchedulerSettings) -> None:
        self.engine = engine
        self.limits = settings.limits

    async def TriggerRun(
        self, request: rpb.TriggerRunRequest, context: Context
    ) -> rpb.TriggerRunResponse:
        spec = validation.trigger(request, self.limits)
        row, cached = await self.engine.trigger(principal().environment_id, spec)
        return rpb.TriggerRunResponse(run=run_to_pb(row), is_cached=cached)

    async def GetRun(self, request: rpb.GetRunRequest, context: Context) -> rpb.GetRunResponse:
        run_id = validation.run_id(request.run_id)
        row = await self.engine.store.get_run(principal().environment_id, run_id)
        if row is None:
            raise NotFound(f"run {run_id} not found")
        return rpb.GetRunResponse(run=run_to_pb(row))

    async def ListRuns(
        self, request: rpb.ListRunsRequest, context: Context
    ) -> rpb.ListRunsResponse:
        size = validation.page_size(request.page_size, self.limits.page_size)
        for i, t in enumerate(request.task_ids):
            validation.task_id(t, f"task_ids[{i}]")
        for i, tag in enumerate(request.tags):
            validation.text(f"tags[{i}]", tag, self.limits.tag_length)
        rows = await self.engine.store.list_runs(
            principal().environment_id,
            statuses=validation.statuses(list(request.statuses)),
            task_ids=list(request.task_ids),
            tags=list(request.tags),
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
        rows = await self.engine.list_logs(
            principal().environment_id,
            run_id,
            validation.decode_log_page_token(request.page_token),
            size + 1,
        )
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
            )
        )

        async def read() -> None:
            async for msg in request_iterator:
                try:
                    self.engine.on_message(ex, msg)
                except Exception:
                    log.exception("message from executor %s failed: %s", ex.executor_id, msg)

        reader = asyncio.create_task(read(), name=f"executor-{ex.executor_id}")
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
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.engine.executor_disconnected(ex)


class MetaServicer(meta_service_pb2_grpc.MetaServiceServicer):
    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings

    async def GetServerInfo(
        self, request: mpb.GetServerInfoRequest, context: Context
    ) -> mpb.GetServerInfoResponse:
        from runplane import __version__

        return mpb.GetServerInfoResponse(
            realtime_url=self.settings.realtime_url,
            version=__version__,
            environment=principal().environment_slug,
        )
