"""``runplane.streams``: named streams of JSON chunks a run writes and anyone allowed reads.

    tokens = streams.define(id="tokens")

    @task(id="chat")
    async def chat(payload, ctx):
        await tokens.pipe(llm_tokens(payload))      # or: await tokens.append("hello")

    async for chunk in tokens.read(run_id):         # anywhere; a late reader starts at chunk 1
        ...

Chunks go to the realtime service (``AppendStream``) with the task process's own secret key, so
writing needs no executor support; the service keeps them on JetStream (RUN_STREAMS).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any, Generic, Literal, TypeVar

import orjson

from runplane._context import current_context
from runplane._errors import ConfigurationError, DeadlineExceededError, UnavailableError
from runplane._models import RunHandle
from runplane._namespace import Connected, transport_of
from runplane._realtime import read_stream
from runplane._serde import dumps
from runplane._transport import Transport
from runplane.v1 import realtime_service_pb2, realtime_service_pb2_grpc

T = TypeVar("T")

# An append is retried this many times in all while the realtime service or NATS is away.
_APPEND_ATTEMPTS = 8
_FIRST_RETRY_DELAY = 0.1

Target = Literal["self", "parent", "root"] | str


def _target_run(target: Target) -> str:
    """The run a write goes to: this run, its parent or root (inside a task), or a run id."""
    if target not in ("self", "parent", "root"):
        return target
    ctx = current_context()
    if ctx is None:
        raise ConfigurationError(
            f"target={target!r} needs a running task; pass a run id as target outside one"
        )
    if target == "self":
        return ctx.run.id
    if target == "parent":
        if not ctx.run.parent_run_id:
            raise ConfigurationError("this run has no parent: target='parent' is not possible")
        return ctx.run.parent_run_id
    return ctx.run.root_run_id or ctx.run.id


class Stream(Generic[T]):
    """A named stream; :func:`define` makes one. Each run has its own stream of this id."""

    def __init__(self, id: str, client: Connected | None = None) -> None:
        self.id = id
        self._bound = client

    @property
    def _transport(self) -> Transport:
        return transport_of(self._bound)

    async def _append(self, run_id: str, chunks: list[str], close: bool) -> int:
        """One AppendStream, retried while the realtime service or NATS is briefly away; each
        chunk carries an id, so a retry after a lost reply does not append it twice."""
        transport = self._transport
        request = realtime_service_pb2.AppendStreamRequest(
            run_id=run_id,
            stream_id=self.id,
            chunks=chunks,
            close=close,
            chunk_ids=[uuid.uuid4().hex for _ in chunks],
        )
        delay = _FIRST_RETRY_DELAY
        attempt = 1
        while True:
            channel = await transport.realtime_channel()
            stub = realtime_service_pb2_grpc.RealtimeServiceStub(channel)
            try:
                response = await transport.call(stub.AppendStream, request)
            except (UnavailableError, DeadlineExceededError):
                if attempt >= _APPEND_ATTEMPTS:
                    raise
                attempt += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            index: int = response.last_index
            return index

    async def append(self, chunk: T, *, target: Target = "self") -> int:
        """Append one chunk (anything JSON-serialisable); returns its index (1 for the first)."""
        return await self._append(_target_run(target), [dumps(chunk)], close=False)

    def append_sync(self, chunk: T, *, target: Target = "self") -> int:
        return self._transport.run_sync(self.append(chunk, target=target))

    async def pipe(
        self,
        source: AsyncIterable[T] | Iterable[T],
        *,
        target: Target = "self",
        close: bool = False,
    ) -> int:
        """Append every item of ``source`` as it comes; returns how many. ``close``: end the
        stream for readers afterwards (otherwise they end when the run finishes)."""
        run_id = _target_run(target)
        count = 0
        if isinstance(source, AsyncIterable):
            async for item in source:
                await self._append(run_id, [dumps(item)], close=False)
                count += 1
        else:
            for item in source:
                await self._append(run_id, [dumps(item)], close=False)
                count += 1
        if close:
            await self._append(run_id, [], close=True)
        return count

    def pipe_sync(self, source: Iterable[T], **kwargs: Any) -> int:
        return self._transport.run_sync(self.pipe(source, **kwargs))

    async def close(self, *, target: Target = "self") -> None:
        """End the stream: readers stop after its last chunk; later appends are refused."""
        await self._append(_target_run(target), [], close=True)

    def close_sync(self, *, target: Target = "self") -> None:
        self._transport.run_sync(self.close(target=target))

    async def read(self, run_id: str | RunHandle, *, after_index: int = 0) -> AsyncIterator[T]:
        """Every chunk of the run's stream from the first (or after ``after_index``), in order;
        ends when the stream closes or the run has finished. Reconnects transparently."""
        transport = self._transport
        run_id = run_id.id if isinstance(run_id, RunHandle) else run_id
        channel = await transport.realtime_channel()
        async for _index, data in read_stream(
            channel, transport.metadata(), run_id, self.id, after_index=after_index
        ):
            chunk: T = orjson.loads(data)
            yield chunk

    def read_sync(self, run_id: str | RunHandle, **kwargs: Any) -> Iterator[T]:
        return self._transport.iterate_sync(self.read(run_id, **kwargs))


class StreamsAPI:
    """Define streams: ``streams.define(id="tokens")``."""

    def __init__(self, client: Connected | None) -> None:
        self._bound = client

    def define(self, id: str) -> Stream[Any]:
        return Stream(id, self._bound)


streams = StreamsAPI(None)
