"""Run streams on JetStream: chunks a task appends, read in order by anyone allowed to read the run.

Stream RUN_STREAMS holds one subject per environment, run and stream id. Each chunk is one
message whose headers carry its index (1, 2, ...) and the stream's total size so far; a writer
publishes with ``Nats-Expected-Last-Subject-Sequence``, so several writers interleave without
losing or repeating an index (a writer that loses the race re-reads the end and tries again).
A close marker ends the stream for readers. Retention is the stream's ``max_age``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import orjson
from nats.js.api import StorageType, StreamConfig

from runplane_common import errors, jetstream, subjects
from runplane_common.config import RealtimeSettings
from runplane_realtime.events import JS_TIMEOUT, EventsUnavailable, NatsLink
from runplane_realtime.fanout import Hubs, Message

log = logging.getLogger("runplane.realtime.streams")

STREAM_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")  # \Z: "$" would allow a final newline
INDEX = "Rp-Index"
TOTAL = "Rp-Total"
CLOSED = "Rp-Closed"
# JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check.
WRONG_LAST_SEQUENCE = 10071
MAX_CONFLICTS = 50
READ_SLICE = 1.0
# A reader takes at most this many chunks that piled up at once.
READ_BATCH = 256
# A reader of a busy stream is woken at most this often, with every chunk that came meanwhile
# (one that waits on a quiet stream is woken at once): 100 readers of a stream of 1,000 chunks a
# second cost 4,000 wake-ups and gRPC messages a second, not 100,000, for at most 25 ms more.
READER_WAKE_EVERY = 0.025


def stream_id(value: str) -> str:
    if not STREAM_ID.match(value):
        raise errors.InvalidArgument("stream_id", "must be 1 to 64 letters, digits, '_' or '-'")
    return value


@dataclass(frozen=True)
class Chunk:
    index: int
    data: str
    # The close marker (no chunk): readers end here.
    closed: bool = False


@dataclass(frozen=True)
class _End:
    """The last message on a stream's subject: where the next writer continues."""

    sequence: int = 0
    index: int = 0
    total: int = 0
    closed: bool = False


