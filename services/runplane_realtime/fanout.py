"""Fan-out: one JetStream consumer per subject in each realtime process, shared by its readers.

A :class:`Hub` reads one subject filter of one stream (an environment's run events, or one run
stream) with a single ordered consumer, decodes each message once, and hands it to the readers
whose keys it carries (a run id, a tag, a batch id): 1,000 subscribers of one tag cost one
delivery and one decode per event, not 1,000.

A :class:`HubReader` is one subscriber's place in that feed. It wants every message of its
subject from a stream sequence on. When it joins (and again after it overflowed), it takes the
hub's position ``P``, the sequence of the next message the hub will hand out: the hub gives it
every message from ``P`` on, into its inbox, and the reader reads the messages before ``P``
(from its own cursor) straight from the stream, one request each (``next_by_subj``, no consumer).
So it sees every message once, in stream order, with no gap and no duplicate between catch-up
and live. The inbox is bounded: a reader that lets it fill (its subscriber is busy) drops it and
catches up from its cursor again, so the hub never waits for anyone.

A hub starts with its first reader, at the end of the stream, and stops a moment after its last
reader leaves. Replicas of the realtime service each have their own hubs; nothing is shared
between processes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError

from runplane.v1 import events_pb2, run_pb2
from runplane_common import subjects
from runplane_realtime.events import (
    EventsUnavailable,
    NatsLink,
    OrderedReader,
    stream_bounds,
)

log = logging.getLogger("runplane.realtime.fanout")

T = TypeVar("T")

# A reader's inbox holds at most this many messages; more, and it catches up from the stream.
MAX_INBOX = 1024
# A hub with no reader left stops after this many seconds (a subscriber that reconnects at
# once finds it still running).
LINGER = 2.0
# The hub's consumer looks up this often, to notice an outage or a stop.
READ_SLICE = 1.0
# The key every reader of a hub gets every message under (a run stream's readers).
ALL = "*"


@dataclass(frozen=True)
class Message:
    """One stream message, whether the hub's consumer or a catch-up read brought it."""

    sequence: int
    subject: str
    data: bytes
    headers: dict[str, str] | None


# Decodes a message once for all readers: the item and the keys it goes to, or None to skip it.
Decoder = Callable[[Message], "tuple[T, Iterable[str]] | None"]


