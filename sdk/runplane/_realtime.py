"""Client side of subscriptions and stream reads: each resumes transparently after a broken
stream, from the last version (per run) or chunk index it yielded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from runplane._errors import from_rpc_error
from runplane._models import RunStatus
from runplane.v1 import realtime_service_pb2, realtime_service_pb2_grpc, run_pb2

log = logging.getLogger("runplane.realtime")

_FINAL = frozenset(status.to_pb() for status in RunStatus if status.is_final)

# A realtime service that restarts, or a connection that drops, ends the stream with one of these
# (INTERNAL: an HTTP/2 stream reset mid-response). Anything else is the server's answer.
# CANCELLED too: a call this side did not cancel (that raises CancelledError here) was shed by
# the service (more calls arriving at once than it takes in; a replica shutting down).
_RESUMABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED}
)
# The service cuts off a subscriber that reads too slowly (RESOURCE_EXHAUSTED with this reason):
# it resumes from the last version it yielded, like after a break.
_FELL_BEHIND = "SUBSCRIBER_FELL_BEHIND"
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
    resumer = _Resumer(f"subscription to {run_id}", max_backoff, give_up_after)
    while True:
        request = realtime_service_pb2.SubscribeToRunRequest(
            run_id=run_id, after_version=last, keep_open=not stop_on_completion
        )
        call = stub.SubscribeToRun(request, metadata=metadata)
        resumer.connecting()
        try:
            async for response in call:
                run: run_pb2.Run = response.run
                if run.version <= last:
                    continue  # the server resends nothing old; this guards a buggy one
                last = run.version
                resumer.delivered()
                yield run
                if stop_on_completion and run.status in _FINAL:
                    return
            # The server ends a stream early only when there is nothing newer to send.
            return
        except grpc.aio.AioRpcError as error:
            await resumer.broke(error, f"after version {last}")
        finally:
            # The caller may stop iterating early (break, cancel): end the RPC with it.
            call.cancel()


class _Resumer:
    """Back-off and give-up bookkeeping for a stream that may break and be resumed."""

    def __init__(self, what: str, max_backoff: float, give_up_after: float) -> None:
        self._what = what
        self._max_backoff = max_backoff
        self._give_up_after = give_up_after
        self._backoff = _FIRST_BACKOFF
        self._loop = asyncio.get_running_loop()
        self._broken_since: float | None = None
        self.started = 0.0

    def connecting(self) -> None:
        self.started = self._loop.time()

    def delivered(self) -> None:
        self._backoff = _FIRST_BACKOFF
        self._broken_since = None

    async def broke(self, error: grpc.aio.AioRpcError, resume_from: str) -> None:
        """Wait before resuming, or raise the typed error if it is not a break."""
        if error.code() not in _RESUMABLE and not _fell_behind(error):
            raise from_rpc_error(error) from None
        now = self._loop.time()
        if now - self.started > 1.0:
            self._broken_since = None  # it was connected: a break, not an unreachable service
        self._broken_since = self._broken_since or now
        if now - self._broken_since > self._give_up_after:
            raise from_rpc_error(error) from None
        log.info(
            "%s broke (%s: %s); resuming %s in %.1f s",
            self._what,
            error.code().name,
            error.details(),
            resume_from,
            self._backoff,
        )
        await asyncio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, self._max_backoff)


def _fell_behind(error: grpc.aio.AioRpcError) -> bool:
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # details that do not match the status: not the service's own
        return False
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.reason == _FELL_BEHIND:
            return True
    return False


async def subscribe_to_run_set(
    call: Callable[[dict[str, int], int], Any],
    what: str,
    *,
    max_backoff: float = 5.0,
    give_up_after: float = 120.0,
) -> AsyncIterator[run_pb2.Run]:
    """Every version newer than the last yielded of each run in a set (tag or batch), in order
    per run; never ends by itself. ``call(after_versions, resume_cursor)`` opens the server
    stream; a resumed one replays the changes since the last cursor received."""
    versions: dict[str, int] = {}
    cursor = 0
    resumer = _Resumer(what, max_backoff, give_up_after)
    while True:
        stream = call(dict(versions), cursor)
        resumer.connecting()
        try:
            async for response in stream:
                resumer.delivered()
                for change in (response, *response.more_changes):
                    run: run_pb2.Run = change.run
                    cursor = change.cursor or cursor
                    if run.version <= versions.get(run.id, 0):
                        continue
                    versions[run.id] = run.version
                    yield run
            return
        except grpc.aio.AioRpcError as error:
            await resumer.broke(error, f"after the versions of {len(versions)} runs")
        finally:
            stream.cancel()


def subscribe_to_runs_with_tag(
    channel: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    tag: str,
    created_after: datetime,
) -> AsyncIterator[run_pb2.Run]:
    stub = realtime_service_pb2_grpc.RealtimeServiceStub(channel)

    def call(versions: dict[str, int], cursor: int) -> Any:
        request = realtime_service_pb2.SubscribeToRunsWithTagRequest(
            tag=tag,
            after_versions=versions,
            resume_cursor=cursor,
            max_changes_per_response=_CHANGES_PER_RESPONSE,
        )
        request.created_after.FromDatetime(created_after)
        return stub.SubscribeToRunsWithTag(request, metadata=metadata)

    return subscribe_to_run_set(call, f"subscription to tag {tag}")


def subscribe_to_batch(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], batch_id: str
) -> AsyncIterator[run_pb2.Run]:
    stub = realtime_service_pb2_grpc.RealtimeServiceStub(channel)

    def call(versions: dict[str, int], cursor: int) -> Any:
        request = realtime_service_pb2.SubscribeToBatchRequest(
            batch_id=batch_id,
            after_versions=versions,
            resume_cursor=cursor,
            max_changes_per_response=_CHANGES_PER_RESPONSE,
        )
        return stub.SubscribeToBatch(request, metadata=metadata)

    return subscribe_to_run_set(call, f"subscription to batch {batch_id}")


# Chunks that are ready together come in one ReadStream response, up to this many.
_CHUNKS_PER_RESPONSE = 256
# Changes of a set subscription that are ready together come in one response, up to this many.
_CHANGES_PER_RESPONSE = 64


async def read_stream(
    channel: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    run_id: str,
    stream_id: str,
    *,
    after_index: int = 0,
    max_backoff: float = 5.0,
    give_up_after: float = 120.0,
) -> AsyncIterator[tuple[int, str]]:
    """(index, JSON text) of each chunk after ``after_index``, in order, each once; ends when
    the stream closes or the run has finished."""
    stub = realtime_service_pb2_grpc.RealtimeServiceStub(channel)
    last = after_index
    resumer = _Resumer(f"stream {stream_id} of {run_id}", max_backoff, give_up_after)
    while True:
        request = realtime_service_pb2.ReadStreamRequest(
            run_id=run_id,
            stream_id=stream_id,
            after_index=last,
            max_chunks_per_response=_CHUNKS_PER_RESPONSE,
        )
        call = stub.ReadStream(request, metadata=metadata)
        resumer.connecting()
        try:
            async for response in call:
                resumer.delivered()
                if response.index > last:
                    last = response.index
                    yield response.index, response.data
                for chunk in response.more_chunks:
                    if chunk.index > last:
                        last = chunk.index
                        yield chunk.index, chunk.data
            return
        except grpc.aio.AioRpcError as error:
            await resumer.broke(error, f"after chunk {last}")
        finally:
            call.cancel()
