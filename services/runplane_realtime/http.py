"""The realtime service's HTTP endpoints for browsers and plain HTTP clients.

    GET  /realtime/v1/runs/{run_id}?after_version=N      SSE: a run's versions (or Last-Event-ID)
    GET  /realtime/v1/runs?tag=T&created_after=MS        SSE: the runs with a tag
    GET  /realtime/v1/batches/{batch_id}                  SSE: the runs of a batch
    (both resume from ?resume_cursor= or Last-Event-ID: the changes since, in order)
    GET  /realtime/v1/streams/{run_id}/{stream_id}        SSE: a run stream's chunks
    POST /api/v1/tasks/{task_id}/trigger                  JSON {payload, options} → {id, ...}

Authorisation is the gRPC one (the scheduler checks every call): ``Authorization: Bearer <key or
token>``, or ``?token=`` for EventSource, which cannot set headers. A refusal is an HTTP status
with a JSON body before any event; a failure mid-stream is an ``error`` event. Every SSE stream
that ends by itself sends an ``end`` event first, so an EventSource can close instead of
reconnecting.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc
import orjson
from aiohttp import web
from google.protobuf import json_format

from runplane.v1 import run_pb2, run_service_pb2
from runplane_realtime.scheduler import Metadata
from runplane_realtime.server import Realtime, RealtimeServicer
from runplane_realtime.streams import Chunk
from runplane_server import errors
from runplane_server.config import Limits
from runplane_server.grpcserver import as_service_error

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
}
_JSON_TEXT_FIELDS = ("payload", "output", "metadata")
# An idle SSE stream sends a comment this often (seconds).
KEEPALIVE = 15.0
_END = object()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def run_json(run: run_pb2.Run) -> dict[str, Any]:
    """The run's public shape as JSON (proto3 JSON names), its JSON-text fields parsed."""
    shape: dict[str, Any] = json_format.MessageToDict(run, preserving_proto_field_name=True)
    for name in _JSON_TEXT_FIELDS:
        if name in shape:
            shape[name] = orjson.loads(shape[name])
    shape["version"] = run.version  # a number, not proto3 JSON's int64 string
    return shape


