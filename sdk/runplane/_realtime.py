"""Client side of run subscriptions: resumes transparently after a broken stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from runplane._errors import from_rpc_error
from runplane.v1 import realtime_service_pb2, realtime_service_pb2_grpc, run_pb2

_FINAL = frozenset(
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
_RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)


async def subscribe_to_run(
    channel: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    run_id: str,
    *,
    stop_on_completion: bool = True,
    after_version: int = 0,
    max_backoff: float = 5.0,
) -> AsyncIterator[run_pb2.Run]:
    """Every version of the run newer than ``after_version``, in order. A broken stream is
    resumed from the last version yielded, so nothing is missed or repeated."""
    stub = realtime_service_pb2_grpc.RealtimeServiceStub(channel)
    last = after_version
    backoff = 0.1
    while True:
        request = realtime_service_pb2.SubscribeToRunRequest(
            run_id=run_id, after_version=last, keep_open=not stop_on_completion
        )
        try:
            async for response in stub.SubscribeToRun(request, metadata=metadata):
                if response.run.version <= last:
                    continue
                last = response.run.version
                backoff = 0.1
                yield response.run
                if stop_on_completion and response.run.status in _FINAL:
                    return
            return
        except grpc.aio.AioRpcError as error:
            if error.code() not in _RETRYABLE:
                raise from_rpc_error(error) from None
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff)
