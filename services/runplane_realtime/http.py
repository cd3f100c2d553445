"""The realtime service's HTTP endpoints for browsers and plain HTTP clients.

    GET  /realtime/v1/runs/{run_id}?after_version=N      SSE: a run's versions (or Last-Event-ID)
    GET  /realtime/v1/runs?tag=T&created_after=MS        SSE: the runs with a tag
    GET  /realtime/v1/batches/{batch_id}                  SSE: the runs of a batch
    (both resume from ?resume_cursor= or Last-Event-ID: the changes since, in order)
    GET  /realtime/v1/streams/{run_id}/{stream_id}        SSE: a run stream's chunks
    POST /api/v1/tasks/{task_id}/trigger                  JSON {payload, options} → {id, ...}
    GET  /metrics, /healthz, /readyz                      see runplane_common.metrics

Authorisation is the gRPC one (the scheduler checks every call): ``Authorization: Bearer <key or
token>``, or ``?token=`` for EventSource, which cannot set headers. A refusal is an HTTP status
with a JSON body before any event; a failure mid-stream is an ``error`` event. Every SSE stream
that ends by itself sends an ``end`` event first, so an EventSource can close instead of
reconnecting. A client that stops reading is cut off (see ``feed.py``): an ``error`` event with
code RESOURCE_EXHAUSTED, then the connection closes, and an EventSource resumes from its
Last-Event-ID. A stream opened with a public access token ends with an UNAUTHENTICATED ``error``
event when the token expires.

Events carry the run's JSON fields (payload, output, metadata) as their own JSON text, never
re-encoded, so no depth the scheduler accepted can stop a feed; a field this service cannot read
as JSON is sent as a string.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson
from aiohttp import web
from google.protobuf import json_format
from opentelemetry import trace

from runplane.v1 import run_pb2, run_service_pb2
from runplane_common import errors, telemetry
from runplane_common.grpcserver import as_service_error
from runplane_common.metrics import Probes
from runplane_realtime.core import Realtime
from runplane_realtime.feed import Feed
from runplane_realtime.scheduler import Metadata
from runplane_realtime.streams import Chunk

log = logging.getLogger("runplane.realtime.http")

_HTTP_STATUS = {
    errors.Code.INVALID_ARGUMENT: 400,
    errors.Code.UNAUTHENTICATED: 401,
    errors.Code.PERMISSION_DENIED: 403,
    errors.Code.NOT_FOUND: 404,
    errors.Code.ALREADY_EXISTS: 409,
    errors.Code.FAILED_PRECONDITION: 409,
    errors.Code.UNAVAILABLE: 503,
}
_JSON_TEXT_FIELDS = ("payload", "output", "metadata")
# An idle SSE stream sends a comment this often (seconds).
KEEPALIVE = 15.0
# A stream's last event (an error) may wait this long for a client that does not read before
# the connection is closed; what is left unread is dropped this much later.
LAST_EVENT_GRACE = 1.0
# Events that are ready together go in one write, up to this many.
SSE_EVENTS_PER_WRITE = 64
# While the connection holds fewer unsent bytes than this, a write cannot block (aiohttp waits
# for the socket only above 64 KiB), so it needs no guard against a client that stopped reading.
SSE_WRITE_AT_ONCE = 16 * 1024
ABANDON_AFTER = 30.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Enters a request into the calls the service ends when it stops (RealtimeServicer.tracked).
Tracked = Callable[[], AbstractAsyncContextManager[None]]


def run_json(run: run_pb2.Run) -> bytes:
    """The run's public shape as one line of JSON (proto3 JSON names), its JSON-text fields
    inlined as JSON."""
    shape: dict[str, Any] = json_format.MessageToDict(run, preserving_proto_field_name=True)
    inline: list[bytes] = []
    for name in _JSON_TEXT_FIELDS:
        text = shape.pop(name, None)
        if text is None:
            continue
        value = json_text(text)
        if value is None:
            log.warning("run %s: its %s is not JSON this service can read; sent as a string",
                        run.id, name)  # fmt: skip
            shape[name] = text
        else:
            inline.append(b'"%s":%s' % (name.encode(), value))
    shape["version"] = run.version  # a number, not proto3 JSON's int64 string
    return _with_members(orjson.dumps(shape), inline)


def json_text(text: str) -> bytes | None:
    """Valid JSON text as it goes into an event: the text itself, not re-encoded (encoders stop
    at a few hundred levels of nesting, parsers at a thousand), on one line (a JSON text has line
    breaks only between tokens). None if it is not JSON, or too deep to check."""
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return text.replace("\r", " ").replace("\n", " ").encode()


def _with_members(obj: bytes, members: list[bytes]) -> bytes:
    """A JSON object (never empty) with ``"name":value`` members added."""
    return obj[:-1] + b"," + b",".join(members) + b"}" if members else obj


def _error_body(error: errors.ServiceError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": error.code.name, "message": error.message}
    if isinstance(error, errors.InvalidArgument):
        body["field"] = error.field
    return {"error": body}


def _error_response(error: errors.ServiceError) -> web.Response:
    headers = {}
    if isinstance(error, errors.Unavailable):  # HTTP's RetryInfo
        headers["Retry-After"] = str(max(1, round(error.retry_after_seconds)))
    return web.json_response(
        _error_body(error), status=_HTTP_STATUS.get(error.code, 500), headers=headers
    )


def _credentials(request: web.Request) -> Metadata:
    header = request.headers.get("Authorization", "")
    token = header.removeprefix("Bearer ").strip() if header else request.query.get("token", "")
    if not token:
        raise errors.Unauthenticated(
            "missing `Authorization: Bearer <key or token>` header or `token` query parameter"
        )
    if not all(" " <= c <= "~" for c in token):  # gRPC metadata could not carry it
        raise errors.Unauthenticated("malformed key or token: printable ASCII only")
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


class _JsonOnce:
    """Each run version's JSON, made once for all the subscribers it goes to: the hub hands
    every one of them the same Run object. Keyed by the object (held, so its id is not reused)
    for the last ``size`` runs encoded."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._made: collections.OrderedDict[int, tuple[run_pb2.Run, bytes]] = (
            collections.OrderedDict()
        )

    def __call__(self, run: run_pb2.Run) -> bytes:
        made = self._made.get(id(run))
        if made is not None and made[0] is run:
            return made[1]
        text = run_json(run)
        self._made[id(run)] = (run, text)
        if len(self._made) > self._size:
            self._made.popitem(last=False)
        return text