def _error_body(error: errors.ServiceError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": error.code.name, "message": error.message}
    if isinstance(error, errors.InvalidArgument):
        body["field"] = error.field
    return {"error": body}


def _error_response(error: errors.ServiceError) -> web.Response:
    return web.json_response(_error_body(error), status=_HTTP_STATUS.get(error.code, 500))


def _credentials(request: web.Request) -> Metadata:
    header = request.headers.get("Authorization", "")
    token = header.removeprefix("Bearer ").strip() if header else request.query.get("token", "")
    if not token:
        raise errors.Unauthenticated(
            "missing `Authorization: Bearer <key or token>` header or `token` query parameter"
        )
    return (("authorization", f"Bearer {token}"),)


def _int_param(request: web.Request, name: str, default: int = 0) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise errors.InvalidArgument(name, f"{raw!r} is not an integer") from None


def _resume_from(request: web.Request, name: str) -> int:
    """``?name=`` or, on an EventSource's reconnection, its Last-Event-ID."""
    last = request.headers.get("Last-Event-ID", "")
    if last.isdigit():
        return int(last)
    return _int_param(request, name)


def _run_event(run: run_pb2.Run) -> tuple[str, dict[str, Any]]:
    return str(run.version), run_json(run)


def _set_event(item: tuple[run_pb2.Run, int]) -> tuple[str, dict[str, Any]]:
    run, cursor = item
    return str(cursor) if cursor else "", run_json(run)


def _chunk_event(chunk: Chunk) -> tuple[str, dict[str, Any]]:
    return str(chunk.index), {"index": chunk.index, "data": orjson.loads(chunk.data)}


class HttpServer:
    """aiohttp in the realtime service's event loop."""

    def __init__(
        self, realtime: Realtime, servicer: RealtimeServicer, keepalive: float = KEEPALIVE
    ) -> None:
        self.keepalive = keepalive
        self._realtime = realtime
        self._servicer = servicer
        origins = [o.strip() for o in realtime.settings.cors_origins.split(",") if o.strip()]
        self._origins = origins or ["*"]
        # A trigger body carries a payload up to the payload limit, and its options.
        body_limit = Limits.from_env().payload_bytes + 1024 * 1024
        self.app = web.Application(middlewares=[self._middleware], client_max_size=body_limit)
        self.app.add_routes(
            [
                web.get("/realtime/v1/runs/{run_id}", self._run),
                web.get("/realtime/v1/runs", self._tag),
                web.get("/realtime/v1/batches/{batch_id}", self._batch),
                web.get("/realtime/v1/streams/{run_id}/{stream_id}", self._stream),
                web.post("/api/v1/tasks/{task_id}/trigger", self._trigger),
            ]
        )
        self._runner: web.AppRunner | None = None

    async def start(self, address: str) -> int:
        host, port = address.rsplit(":", 1)
        # handler_cancellation: a client that disconnects cancels its handler, and with it the
        # subscription and its consumer.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        tls = self._realtime.settings.tls
        site = web.TCPSite(
            self._runner,
            host,
            int(port),
            reuse_port=False,
            ssl_context=tls.server_ssl_context() if tls.serves_tls else None,
        )
        await site.start()
        # aiohttp keeps the listening server privately; port 0 needs the port it picked.
        server: Any = site._server
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin", "")
        if "*" in self._origins:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin in self._origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS":  # CORS preflight
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = (
                "Authorization, Content-Type, Last-Event-ID"
            )
            response.headers["Access-Control-Max-Age"] = "600"
            self._cors(request, response)
            return response
        try:
            async with self._servicer.tracked():
                return await handler(request)
        except web.HTTPException:
            raise
        except Exception as error:
            response = _error_response(as_service_error(error))
            self._cors(request, response)
            return response

    async def _run(self, request: web.Request) -> web.StreamResponse:
        opened = await self._realtime.open_run(
            _credentials(request),
            request.match_info["run_id"],
            _resume_from(request, "after_version"),
            request.query.get("keep_open", "") in ("1", "true"),
        )
        return await self._sse(request, opened, "run", _run_event)

    async def _tag(self, request: web.Request) -> web.StreamResponse:
        tag = request.query.get("tag", "")
        after = _int_param(request, "created_after", -1)
        opened = await self._realtime.open_tag(
            _credentials(request),
            tag,
            after if after >= 0 else None,
            {},
            _resume_from(request, "resume_cursor"),
        )
        return await self._sse(request, opened, "run", _set_event)

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        opened = await self._realtime.open_batch(
            _credentials(request),
            request.match_info["batch_id"],
            {},
            _resume_from(request, "resume_cursor"),
        )
        return await self._sse(request, opened, "run", _set_event)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        opened = await self._realtime.open_stream(
            _credentials(request),
            request.match_info["run_id"],
            request.match_info["stream_id"],
            _resume_from(request, "after_index"),
        )
        return await self._sse(request, opened, "chunk", _chunk_event)

    async def _sse(
        self,
        request: web.Request,
        opened: AsyncGenerator[Any, None],
        event: str,
        encode: Callable[[Any], tuple[str, dict[str, Any]]],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        self._cors(request, response)
        await response.prepare(request)
        following: asyncio.Future[Any] | None = None
        try:
            while True:
                if following is None:
                    following = asyncio.ensure_future(anext(opened, _END))
                done, _ = await asyncio.wait({following}, timeout=self.keepalive)
                if not done:
                    # A comment line: keeps proxies from closing an idle stream, and finds out
                    # when the client has gone.
                    await response.write(b": keepalive\n\n")
                    continue
                item, following = following.result(), None
                if item is _END:
                    break
                event_id, data = encode(item)
                head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
                await response.write(f"{head}data: {json.dumps(data)}\n\n".encode())
            await response.write(b"event: end\ndata: {}\n\n")
        except ConnectionResetError:  # aiohttp's "cannot write to closing transport" too
            pass  # the client went away
        except Exception as error:
            body = _error_body(as_service_error(error))
            await response.write(f"event: error\ndata: {json.dumps(body)}\n\n".encode())
        finally:
            # However the response ends, the subscription ends with it (and its consumer goes).
            if following is not None:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
            await opened.aclose()
        return response

    async def _trigger(self, request: web.Request) -> web.StreamResponse:
        credentials = _credentials(request)
        try:
            body = await request.json(loads=orjson.loads)
        except ValueError:
            raise errors.InvalidArgument("body", "must be a JSON object") from None
        if not isinstance(body, dict):
            raise errors.InvalidArgument("body", "must be a JSON object")
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise errors.InvalidArgument("options", "must be a JSON object")
        if isinstance(options.get("metadata"), dict):
            options = {**options, "metadata": orjson.dumps(options["metadata"]).decode()}
        trigger = run_service_pb2.TriggerRunRequest(
            task_id=request.match_info["task_id"],
            payload=orjson.dumps(body.get("payload")).decode(),
        )
        try:
            json_format.ParseDict(options, trigger.options)
        except json_format.ParseError as error:
            raise errors.InvalidArgument("options", str(error)) from None
        reply = await self._realtime.scheduler.trigger_run(trigger, credentials)
        response = web.json_response(
            {
                "id": reply.run.id,
                "isCached": reply.is_cached,
                "publicAccessToken": reply.public_access_token,
                "run": run_json(reply.run),
            }
        )
        self._cors(request, response)
        return response