class RunStreams:
    def __init__(
        self, link: NatsLink, settings: RealtimeSettings, hubs: Hubs | None = None
    ) -> None:
        self._link = link
        self._settings = settings
        # The readers of one stream in this process share one consumer (see fanout).
        self._hubs = hubs if hubs is not None else Hubs(link)
        self._ensured_epoch = -1

    async def _ensure(self) -> None:
        """Create or update RUN_STREAMS once per connection (a restarted NATS may lack it)."""
        if self._ensured_epoch == self._link.epoch:
            return
        epoch = self._link.epoch
        config = StreamConfig(
            name=subjects.RUN_STREAMS_STREAM,
            subjects=subjects.run_streams_subjects(),
            storage=StorageType.FILE,
            max_age=self._settings.stream_retention,
            num_replicas=self._settings.nats_replicas,
        )
        js = self._link.jetstream()
        try:
            await asyncio.wait_for(jetstream.ensure_stream(js, config), 3 * JS_TIMEOUT)
        except jetstream.StreamSetupError as error:
            log.error("%s", error)
            raise EventsUnavailable(str(error)) from error
        except (nats.errors.Error, TimeoutError) as error:
            raise EventsUnavailable(
                f"cannot make {subjects.RUN_STREAMS_STREAM}: {error!r}"
            ) from error
        self._ensured_epoch = epoch

    async def _end(self, subject: str) -> _End:
        js = self._link.jetstream()
        try:
            msg = await asyncio.wait_for(
                js.get_last_msg(subjects.RUN_STREAMS_STREAM, subject), JS_TIMEOUT
            )
        except nats.js.errors.NotFoundError:
            return _End()
        headers = msg.headers or {}
        return _End(
            sequence=int(msg.seq or 0),
            index=int(headers.get(INDEX, 0)),
            total=int(headers.get(TOTAL, 0)),
            closed=headers.get(CLOSED) == "1",
        )

    async def append(
        self,
        environment_id: str,
        run_id: str,
        sid: str,
        chunks: Sequence[str],
        close: bool,
        chunk_ids: Sequence[str] = (),
    ) -> int:
        """Append ``chunks`` (then the close marker if ``close``); the last chunk's index.
        A chunk whose id was appended already (a retry) is not appended again."""
        if chunk_ids and len(chunk_ids) != len(chunks):
            raise errors.InvalidArgument("chunk_ids", "give one id per chunk, or none")
        limit = self._settings.stream_chunk_bytes
        for i, chunk in enumerate(chunks):
            if len(chunk.encode()) > limit:
                raise errors.InvalidArgument(
                    f"chunks[{i}]",
                    f"larger than the chunk size limit of {limit} bytes "
                    "(RUNPLANE_STREAM_CHUNK_BYTES)",
                )
            try:  # readers (the SDK, the SSE endpoint) parse every chunk
                orjson.loads(chunk)
            except orjson.JSONDecodeError as error:
                raise errors.InvalidArgument(f"chunks[{i}]", f"not valid JSON ({error})") from None
        subject = subjects.run_stream(environment_id, run_id, sid)
        try:
            await self._ensure()
            ids = list(chunk_ids) or [""] * len(chunks)
            return await self._append(subject, [c.encode() for c in chunks], ids, close)
        except (EventsUnavailable, nats.errors.Error, TimeoutError) as error:
            raise errors.Unavailable(f"run streams are unavailable: {error!r}") from None

    async def _append(
        self, subject: str, chunks: list[bytes], chunk_ids: list[str], close: bool
    ) -> int:
        js = self._link.jetstream()
        todo = list(zip(chunks, chunk_ids, strict=True))
        conflicts = 0
        end = await self._end(subject)
        if end.closed:
            raise errors.FailedPrecondition(f"stream {subject.rsplit('.', 1)[-1]} is closed")
        limit = self._settings.stream_max_bytes
        if end.total + sum(len(c) for c, _ in todo) > limit:
            raise errors.InvalidArgument(
                "chunks",
                f"the stream would exceed its size limit of {limit} bytes "
                "(RUNPLANE_STREAM_MAX_BYTES)",
            )
        while todo or close:
            data, chunk_id = todo[0] if todo else (b"", "")
            index = end.index + 1 if todo else end.index
            headers = {
                "Nats-Expected-Last-Subject-Sequence": str(end.sequence),
                INDEX: str(index),
                TOTAL: str(end.total + len(data)),
            }
            if chunk_id:
                headers["Nats-Msg-Id"] = f"{subject}:{chunk_id}"
            if not todo:
                headers[CLOSED] = "1"
            try:
                ack = await js.publish(
                    subject,
                    data,
                    timeout=JS_TIMEOUT,
                    stream=subjects.RUN_STREAMS_STREAM,
                    headers=headers,
                )
            except nats.js.errors.BadRequestError as error:
                if error.err_code != WRONG_LAST_SEQUENCE or conflicts >= MAX_CONFLICTS:
                    raise
                conflicts += 1  # another writer appended first: continue after its chunk
                end = await self._end(subject)
                if end.closed:
                    raise errors.FailedPrecondition(
                        "the stream was closed by another writer"
                    ) from None
                continue
            if ack.duplicate:  # appended before (a retry): carry on after the real end
                end = await self._end(subject)
            else:
                end = _End(ack.seq, index, end.total + len(data), not todo)
            if todo:
                todo.pop(0)
            else:
                close = False
        return end.index

    async def read(
        self,
        environment_id: str,
        run_id: str,
        sid: str,
        after_index: int,
        run_is_final: Callable[[], Awaitable[bool]],
        finished: bool = False,
    ) -> AsyncGenerator[list[Chunk], None]:
        """Chunks after ``after_index`` in order, until the close marker, or until the run has
        finished and every chunk written before has been read. Chunks that arrive together
        come in one list (never empty). ``finished``: the run had finished when the reader came
        (its stream is read to the end at once, not after a quiet slice)."""
        subject = subjects.run_stream(environment_id, run_id, sid)
        # The readers of one stream in this process share one consumer.
        hub = self._hubs.get(
            subjects.RUN_STREAMS_STREAM, subject, _decode_chunk, wake_every=READER_WAKE_EVERY
        )
        reader = hub.reader(())
        final_end: int | None = None  # stream sequence of the last chunk once the run finished
        try:
            if finished:
                with contextlib.suppress(EventsUnavailable, nats.errors.Error, TimeoutError):
                    await self._ensure()
                    final_end = (await self._end(subject)).sequence
                    if final_end == 0:
                        return  # no chunk was ever written
            while True:
                try:
                    await self._ensure()
                    messages = await reader.next_batch(READ_SLICE, READ_BATCH)
                    if not messages and final_end is None and await run_is_final():
                        final_end = (await self._end(subject)).sequence
                except (EventsUnavailable, nats.errors.Error, TimeoutError) as error:
                    log.debug("stream %s unreadable (%s)", subject, error)
                    if self._link.connected:  # connected but failing: pace the retries
                        await asyncio.sleep(READ_SLICE)
                    else:
                        await self._link.wait_connected(READ_SLICE)
                    continue
                chunks: list[Chunk] = []
                closed = False
                for chunk in messages:
                    if chunk.closed:
                        closed = True
                        break
                    if chunk.index > after_index:
                        chunks.append(chunk)
                if chunks:
                    yield chunks
                if closed:
                    return
                if final_end is not None and (final_end == 0 or reader.next_sequence > final_end):
                    return
        finally:
            with contextlib.suppress(Exception):
                await reader.close()


def _decode_chunk(message: Message) -> tuple[Chunk, tuple[str, ...]]:
    """A message as a chunk (or the close marker), once for all the stream's readers."""
    headers = message.headers or {}
    if headers.get(CLOSED) == "1":
        return Chunk(0, "", closed=True), ()
    return Chunk(int(headers.get(INDEX, 0)), message.data.decode()), ()
