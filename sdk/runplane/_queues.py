"""``queues``: read queues (running and queued counts), pause and resume them, and override
their concurrency limits."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from runplane._models import QueueInfo, _dt
from runplane._namespace import Namespace
from runplane.v1 import queue_service_pb2 as qpb
from runplane.v1 import queue_service_pb2_grpc


def _info(q: qpb.Queue) -> QueueInfo:
    return QueueInfo(
        id=q.id,
        name=q.name,
        running=q.running,
        queued=q.queued,
        paused=q.paused,
        concurrency_limit=q.concurrency_limit or None,
        base_concurrency_limit=q.base_concurrency_limit or None,
        override_concurrency_limit=q.override_concurrency_limit
        if q.HasField("override_concurrency_limit")
        else None,
        overridden_at=_dt(q.overridden_at, q.HasField("overridden_at")),
    )


def _name(queue: Any) -> str:
    """A queue id, a name, or a ``queue(...)`` object."""
    return str(getattr(queue, "name", queue))


class QueuesAPI(Namespace):
    def _stub(self) -> queue_service_pb2_grpc.QueueServiceStub:
        return queue_service_pb2_grpc.QueueServiceStub(self._transport.channel())

    async def list(self, *, page_size: int = 25) -> AsyncIterator[QueueInfo]:
        """Every queue of the environment, by name, fetched a page at a time."""
        request = qpb.ListQueuesRequest(page_size=page_size)
        async for q in self._transport.paged(self._stub().ListQueues, request, "queues"):
            yield _info(q)

    def list_sync(self, **kwargs: Any) -> Iterator[QueueInfo]:
        return self._transport.iterate_sync(self.list(**kwargs))

    async def retrieve(self, queue: Any) -> QueueInfo:
        response = await self._transport.call(
            self._stub().GetQueue, qpb.GetQueueRequest(queue=_name(queue))
        )
        return _info(response.queue)

    def retrieve_sync(self, queue: Any) -> QueueInfo:
        return self._transport.run_sync(self.retrieve(queue))

    async def pause(self, queue: Any) -> QueueInfo:
        """Start nothing new from the queue; running runs finish, queued ones wait."""
        response = await self._transport.call(
            self._stub().PauseQueue, qpb.PauseQueueRequest(queue=_name(queue))
        )
        return _info(response.queue)

    def pause_sync(self, queue: Any) -> QueueInfo:
        return self._transport.run_sync(self.pause(queue))

    async def resume(self, queue: Any) -> QueueInfo:
        response = await self._transport.call(
            self._stub().ResumeQueue, qpb.ResumeQueueRequest(queue=_name(queue))
        )
        return _info(response.queue)

    def resume_sync(self, queue: Any) -> QueueInfo:
        return self._transport.run_sync(self.resume(queue))

    async def override_concurrency_limit(self, queue: Any, limit: int) -> QueueInfo:
        response = await self._transport.call(
            self._stub().OverrideQueueConcurrencyLimit,
            qpb.OverrideQueueConcurrencyLimitRequest(queue=_name(queue), concurrency_limit=limit),
        )
        return _info(response.queue)

    def override_concurrency_limit_sync(self, queue: Any, limit: int) -> QueueInfo:
        return self._transport.run_sync(self.override_concurrency_limit(queue, limit))

    async def reset_concurrency_limit(self, queue: Any) -> QueueInfo:
        """Back to the limit the code declares."""
        response = await self._transport.call(
            self._stub().ResetQueueConcurrencyLimit,
            qpb.ResetQueueConcurrencyLimitRequest(queue=_name(queue)),
        )
        return _info(response.queue)

    def reset_concurrency_limit_sync(self, queue: Any) -> QueueInfo:
        return self._transport.run_sync(self.reset_concurrency_limit(queue))


queues = QueuesAPI(None)
