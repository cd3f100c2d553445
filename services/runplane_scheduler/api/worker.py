"""WorkerService: one bidirectional stream per executor, between the executor and the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from runplane.v1 import (
    worker_service_pb2 as wpb,
)
from runplane.v1 import (
    worker_service_pb2_grpc,
)
from runplane_common.auth import principal
from runplane_common.config import SchedulerSettings
from runplane_common.errors import InvalidArgument
from runplane_scheduler import validation
from runplane_scheduler.api import Context
from runplane_scheduler.engine import RunEngine

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
