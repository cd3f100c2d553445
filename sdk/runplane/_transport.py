"""The transport of a client: its gRPC channels (one per event loop and target), the RunService
stub, the headers of every call (the key, the W3C trace context), the call wrapper that turns a
gRPC status into the SDK's typed error, paging, the realtime service's address, and the event
loop thread of the synchronous twins.

Every namespace (``client.runs``, ``client.queues``, the module-level ``runs``, ...) makes its
calls through one :class:`Transport`: its client's, or the default client's
(:func:`default_transport`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
from opentelemetry import propagate

from runplane._errors import ConfigurationError, from_rpc_error
from runplane.tls import TlsSettings, open_channel
from runplane.v1 import meta_service_pb2, meta_service_pb2_grpc, run_service_pb2_grpc

T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


class _LoopThread:
    """A daemon thread running an event loop, for the synchronous twins."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="runplane-sync", daemon=True).start()
                self._loop = loop
            return self._loop

    def run(self, coro: Awaitable[T]) -> T:
        async def wrapper() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop()).result()

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        while True:
            try:
                yield self.run(agen.__anext__())
            except StopAsyncIteration:
                return


class Transport:
    """How a client reaches runplane: ``api_url`` (the scheduler) with ``secret_key``, over
    ``tls``; the realtime service at ``realtime_url``, or where the scheduler says it is."""

    def __init__(self, api_url: str, secret_key: str, realtime_url: str, tls: TlsSettings) -> None:
        self.api_url = api_url
        self.secret_key = secret_key
        self.realtime_url = realtime_url
        self.tls = tls
        self._channels: dict[tuple[int, str], grpc.aio.Channel] = {}
        self._run_stubs: dict[int, run_service_pb2_grpc.RunServiceStub] = {}
        self._sync = _LoopThread()

    def channel(self, target: str | None = None) -> grpc.aio.Channel:
        """The gRPC channel to ``target`` (default: the scheduler) for the running event loop."""
        target = target or self.api_url
        key = (id(asyncio.get_running_loop()), target)
        channel = self._channels.get(key)
        if channel is None:
            channel = open_channel(target, self.tls, options=CHANNEL_OPTIONS)
            self._channels[key] = channel
        return channel

    def run_stub(self) -> run_service_pb2_grpc.RunServiceStub:
        """The RunService stub on the current loop's channel (built once: a stub makes a
        callable per method, which costs more than the call it is for)."""
        channel = self.channel()
        stub = self._run_stubs.get(id(channel))
        if stub is None:
            stub = self._run_stubs[id(channel)] = run_service_pb2_grpc.RunServiceStub(channel)
        return stub

    async def realtime_channel(self) -> grpc.aio.Channel:
        """The channel to the realtime service (its address asked of the scheduler once, when
        not configured)."""
        if not self.realtime_url:
            stub = meta_service_pb2_grpc.MetaServiceStub(self.channel())
            info = await self.call(stub.GetServerInfo, meta_service_pb2.GetServerInfoRequest())
            if not info.realtime_url:
                raise ConfigurationError(
                    "the scheduler announces no realtime service; set RUNPLANE_REALTIME_URL"
                )
            self.realtime_url = info.realtime_url
        return self.channel(self.realtime_url)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The headers of a call: the key, and the current span's trace context."""
        if not self.secret_key:
            raise ConfigurationError(
                "no secret key: pass Client(secret_key=...) or set RUNPLANE_SECRET_KEY "
                "(`runplane dev` writes one to .runplane/dev.env)"
            )
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return (("authorization", f"Bearer {self.secret_key}"), *carrier.items())

    async def call(
        self, method: Callable[..., Any], request: Any, timeout: float | None = 30
    ) -> Any:
        """Call a unary ``method`` of a stub; a failure raises the SDK's typed error. A call no
        scheduler replica could take (one is taking over from another: the status's reason is
        NO_LEADER, and nothing was done) is retried within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                return await method(request, metadata=self.metadata(), timeout=left)
            except grpc.aio.AioRpcError as error:
                failure = from_rpc_error(error)
                pause = failure.retry_after or 0.5
                if failure.reason != NO_LEADER or (
                    deadline is not None and time.monotonic() + pause >= deadline
                ):
                    raise failure from None
            await asyncio.sleep(pause)

    async def paged(
        self, method: Callable[..., Any], request: Any, items: str, limit: int | None = None
    ) -> AsyncIterator[Any]:
        """Every item (field ``items``) of a paged List call, a page at a time; at most
        ``limit``."""
        count = 0
        while True:
            response = await self.call(method, request)
            for pb in getattr(response, items):
                yield pb
                count += 1
                if limit is not None and count >= limit:
                    return
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def run_sync(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` on this transport's event loop thread (for the synchronous twins)."""
        return self._sync.run(coro)

    def iterate_sync(self, agen: AsyncIterator[T]) -> Iterator[T]:
        return self._sync.iterate(agen)

    async def close(self) -> None:
        """Close the running event loop's channels."""
        loop_id = id(asyncio.get_running_loop())
        for key in [k for k in self._channels if k[0] == loop_id]:
            channel = self._channels.pop(key)
            self._run_stubs.pop(id(channel), None)
            await channel.close()


# The reason of a call no scheduler replica could take (see Transport.call).
NO_LEADER = "NO_LEADER"

_default: Callable[[], Transport] | None = None


def provide_default(provider: Callable[[], Transport]) -> None:
    """Set where :func:`default_transport` comes from (``runplane._client`` sets it: the
    default client's)."""
    global _default
    _default = provider


def default_transport() -> Transport:
    """The default client's transport: what the module-level namespaces call through."""
    if _default is None:
        raise ConfigurationError("runplane is not imported")  # runplane/__init__ provides it
    return _default()
