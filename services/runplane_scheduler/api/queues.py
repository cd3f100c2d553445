"""QueueService: list, read, pause, resume and override the limits of queues."""

from __future__ import annotations

from typing import Any

from runplane.v1 import queue_service_pb2 as qpb
from runplane.v1 import (
    queue_service_pb2_grpc,
)
from runplane_common.auth import principal
from runplane_common.config import SchedulerSettings
from runplane_common.errors import InvalidArgument
from runplane_scheduler import validation
from runplane_scheduler.api import Context
from runplane_scheduler.engine import RunEngine
from runplane_scheduler.store import now_ms, timestamp


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
        filters = validation.page_filters(request)
        after = validation.decode_page_token(request.page_token, validation.TASK_ID, filters)
        rows = await self.engine.store.list_queues(principal().environment_id, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return qpb.ListQueuesResponse(
            queues=await self._queues_pb(rows),
            next_page_token=validation.encode_page_token(rows[-1].name, filters) if more else "",
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
