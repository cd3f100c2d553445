"""The scheduler's small HTTP endpoint: completing a wait token by a plain POST to its URL.

``POST /api/v1/waitpoints/tokens/{id}/complete?secret=...`` with a JSON body (the data the
waiting runs receive). The URL's secret authorises the call, so no SDK and no key are needed.
It also answers ``GET /metrics``, ``/healthz`` and ``/readyz`` (see runplane_common.metrics).
A minimal HTTP/1.1 server on asyncio streams: one request per connection, no dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import orjson

from runplane.tls import TlsSettings
from runplane_common.errors import NotFound, Unavailable
from runplane_common.metrics import Answer, Probes
from runplane_scheduler.engine.waitpoints import Waitpoints

log = logging.getLogger("runplane.scheduler.http")

PATH = re.compile(r"^/api/v1/waitpoints/tokens/(waitpoint_[0-9a-z]{1,36})/complete\Z")
MAX_BODY = 3 * 1024 * 1024
# Set on a completion a standby forwards to the leader (see TokenHttpServer._forward).
FORWARDED = "x-runplane-forwarded-by"


class _BadRequest(ValueError):
    """A request this endpoint cannot read; the message says why."""


class TokenHttpServer:
    def __init__(
        self,
        waits: Waitpoints,
        probes: Probes | None = None,
        leader: Callable[[], str | None] = lambda: None,
        tls: TlsSettings | None = None,
    ) -> None:
        """``leader``: the leading replica's URL when another replica leads (a completion is
        forwarded there), None when this one does; raises Unavailable when none does."""
        self.waits = waits
        self.probes = probes
        self.leader = leader
        self.tls = tls or TlsSettings()
        self._server: asyncio.Server | None = None

    async def start(self, listen: str, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on ``listen`` (HTTPS with ``ssl_context``) and return the port."""
        host, port = listen.rsplit(":", 1)
        self._server = await asyncio.start_server(
            self._handle,
            host,
            int(port),
            ssl=ssl_context,
            # Allowed with TLS only; a client that never finishes its handshake is dropped.
            ssl_handshake_timeout=10 if ssl_context else None,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await asyncio.wait_for(self._respond(reader), 30)
            if isinstance(answer, Answer):
                await self._write(writer, answer.status, answer.content_type, answer.body)
                return
            status, body = answer
        except _BadRequest as error:
            status, body = 400, {"error": str(error)}
        except asyncio.IncompleteReadError:
            status, body = 400, {"error": "the body is shorter than its Content-Length"}
        except TimeoutError:
            status, body = 400, {"error": "the request did not arrive within 30 s"}
        except (ValueError, ConnectionError):  # a line over the reader's limit, a reset
            status, body = 400, {"error": "malformed request: a line is too long or cut off"}
        except Exception:
            log.exception("token HTTP request failed")
            status, body = 500, {"error": "internal error"}
        await self._write(writer, status, "application/json", orjson.dumps(body))

    @staticmethod
    async def _write(
        writer: asyncio.StreamWriter, status: int, content_type: str, data: bytes
    ) -> None:
        reason = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            413: "Content Too Large",
            503: "Service Unavailable",
        }
        head = (
            f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + data)
            await writer.drain()
        writer.close()

    async def _respond(
        self, reader: asyncio.StreamReader
    ) -> tuple[int, dict[str, object]] | Answer:
        request_line = (await reader.readline()).decode("latin-1").strip()
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _BadRequest("malformed request line (expected: METHOD /path HTTP/1.1)")
        method, target, _ = parts
        length = 0
        forwarded = False
        while True:
            line = (await reader.readline()).decode("latin-1").strip()
            if not line:
                break
            name, _, value = line.partition(":")
            forwarded = forwarded or name.strip().lower() == FORWARDED
            if name.strip().lower() == "content-length":
                if not (value.strip().isascii() and value.strip().isdigit()):
                    raise _BadRequest(f"Content-Length {value.strip()[:40]!r} is not a number")
                length = int(value.strip())
        if length > MAX_BODY:
            return 413, {"error": f"the body must be at most {MAX_BODY} bytes, got {length}"}
        body = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        if self.probes is not None:
            probe = await self.probes.answer(method, url.path)
            if probe is not None:
                return probe
        match = PATH.match(url.path)
        if match is None:
            return 404, {"error": "not found"}
        if method != "POST":
            return 405, {"error": "use POST"}
        try:
            data = orjson.loads(body) if body.strip() else None
        except orjson.JSONDecodeError:
            return 400, {"error": "the body must be JSON"}
        try:
            leader = self.leader()
        except Unavailable as error:
            return 503, {"error": str(error)}
        if leader is not None:
            if forwarded:  # the leader changed meanwhile: never a second hop
                return 503, {"error": "this scheduler replica does not lead now; retry"}
            return await self._forward(leader, target, body)
        secret = parse_qs(url.query).get("secret", [""])[0]
        try:
            token = await self.waits.complete_token(
                match.group(1), orjson.dumps(data).decode(), secret=secret
            )
        except NotFound as error:
            return 404, {"error": str(error)}
        return 200, {"id": token["id"], "status": "COMPLETED"}

    async def _forward(self, leader: str, target: str, body: bytes) -> Answer:
        """POST the completion to the leading replica's endpoint and answer with its answer."""
        url = urlsplit(leader)
        secure = url.scheme == "https"
        context = self.tls.client_ssl_context() if secure else None
        port = url.port or (443 if secure else 80)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(url.hostname, port, ssl=context), 10
            )
        except (OSError, TimeoutError):
            return Answer(
                503,
                "application/json",
                orjson.dumps(
                    {"error": f"the leading scheduler replica at {leader} is unreachable"}
                ),
            )
        try:
            writer.write(
                f"POST {target} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                f"Content-Type: application/json\r\n{FORWARDED}: 1\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 30)
        finally:
            writer.close()
        head, _, data = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1]) if lines and len(lines[0].split(" ")) > 1 else 502
        kind = next(
            (
                line.split(":", 1)[1].strip()
                for line in lines
                if line.lower().startswith("content-type:")
            ),
            "application/json",
        )
        return Answer(status, kind, data)
