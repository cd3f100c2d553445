"""The gRPC server factory and the one interceptor for auth, tracing and error mapping.

It knows no database: a service whose calls can fail on one passes :data:`ErrorMapper` s that
turn those failures into statuses (the scheduler's are in ``runplane_scheduler.store.errors``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from runplane.tls import TlsSettings
from runplane_common import deadlines, telemetry
from runplane_common.auth import Principal, authorize_method, current_principal
from runplane_common.errors import (
    ERROR_DOMAIN,
    Code,
    InvalidArgument,
    ServiceError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("runplane.grpc")

Authenticator = Callable[[str], Awaitable[Principal]]

# Methods callable without credentials.
PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            text = value if isinstance(value, str) else value.decode()
            return text.removeprefix("Bearer ").strip()
    return ""


# The gRPC status code of each error code (the same name and number).
STATUS_CODES = {code: grpc.StatusCode[code.name] for code in Code}


def to_status(error: ServiceError) -> status_pb2.Status:
    """The ``google.rpc.Status`` a call that failed with ``error`` answers with: its code and
    message, with a BadRequest detail naming an invalid field, a RetryInfo detail when it is
    worth a retry (UNAVAILABLE), and an ErrorInfo detail when the error has a reason."""
    status = status_pb2.Status(code=error.code.value, message=error.message)
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.problem
        )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    if isinstance(error, Unavailable):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(error.retry_after_seconds * 1e9))
        status.details.add().Pack(retry)
    if error.reason:
        info = error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=error.info
        )
        status.details.add().Pack(info)
    return status


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError) -> None:
    status = to_status(error)
    await context.abort(
        STATUS_CODES[error.code],
        error.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )


# A service's own mapping of exceptions it knows (a database's, say) to the status a call answers
# with; None for an exception it does not know.
ErrorMapper = Callable[[Exception], ServiceError | None]


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError) -> None:
    """End the call with ``error``'s status and details."""
    await _abort(context, error)


def as_service_error(error: Exception, mappers: Sequence[ErrorMapper] = ()) -> ServiceError:
    """The status a failed call answers with: its own, the first of ``mappers`` that knows the
    error, UNAVAILABLE for a failure of the network, or a logged INTERNAL."""
    if isinstance(error, ServiceError):
        return error
    for mapper in mappers:
        mapped = mapper(error)
        if mapped is not None:
            return mapped
    # A failure to reach a dependency under the call: worth a retry.
    if isinstance(error, ConnectionError | OSError):
        return unavailable(error)
    return _internal(error)


def _internal(error: BaseException) -> ServiceError:
    """A bug: logged with its traceback here, never shown to the caller (it may hold SQL)."""
    log.error("call failed", exc_info=error)
    return ServiceError(f"internal error ({type(error).__name__}); it has been logged")


def unavailable(error: BaseException) -> Unavailable:
    """A dependency under the call could not be reached: logged here, worth a retry."""
    log.warning("call failed on an unavailable dependency: %r", error)
    return Unavailable(f"a dependency is unavailable ({type(error).__name__}); retry later")


# A stream's credentials are checked again this often while it lasts, so a key revoked while an
# executor's stream (or any long stream) is open ends it within seconds.
REAUTHENTICATE_SECONDS = 2.0


async def _reauthenticate(
    authenticate: Authenticator, key: str, serving: asyncio.Task[Any], refused: list[ServiceError]
) -> None:
    """Check ``key`` every REAUTHENTICATE_SECONDS until cancelled; once it is refused, note why
    in ``refused`` and cancel ``serving``, the call's task, which answers with that status."""
    while True:
        await asyncio.sleep(REAUTHENTICATE_SECONDS)
        try:
            await authenticate(key)
        except Unauthenticated as error:
            refused.append(error)
            serving.cancel()
            return
        except Exception as error:  # the database unreachable is not a revocation
            log.debug("stream re-authentication failed: %r", error)


class ServiceInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates the caller, continues the caller's trace and maps ServiceError to a status."""

    def __init__(
        self, authenticate: Authenticator | None, map_errors: Sequence[ErrorMapper] = ()
    ) -> None:
        self._authenticate = authenticate
        self._map_errors = tuple(map_errors)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_PREFIXES):
            return handler
        method = details.method
        authenticate = self._authenticate
        map_errors = self._map_errors
        parse = handler.request_deserializer

        def decode(raw: bytes) -> Any:
            # Requests arrive as bytes and are parsed here, so a malformed body is the caller's
            # INVALID_ARGUMENT rather than grpc's UNKNOWN.
            try:
                return parse(raw) if parse is not None else raw
            except Exception:
                raise InvalidArgument(
                    "request", f"the body could not be parsed as a request of {method}"
                ) from None

        async def decode_stream(raws: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            async for raw in raws:
                yield decode(raw)

        async def enter(context: grpc.aio.ServicerContext[Any, Any]) -> object:
            metadata = context.invocation_metadata()
            deadlines.set_caller_deadline(context.time_remaining())
            ctx = telemetry.context_from_metadata(metadata)
            token = otel_context.attach(ctx)
            if authenticate is not None:
                key = bearer_token(metadata)
                if not key:
                    raise Unauthenticated("missing `authorization: Bearer <secret key>` metadata")
                who = await authenticate(key)
                authorize_method(who, method)
                current_principal.set(who)
            return token

        def wrap_unary(behavior: Any) -> Any:
            async def call(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    request = decode(raw)
                    await enter(context)
                    with telemetry.tracer().start_as_current_span(
                        method, kind=trace.SpanKind.SERVER
                    ):
                        return await behavior(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as error:
                    await _abort(context, as_service_error(error, map_errors))

            return call

        def wrap_stream(behavior: Any, streaming: bool) -> Any:
            async def call(
                raw: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                refused: list[ServiceError] = []
                watch: asyncio.Task[None] | None = None
                span: trace.Span | None = None
                try:
                    request = decode_stream(raw) if streaming else decode(raw)
                    await enter(context)
                    if not streaming:
                        # A server-streaming call (a subscription) is one span for the stream's
                        # life; the servicer adds what it follows as attributes. A bidirectional
                        # stream is a session (an executor's Connect), not one call: no span,
                        # or everything it carries would sit under it.
                        span = telemetry.tracer().start_span(method, kind=trace.SpanKind.SERVER)
                        otel_context.attach(trace.set_span_in_context(span))
                    serving = asyncio.current_task()
                    if authenticate is not None and serving is not None:
                        key = bearer_token(context.invocation_metadata())
                        watch = asyncio.create_task(
                            _reauthenticate(authenticate, key, serving, refused)
                        )
                    async for item in behavior(request, context):
                        yield item
                except asyncio.CancelledError:
                    if not refused:
                        raise
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    _failed(span, refused[0])
                    await _abort(context, refused[0])
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    _failed(span, error)
                    await _abort(context, as_service_error(error, map_errors))
                finally:
                    if watch is not None:
                        watch.cancel()
                    if span is not None:
                        span.end()

            return call

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream, streaming=False),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                wrap_stream(handler.stream_stream, streaming=True),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        return handler


def _failed(span: trace.Span | None, error: BaseException) -> None:
    if span is not None:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))


# Server reflection is served as grpc.reflection.v1 (what grpcurl and `buf curl` try first) and
# v1alpha. grpcio-reflection implements only v1alpha (grpc/grpc#38576); v1 is the same protocol
# renamed, with the same messages and field numbers (grpc-proto's grpc/reflection/v1), so one
# servicer answers both. Its file, derived from v1alpha's, goes in the default pool so reflection
# clients can describe the v1 service too.
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"


def _add_reflection_v1_file() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return  # another library's v1 module got there first
    except KeyError:
        pass
    v1alpha = reflection_pb2.DESCRIPTOR.package
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    old, new = f".{v1alpha}.", f".{proto.package}."
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    proto.options.Clear()  # v1alpha's are deprecated = true and its Java/Go names
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    pool.AddSerializedFile(proto.SerializeToString())


_add_reflection_v1_file()


def _add_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serve reflection v1 and v1alpha on ``server``, listing ``service_names`` and both."""
    servicer = reflection.aio.ReflectionServicer(
        [*service_names, reflection.SERVICE_NAME, REFLECTION_V1_SERVICE]
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE, {"ServerReflectionInfo": v1}),)
    )


class Server:
    """A grpc.aio server with health, reflection and a graceful stop; TLS when ``tls`` has a
    certificate (see :mod:`runplane.tls`). ``map_errors`` map the exceptions of the service's
    own dependencies to statuses (see :func:`as_service_error`)."""

    def __init__(
        self,
        authenticate: Authenticator | None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        tls: TlsSettings | None = None,
        map_errors: Sequence[ErrorMapper] = (),
        max_pending_calls: int = 0,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ):
        """``max_pending_calls``: calls that may wait to be taken in at once before gRPC
        cancels the rest (0: gRPC's default, 1,000; the hard limit is three times it).
        ``interceptors`` see each call before authentication (a replica's forwarding)."""
        self.tls = tls or TlsSettings()
        pending = (
            [
                ("grpc.server.max_pending_requests", max_pending_calls),
                ("grpc.server.max_pending_requests_hard_limit", 3 * max_pending_calls),
            ]
            if max_pending_calls
            else []
        )
        self.grpc = grpc.aio.server(
            interceptors=[*interceptors, ServiceInterceptor(authenticate, map_errors)],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
                *pending,
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self._service_names: list[str] = [
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        ]
        self.port = 0

    def add(
        self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any, name: str
    ) -> None:
        register(servicer, self.grpc)
        self._service_names.append(name)

    async def start(self, address: str) -> int:
        """Listen on ``address`` (``host:0`` picks a free port) and return the port."""
        _add_reflection(self.grpc, self._service_names)
        if self.tls.serves_tls:
            self.port = self.grpc.add_secure_port(address, self.tls.server_credentials())
        else:
            self.port = self.grpc.add_insecure_port(address)
        await self.grpc.start()
        for name in self._service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace)
