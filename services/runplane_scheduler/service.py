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
from runplane_server import auth
from runplane_server.auth import PublicTokens, principal
from runplane_server.config import SchedulerSettings
from runplane_server.errors import InvalidArgument, NotFound, PermissionDenied

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
        spec = validation.trigger(request, self.limits)
        who = principal()
        auth.authorize_trigger(who, request.task_id)
        if self.tokens is not None:
            await self.tokens.consume(who)
        row, cached = await self.engine.trigger(who.environment_id, spec)
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
            created_after=validation.timestamp_ms("created_after", request.created_after)
            if request.HasField("created_after")
            else None,
            created_before=validation.timestamp_ms("created_before", request.created_before)
            if request.HasField("created_before")
            else None,
            before_id=validation.decode_page_token(request.page_token),
            limit=size + 1,
            batch_id=request.batch_id or None,
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
            realtime_http_url=self.settings.realtime_http_url,
            environment_id=principal().environment_id,
        )