_shared_json = _JsonOnce()


def _run_event(run: run_pb2.Run) -> list[tuple[str, bytes]]:
    return [(str(run.version), _shared_json(run))]


def _set_event(item: tuple[run_pb2.Run, int]) -> list[tuple[str, bytes]]:
    run, cursor = item
    return [(str(cursor) if cursor else "", _shared_json(run))]


def _chunk_events(chunks: list[Chunk]) -> list[tuple[str, bytes]]:
    return [_chunk_event(chunk) for chunk in chunks]


def _chunk_event(chunk: Chunk) -> tuple[str, bytes]:
    data = json_text(chunk.data) or orjson.dumps(chunk.data)  # appends are checked: JSON
    return str(chunk.index), b'{"index":%d,"data":%s}' % (chunk.index, data)


def _route(request: web.Request) -> str:
    """The route's pattern (``/realtime/v1/runs/{run_id}``): span names stay few."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def _span_attributes(request: web.Request) -> dict[str, str]:
    """The request's method and path, and what it follows (run, batch, stream, tag, task)."""
    out = {"http.request.method": request.method, "url.path": request.path}
    for name in ("run_id", "batch_id", "stream_id", "task_id"):
        if name in request.match_info:
            out[f"runplane.{name}"] = request.match_info[name]
    if "tag" in request.query:
        out["runplane.tag"] = request.query["tag"]
    return out