class Hub(Generic[T]):
    """One consumer of ``subject`` in ``stream``, fanned out to readers by key."""

    def __init__(
        self,
        link: NatsLink,
        stream: str,
        subject: str,
        decode: Decoder[T],
        on_stopped: Callable[[Hub[T]], None] = lambda _: None,
        wake_every: float = 0.0,
    ) -> None:
        self.link = link
        self.stream = stream
        self.subject = subject
        self.decode = decode
        # A reader is woken at most this often (0: at each message). A fast subject (a token
        # stream) so costs each reader one wake-up per interval with all that came meanwhile,
        # not one per message; a quiet one is woken at once.
        self.wake_every = wake_every
        self._on_stopped = on_stopped
        self._by_key: dict[str, set[HubReader[T]]] = {}
        self._readers: set[HubReader[T]] = set()
        # The stream sequence of the next message the hub hands out; None until it has started.
        self.position: int | None = None
        self._consumer: OrderedReader | None = None
        self._starting: asyncio.Lock = asyncio.Lock()
        self._pump: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None
        self.delivered = 0  # messages handed to readers (for tests and the bench)

    @property
    def readers(self) -> int:
        return len(self._readers)

    def reader(
        self, keys: Iterable[str], subject: str | None = None, start_sequence: int = 0
    ) -> HubReader[T]:
        """A reader of the messages carrying any of ``keys`` from ``start_sequence`` on (0: the
        stream's first); it catches up by reading ``subject`` (default: the hub's)."""
        return HubReader(self, tuple(keys), subject or self.subject, start_sequence)

    async def started(self) -> int:
        """The hub's position, starting its consumer at the end of the stream if it has none
        yet. Raises EventsUnavailable while NATS cannot say where the stream ends."""
        async with self._starting:
            if self.position is None:
                _, end = await stream_bounds(self.link, self.stream)
                self._consumer = OrderedReader(self.link, self.stream, self.subject, end)
                self.position = end
            if self._pump is None or self._pump.done():
                assert self._consumer is not None
                self._pump = asyncio.create_task(
                    self._run(self._consumer), name=f"realtime-hub {self.subject}"
                )
            return self.position

    def add(self, reader: HubReader[T]) -> None:
        """Hand ``reader`` the messages of its keys from now on (its own ``next`` calls this)."""
        self._readers.add(reader)
        for key in reader.keys:
            self._by_key.setdefault(key, set()).add(reader)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def remove(self, reader: HubReader[T]) -> None:
        """Stop handing ``reader`` messages; the hub stops a moment after its last reader."""
        if reader not in self._readers:
            return
        self._readers.discard(reader)
        for key in reader.keys:
            readers = self._by_key.get(key)
            if readers is not None:
                readers.discard(reader)
                if not readers:
                    del self._by_key[key]
        if not self._readers and self._linger is None:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(LINGER, lambda: asyncio.ensure_future(self.stop()))

    async def stop(self) -> None:
        """Stop the consumer (unless a reader came back meanwhile)."""
        self._linger = None
        if self._readers:
            return
        # Take it all at once: a reader arriving during the awaits below starts afresh.
        pump, self._pump = self._pump, None
        consumer, self._consumer = self._consumer, None
        self.position = None
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        if consumer is not None:
            await consumer.close()
        if not self._readers and self.position is None:
            self._on_stopped(self)

    async def close_readers(self) -> None:
        """Close every reader (the process is shutting down), then stop."""
        for reader in list(self._readers):
            await reader.close()
        if self._linger is not None:
            self._linger.cancel()
        await self.stop()

    async def _run(self, consumer: OrderedReader) -> None:
        while True:
            try:
                msg = await consumer.next_msg(READ_SLICE)
            except EventsUnavailable as error:
                # The readers notice the outage themselves (they ask the link) and fall back
                # to the scheduler; the consumer resumes at its position once NATS is back.
                log.debug("hub %s: unreadable (%s)", self.subject, error)
                if not await self.link.wait_connected(READ_SLICE):
                    continue
                await asyncio.sleep(0.05 if self.link.connected else 0)
                continue
            if msg is None:
                continue
            message = Message(
                msg.metadata.sequence.stream, msg.subject, msg.data, dict(msg.headers or {})
            )
            self.position = message.sequence + 1
            decoded = self.decode(message)
            if decoded is None:
                continue
            item, keys = decoded
            # A reader may follow several keys of one message (two of its tags): once each.
            targets: set[HubReader[T]] = set()
            for key in (*keys, ALL):
                targets.update(self._by_key.get(key, ()))
            for reader in targets:
                reader.offer(message.sequence, item)
            self.delivered += len(targets)


