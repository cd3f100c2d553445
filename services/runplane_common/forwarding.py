"""Forwarding gRPC calls to another replica of the same service, unchanged.

A scheduler replica that does not lead answers every call by passing it to the one that does
(:class:`ForwardInterceptor`): the request's bytes, its metadata (the caller's key and trace
context) and its deadline go through, and the answer (or the status with its details) comes
back. Unary, server-streaming and bidirectional calls (an executor's session) are all forwarded,
so a client or an executor may be pointed at any replica.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc

from runplane.tls import TlsSettings, open_channel
from runplane_common.errors import ServiceError, Unavailable
from runplane_common.grpcserver import MAX_MESSAGE_BYTES, PUBLIC_PREFIXES, abort

log = logging.getLogger("runplane.forwarding")

# Set on a forwarded call: a replica that receives one and does not lead refuses it rather
# than forwarding it again (the leader changed meanwhile), so a call never goes round.
FORWARDED_BY = "x-runplane-forwarded-by"

# Headers gRPC sets itself; everything else the caller sent is passed on.
_OWN_HEADERS = ("user-agent", "content-type", "te", "host", "grpc-")


class Router(Protocol):
    """Where a call goes: None to serve it here, or the address of the replica that serves it;
    raises a ServiceError (UNAVAILABLE) when no replica can serve it now."""

    def route(self, forwarded: bool) -> str | None: ...

    @property
    def name(self) -> str: ...


class ForwardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Serves a call here or forwards it, as the router says; health and reflection are always
    answered here."""

    def __init__(self, router: Router, tls: TlsSettings) -> None:
        self._router = router
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(
                address,
                self._tls,
                options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ],
            )
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_PREFIXES):
            return handler
        forwarded = any(key == FORWARDED_BY for key, _ in details.invocation_metadata or ())
        try:
            address = self._router.route(forwarded)
        except ServiceError as error:
            return _refusal(handler, error)
        if address is None:
            return handler
        return self._forwarding(handler, details.method, address)

    def _forwarding(self, handler: Any, method: str, address: str) -> grpc.RpcMethodHandler:
        channel = self._channel(address)
        me = self._router.name

        def metadata(context: grpc.aio.ServicerContext[Any, Any]) -> list[tuple[str, Any]]:
            passed = [
                (key, value)
                for key, value in context.invocation_metadata() or ()
                if not key.startswith(":") and not key.startswith(_OWN_HEADERS)
            ]
            return [*passed, (FORWARDED_BY, me)]

        async def failed(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
            if isinstance(error, grpc.aio.AioRpcError):
                code = error.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    log.info("forwarding %s to %s: %s", method, address, error.details())
                # Its trailers (the status's details among them) go back as they came.
                trailers = tuple(error.trailing_metadata() or ())
                await context.abort(code, error.details() or "", trailers)
            raise error

        if handler.unary_unary:

            async def unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
                call = channel.unary_unary(method)
                try:
                    response: bytes = await call(
                        raw, metadata=metadata(context), timeout=context.time_remaining()
                    )
                except grpc.aio.AioRpcError as error:
                    await failed(context, error)
                    raise
                return response

            return grpc.unary_unary_rpc_method_handler(unary)

        if handler.unary_stream:

            async def server_stream(
                raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[bytes]:
                call = channel.unary_stream(method)(
                    raw, metadata=metadata(context), timeout=context.time_remaining()
                )
                try:
                    async for item in call:
                        yield item
                except grpc.aio.AioRpcError as error:
                    await failed(context, error)
                finally:
                    call.cancel()

            return grpc.unary_stream_rpc_method_handler(server_stream)

        async def bidi(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            call = channel.stream_stream(method)(
                requests, metadata=metadata(context), timeout=context.time_remaining()
            )
            try:
                async for item in call:
                    yield item
            except grpc.aio.AioRpcError as error:
                await failed(context, error)
            finally:
                call.cancel()

        return grpc.stream_stream_rpc_method_handler(bidi)


def _refusal(handler: Any, error: ServiceError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers with ``error``'s status."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await abort(context, error)

    async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await abort(context, error)
        yield b""  # pragma: no cover (abort raises)

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.stream_stream_rpc_method_handler(refuse_stream)


class NoLeader(Unavailable):
    """No replica can serve the call now (none leads, or this one is taking over): nothing was
    done, so the SDK retries it."""

    reason = "NO_LEADER"

    def __init__(self, why: str) -> None:
        super().__init__(f"no scheduler replica leads now ({why}); retry shortly", 0.5)