class HttpServer:
    """aiohttp in the realtime service's event loop. Each request is served inside
    ``tracked()``, so the service's stop ends it as it ends gRPC calls."""

    def __init__(
        self,
        realtime: Realtime,
        tracked: Tracked,
        keepalive: float = KEEPALIVE,
        probes: Probes | None = None,
    ) -> None:
        self.keepalive = keepalive
        self._realtime = realtime
        self._tracked = tracked
        origins = [o.strip() for o in realtime.settings.cors_origins.split(",") if o.strip()]
        self._origins = origins or ["*"]
        # A trigger body carries a payload up to the payload limit, and its options.
        body_limit = realtime.settings.limits.payload_bytes + 1024 * 1024
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
        if probes is not None:
            self.app.add_routes(probes.routes())
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
        # Port 0 needs the port it picked: the first address its one site listens on.
        bound: int = self._runner.addresses[0][1]
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
        # One server span per request, in the caller's trace (its traceparent header); an SSE
        # request's covers the stream's life, with what it follows as attributes.
        with telemetry.tracer().start_as_current_span(
            f"{request.method} {_route(request)}",
            context=telemetry.context_from_metadata(
                (k.lower(), v) for k, v in request.headers.items()
            ),
            kind=trace.SpanKind.SERVER,
            attributes=_span_attributes(request),
            # A client that goes away cancels the handler: the end of its stream, not an error.
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                async with self._tracked():
                    response = await handler(request)
            except web.HTTPException as refused:
                span.set_attribute("http.response.status_code", refused.status)
                raise
            except Exception as error:
                span.record_exception(error)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
                response = _error_response(as_service_error(error))
                self._cors(request, response)
            span.set_attribute("http.response.status_code", response.status)
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
        return await self._sse(request, opened, "chunk", _chunk_events)

    async def _sse(
        self,
        request: web.Request,
        feed: Feed[Any],
        event: str,
        encode: Callable[[Any], list[tuple[str, bytes]]],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        self._cors(request, response)
        failure: errors.ServiceError | None = None
        following: asyncio.Future[Any] | None = None
        try:
            await response.prepare(request)
            while True:
                if following is None:
                    following = asyncio.ensure_future(feed.next())
                done, _ = await asyncio.wait({following}, timeout=self.keepalive)
                if not done:
                    # A comment line: keeps proxies from closing an idle stream, and finds out
                    # when the client has gone.
                    await self._write(request, response, feed, b": keepalive\n\n")
                    continue
                finished, following = following, None
                try:
                    items = [finished.result()]
                except StopAsyncIteration:
                    break
                # What else is ready goes in the same write (no task per event in a burst).
                items += feed.take_ready(SSE_EVENTS_PER_WRITE - 1)
                parts = []
                for item in items:
                    try:
                        events = encode(item)
                    except Exception:
                        # One event must not end the feed for this follower, nor for the others.
                        log.exception("skipping an event that cannot be sent as JSON")
                        continue
                    for event_id, data in events:
                        head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
                        parts.append(head.encode() + b"data: " + data + b"\n\n")
                if parts:
                    await self._write(request, response, feed, b"".join(parts))
            await self._write(request, response, feed, b"event: end\ndata: {}\n\n")
        except ConnectionResetError:  # aiohttp's "cannot write to closing transport" too
            pass  # the client went away
        except Exception as error:
            failure = as_service_error(error)
        finally:
            # However the response ends, the subscription ends with it (and its consumer goes).
            if following is not None:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
            await feed.aclose()
        if failure is not None:
            body = orjson.dumps(_error_body(failure))
            await self._last_event(request, response, b"event: error\ndata: " + body + b"\n\n")
        return response

    async def _write(
        self, request: web.Request, response: web.StreamResponse, feed: Feed[Any], data: bytes
    ) -> None:
        """Write ``data``; if the feed is cut off while the client does not read, give up the
        write and raise the feed's error."""
        transport = request.transport
        if (
            transport is not None
            and transport.get_write_buffer_size() < SSE_WRITE_AT_ONCE
            and not feed.cut_off.is_set()
        ):
            # The client keeps up: the write goes to the socket without waiting for it.
            await response.write(data)
            return
        write = asyncio.ensure_future(response.write(data))
        cut = asyncio.ensure_future(feed.cut_off.wait())
        try:
            await asyncio.wait({write, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
            if not write.done():
                write.cancel()  # its bytes are in the transport's buffer already
            await asyncio.gather(write, cut, return_exceptions=True)
        if not write.cancelled():
            write.result()
            return
        await feed.next()  # raises the reason it was cut off

    async def _last_event(
        self, request: web.Request, response: web.StreamResponse, data: bytes
    ) -> None:
        """Send a stream's last event to a client that may not be reading: after a grace, close
        the connection (the transport still sends what it holds), and drop it a while later."""
        try:
            await asyncio.wait_for(response.write(data), LAST_EVENT_GRACE)
        except (ConnectionResetError, TimeoutError):
            transport = request.transport
            if transport is not None and not transport.is_closing():
                transport.close()
                asyncio.get_running_loop().call_later(ABANDON_AFTER, transport.abort)

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
        head = {
            "id": reply.run.id,
            "isCached": reply.is_cached,
            "publicAccessToken": reply.public_access_token,
        }
        response = web.Response(
            body=_with_members(orjson.dumps(head), [b'"run":' + run_json(reply.run)]),
            content_type="application/json",
        )
        self._cors(request, response)
        return response