class HubReader(Generic[T]):
    """One subscriber's cursor over a hub: catch-up from the stream, then the hub's messages.

    Same contract as an OrderedReader: :meth:`next` returns the next item or None after
    ``timeout`` quiet seconds, and raises EventsUnavailable while NATS is down."""

    def __init__(
        self, hub: Hub[T], keys: tuple[str, ...], subject: str, start_sequence: int
    ) -> None:
        self._hub = hub
        # No keys: every message of the hub (a run stream's readers).
        self.keys = keys or (ALL,)
        self._subject = subject
        # The stream sequence of the next message this reader wants.
        self._next = max(start_sequence, 1)
        # Messages before this come from the stream, from it on through the inbox; None: not
        # joined yet, or the inbox overflowed.
        self._live_from: int | None = None
        self._joined = False
        self._inbox: collections.deque[tuple[int, T]] = collections.deque()
        # The subscriber waiting for the inbox, if any: a bare future and a timer, not
        # asyncio.wait_for (which makes a task per wait, the largest cost of a delivery).
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # With the hub's wake_every: when it was last woken, and the wake-up set for later.
        self._woken_at = 0.0
        self._wake_timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def next_sequence(self) -> int:
        """The stream sequence after the last message returned (or the start)."""
        return self._next

    def offer(self, sequence: int, item: T) -> None:
        """Called by the hub with each message for this reader's keys, in stream order."""
        if self._live_from is None or sequence < self._next:
            return
        if len(self._inbox) >= MAX_INBOX:
            # The subscriber is not keeping up: forget the inbox and read from the stream.
            self._inbox.clear()
            self._live_from = None
            return
        self._inbox.append((sequence, item))
        waiter = self._waiter
        if waiter is None or waiter.done() or self._wake_timer is not None:
            return
        every = self._hub.wake_every
        if every <= 0:
            waiter.set_result(None)
            return
        loop = waiter.get_loop()
        due = self._woken_at + every
        if loop.time() >= due:
            self._wake_now()
        else:
            self._wake_timer = loop.call_at(due, self._wake_now)

    def _wake_now(self) -> None:
        self._wake_timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._woken_at = waiter.get_loop().time()
            waiter.set_result(None)

    async def next(self, timeout: float) -> T | None:
        if self._closed:
            raise EventsUnavailable("the reader is closed")
        if not self._hub.link.connected:
            raise EventsUnavailable(f"not connected to NATS at {self._hub.link.url}")
        if self._live_from is None:
            position = await self._hub.started()
            self._live_from = position
            if not self._joined:
                self._joined = True
                self._hub.add(self)
        if self._next < self._live_from:
            caught = await self._catch_up()
            if caught is not None:
                return caught
        item = self._from_inbox()
        if item is None and timeout > 0:
            await self._wait_inbox(timeout)
            item = self._from_inbox()
        return item

    async def next_batch(self, timeout: float, limit: int) -> list[T]:
        """Like :meth:`next`, but with every message at hand, up to ``limit``: what it has
        to catch up on, then what is in its inbox. Empty after ``timeout`` quiet seconds. A
        reader that falls behind a fast subject so takes what piled up in one go, not one
        wake-up each."""
        first = await self.next(timeout)
        if first is None:
            return []
        batch = [first]
        while len(batch) < limit and self._live_from is not None:
            item = None
            if self._next < self._live_from:
                try:
                    item = await self._catch_up()
                except EventsUnavailable:
                    break  # what it has goes now; the next call meets the outage
            if item is None:
                item = self._from_inbox()  # caught up (_catch_up moved to the live position)
            if item is None:
                break
            batch.append(item)
        return batch

    def _from_inbox(self) -> T | None:
        while self._inbox:
            sequence, item = self._inbox.popleft()
            if sequence >= self._next:
                self._next = sequence + 1
                return item
        return None

    async def _wait_inbox(self, timeout: float) -> None:
        """Until the hub offers a message, or ``timeout`` seconds pass."""
        # Looked up once: each lookup is a getpid() system call on Python 3.11.
        loop = self._loop = self._loop or asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(timeout, _wake, waiter)
        self._waiter = waiter
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def _catch_up(self) -> T | None:
        """The next message before the live position, read from the stream; None once there
        is none (the reader then takes the inbox)."""
        live_from = self._live_from
        assert live_from is not None
        while self._next < live_from:
            try:
                raw = await self._hub.link.jetstream().get_msg(
                    self._hub.stream, seq=self._next, subject=self._subject, next=True
                )
            except nats.js.errors.NotFoundError:
                break
            except (nats.errors.Error, TimeoutError) as error:
                raise EventsUnavailable(f"cannot read {self._subject}: {error!r}") from error
            sequence = int(raw.seq or 0)
            if sequence < self._next or sequence >= live_from:
                break
            self._next = sequence + 1
            message = Message(sequence, raw.subject or "", raw.data or b"", raw.headers)
            decoded = self._hub.decode(message)
            if decoded is not None:
                return decoded[0]
        self._next = max(self._next, live_from)
        return None

    async def close(self) -> None:
        """Leave the hub; never raises."""
        self._closed = True
        self._inbox.clear()
        if self._wake_timer is not None:
            self._wake_timer.cancel()
            self._wake_timer = None
        if self._waiter is not None:
            _wake(self._waiter)
        self._hub.remove(self)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Hubs:
    """The hubs of one realtime process, made on first use and dropped when they stop."""

    def __init__(self, link: NatsLink) -> None:
        self._link = link
        self._hubs: dict[tuple[str, str], Hub[object]] = {}

    def get(self, stream: str, subject: str, decode: Decoder[T], wake_every: float = 0.0) -> Hub[T]:
        hub = self._hubs.get((stream, subject))
        if hub is None:
            hub = Hub(self._link, stream, subject, decode, self._forget, wake_every)
            self._hubs[(stream, subject)] = hub  # type: ignore[assignment]
        return hub  # type: ignore[return-value]

    def _forget(self, hub: Hub[T]) -> None:
        if self._hubs.get((hub.stream, hub.subject)) is hub:
            del self._hubs[(hub.stream, hub.subject)]

    @property
    def readers(self) -> int:
        """Readers across every hub (for tests and introspection)."""
        return sum(hub.readers for hub in self._hubs.values())

    def __len__(self) -> int:
        return len(self._hubs)

    async def close(self) -> None:
        for hub in list(self._hubs.values()):
            await hub.close_readers()
        self._hubs.clear()


