"""Live updates: the realtime service's SSE feeds, relayed to the browser.

The browser never holds a key: it opens an EventSource on the dashboard (same origin, the
session cookie), and the dashboard follows the realtime service's feed with the session's key
(``Authorization: Bearer``) and passes its events on. A list page follows many runs at once
over one connection: their feeds are merged into one stream. Events are the realtime service's
own: ``run`` (the run's JSON), ``error`` and ``end`` (the stream is over: the page stops
listening instead of reconnecting); and ``new`` when a list's first page has a run it did not
show (found by asking for the newest run every two seconds: no feed covers a whole
environment), so the page fetches its table again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web

# An idle relayed stream sends a comment this often (seconds), so proxies keep it open.
KEEPALIVE = 15.0


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event."""

    name: str
    data: str
    id: str = ""

    def encode(self) -> bytes:
        lines = [f"event: {self.name}"]
        if self.id:
            lines.append(f"id: {self.id}")
        lines.extend(f"data: {line}" for line in self.data.split("\n"))
        return ("\n".join(lines) + "\n\n").encode()


def error_event(code: str, message: str) -> Event:
    return Event("error", orjson.dumps({"error": {"code": code, "message": message}}).decode())


async def parse(content: aiohttp.StreamReader) -> AsyncIterator[Event]:
    """The events of an SSE body, as they come."""
    name, event_id = "message", ""
    data: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield Event(name, "\n".join(data), event_id)
            name, event_id = "message", ""
            data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value


async def follow(
    http: aiohttp.ClientSession, url: str, key: str, last_event_id: str = ""
) -> AsyncIterator[Event]:
    """The events of the realtime feed at ``url``, read with ``key``; a refusal (an HTTP
    status) or a lost connection is one ``error`` event."""
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    try:
        async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout()) as response:
            if response.status != 200:
                body = await response.text()
                try:
                    error = orjson.loads(body)["error"]
                    code, message = str(error["code"]), str(error["message"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    code, message = str(response.status), body[:200]
                yield error_event(code, message)
                return
            async for event in parse(response.content):
                yield event
    except aiohttp.ClientError as error:
        yield error_event("UNAVAILABLE", f"the realtime service is unreachable: {error}")


def run_feed_url(base: str, run_id: str) -> str:
    return f"{base.rstrip('/')}/realtime/v1/runs/{quote(run_id, safe='')}"


def batch_feed_url(base: str, batch_id: str) -> str:
    return f"{base.rstrip('/')}/realtime/v1/batches/{quote(batch_id, safe='')}"


async def relay(
    request: web.Request,
    http: aiohttp.ClientSession,
    urls: Sequence[str],
    key: str,
    keepalive: float = KEEPALIVE,
    extra: Sequence[AsyncIterator[Event]] = (),
) -> web.StreamResponse:
    """One SSE response carrying the events of every feed in ``urls`` (in order per feed) and
    of the ``extra`` sources; it ends with ``end`` once each has ended. With one feed, the
    browser's Last-Event-ID resumes it."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    last = request.headers.get("Last-Event-ID", "") if len(urls) == 1 else ""
    events: asyncio.Queue[Event | None] = asyncio.Queue()

    async def pump(url: str) -> None:
        try:
            async for event in follow(http, url, key, last):
                if event.name == "end":
                    break
                await events.put(Event(event.name, event.data, event.id if len(urls) == 1 else ""))
        finally:
            await events.put(None)

    async def pump_extra(source: AsyncIterator[Event]) -> None:
        try:
            async for event in source:
                await events.put(event)
        finally:
            await events.put(None)

    pumps = [asyncio.create_task(pump(url)) for url in urls]
    pumps += [asyncio.create_task(pump_extra(source)) for source in extra]
    try:
        open_feeds = len(pumps)
        while open_feeds:
            try:
                event = await asyncio.wait_for(events.get(), keepalive)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if event is None:
                open_feeds -= 1
                continue
            await response.write(event.encode())
        await response.write(Event("end", "{}").encode())
    finally:
        for task in pumps:
            task.cancel()
        for task in pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return response
