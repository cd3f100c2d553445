"""The scheduler's small HTTP endpoint: completing a wait token by a plain POST to its URL.

``POST /api/v1/waitpoints/tokens/{id}/complete?secret=...`` with a JSON body (the data the
waiting runs receive). The URL's secret authorises the call, so no SDK and no key are needed.
A minimal HTTP/1.1 server on asyncio streams: one request per connection, no dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from urllib.parse import parse_qs, urlsplit

import orjson

from runplane_scheduler.waitpoints import Waitpoints
from runplane_server.errors import NotFound

log = logging.getLogger("runplane.scheduler.http")

PATH = re.compile(r"^/api/v1/waitpoints/tokens/(waitpoint_[0-9a-z]{1,36})/complete$")
MAX_BODY = 3 * 1024 * 1024


class TokenHttpServer:
    def __init__(self, waits: Waitpoints) -> None:
        self.waits = waits
        self._server: asyncio.Server | None = None

    async def start(self, listen: str) -> int:
        host, port = listen.rsplit(":", 1)
        self._server = await asyncio.start_server(self._handle, host, int(port))
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await asyncio.wait_for(self._respond(reader), 30)
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, ConnectionError):
            status, body = 400, {"error": "bad request"}
        except Exception:
            log.exception("token HTTP request failed")
            status, body = 500, {"error": "internal error"}
        data = orjson.dumps(body)
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        head = (
            f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + data)
            await writer.drain()
        writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
        request_line = (await reader.readline()).decode("latin-1").strip()
        method, target, _ = request_line.split(" ", 2)
        length = 0
        while True:
            line = (await reader.readline()).decode("latin-1").strip()
            if not line:
                break
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if not 0 <= length <= MAX_BODY:
            return 400, {"error": f"the body must be at most {MAX_BODY} bytes"}
        body = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        match = PATH.match(url.path)
        if match is None:
            return 404, {"error": "not found"}
        if method != "POST":
            return 405, {"error": "use POST"}
        try:
            data = orjson.loads(body) if body.strip() else None
        except orjson.JSONDecodeError:
            return 400, {"error": "the body must be JSON"}
        secret = parse_qs(url.query).get("secret", [""])[0]
        try:
            token = await self.waits.complete_token(
                match.group(1), orjson.dumps(data).decode(), secret=secret
            )
        except NotFound as error:
            return 404, {"error": str(error)}
        return 200, {"id": token["id"], "status": "COMPLETED"}