# -- run events ------------------------------------------------------------------------------


def run_key(run_id: str) -> str:
    return f"run:{run_id}"


def tag_key(tag: str) -> str:
    return f"tag:{tag}"


def batch_key(batch_id: str) -> str:
    return f"batch:{batch_id}"


def decode_run_event(message: Message) -> tuple[tuple[run_pb2.Run, bool], Iterable[str]] | None:
    """A run event's run and whether it was truncated, for its run, tags and batch."""
    try:
        event = events_pb2.RunEvent.FromString(message.data)
    except DecodeError:
        # Counts as a missing event: a subscription's gap or idle check asks the scheduler.
        log.warning("skipping an undecodable event on %s", message.subject)
        return None
    run: run_pb2.Run = event.run
    keys = [run_key(run.id), *(tag_key(tag) for tag in run.tags)]
    if run.batch_id:
        keys.append(batch_key(run.batch_id))
    return (run, event.truncated), keys


async def last_run_event(
    link: NatsLink, environment_id: str, run_id: str
) -> tuple[int, int] | None:
    """The stream sequence and run version of the run's last event, or None if the stream keeps
    none. Raises EventsUnavailable when NATS cannot say."""
    subject = subjects.run_event(environment_id, run_id)
    try:
        raw = await link.jetstream().get_last_msg(subjects.RUN_EVENTS_STREAM, subject)
    except nats.js.errors.NotFoundError:
        return None
    except (nats.errors.Error, TimeoutError) as error:
        raise EventsUnavailable(f"cannot read {subject}: {error!r}") from error
    try:
        version = int(events_pb2.RunEvent.FromString(raw.data or b"").run.version)
    except DecodeError:
        version = 0
    return int(raw.seq or 0), version


class RunEvents:
    """Run events in stream order, for one run (``run_id``) or a set of runs (``keys``), through
    the environment's hub. From ``start_sequence`` on (0: the first kept)."""

    def __init__(
        self,
        hubs: Hubs,
        environment_id: str,
        run_id: str = "",
        keys: Iterable[str] = (),
        start_sequence: int = 0,
    ) -> None:
        hub = hubs.get(
            subjects.RUN_EVENTS_STREAM,
            subjects.run_events_of_environment(environment_id),
            decode_run_event,
        )
        if run_id:
            # Catching up, read only the run's own subject.
            subject = subjects.run_event(environment_id, run_id)
            self._reader = hub.reader((run_key(run_id),), subject, start_sequence)
        else:
            self._reader = hub.reader(keys, None, start_sequence)
        # The last event returned left out large fields (RunEvent.truncated).
        self.truncated = False

    @property
    def next_sequence(self) -> int:
        return self._reader.next_sequence

    async def next(self, timeout: float) -> run_pb2.Run | None:
        """The run carried by the next event, or None if none came within ``timeout`` seconds.
        Raises EventsUnavailable when the events cannot be read."""
        item = await self._reader.next(timeout)
        if item is None:
            return None
        run, self.truncated = item
        return run

    async def close(self) -> None:
        await self._reader.close()
