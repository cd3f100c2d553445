"""Client side of run subscriptions: resumes transparently after a broken stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from runplane._errors import from_rpc_error
from runplane._models import RunStatus
from runplane.v1 import realtime_service_pb2, realtime_service_pb2_grpc, run_pb2

log = logging.getLogger("runplane.realtime")

_FINAL = frozenset(status.to_pb() for status in RunStatus if status.is_final)

# A realtime service that restarts, or a connection that drops, ends the stream with one of these
# (INTERNAL: an HTTP/2 stream reset mid-response). Anything else is the server's answer.
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL})
_FIRST_BACKOFF = 0.1


async def subscribe_to_run(
    channel: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    run_id: str,
    *,
    stop_on_completion: bool = True,
    after_version: int = 0,
    max_backoff: float = 5.0,
    give_up_after: float = 120.0,
) -> AsyncIterator[run_pb2.Run]:
    """Every version of the run newer than ``after_version``, in order, each once.

    Ends after a final status when ``stop_on_completion``. A broken stream (the realtime service
    restarting, a dropped connection) is resumed after a back-off from the last version yielded;
    other failures raise the SDK's typed ``ApiError``. A realtime service that stays
    unreachable for ``give_up_after`` seconds (a wrong address, say) raises ``UnavailableError``.
    """
    stub = realtime_service_pb2_grpc.RealtimeServiceStub(channel)
    last = after_version
    backoff = _FIRST_BACKOFF
    loop = asyncio.get_running_loop()
    broken_since: float | None = None
    while True:
        request = realtime_service_pb2.SubscribeToRunRequest(
            run_id=run_id, after_version=last, keep_open=not stop_on_completion
        )
        call = stub.SubscribeToRun(request, metadata=metadata)
        started = loop.time()
        try:
            async for response in call:
                run: run_pb2.Run = response.run
                if run.version <= last:
                    continue  # the server resends nothing old; this guards a buggy one
                last = run.version
                backoff = _FIRST_BACKOFF
                broken_since = None
                yield run
                if stop_on_completion and run.status in _FINAL:
                    return
            # The server ends a stream early only when there is nothing newer to send.
            return
        except grpc.aio.AioRpcError as error:
            if error.code() not in _RESUMABLE:
                raise from_rpc_error(error) from None
            if loop.time() - started > 1.0:
                broken_since = None  # it was connected: a break, not an unreachable service
            broken_since = broken_since or loop.time()
            if loop.time() - broken_since > give_up_after:
                raise from_rpc_error(error) from None
            log.info(
                "subscription to %s broke (%s: %s); resuming after version %d in %.1f s",
                run_id,
                error.code().name,
                error.details(),
                last,
                backoff,
            )
        finally:
            # The caller may stop iterating early (break, cancel): end the RPC with it.
            call.cancel()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff)
