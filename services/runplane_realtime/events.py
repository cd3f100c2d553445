"""JetStream plumbing for subscriptions and streams: the service's NATS connection, ordered
readers of one subject, and run events.

EventsUnavailable   NATS, JetStream or the RUN_EVENTS stream cannot be read right now
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from runplane_common import jetstream

log = logging.getLogger("runplane.realtime.events")

# How long a JetStream API call (consumer create/delete) may take before the read falls back to
# the scheduler; short, because a subscriber is waiting.
JS_TIMEOUT = 2.0
# The server deletes a consumer nobody listens to after this long: a safety net for consumers
# this process could not delete itself (it crashed, or NATS was unreachable at the time).
CONSUMER_INACTIVE_THRESHOLD = 30.0
# An ordered consumer that brings neither a message nor a heartbeat for two of these is remade
# (by nats-py) after its stream sequence: so a consumer lost with its NATS server (in a cluster,
# the consumer may live on another server than the connection's) stalls its readers ~2 s.
CONSUMER_HEARTBEAT = 1.0


class EventsUnavailable(Exception):
    """The run's events cannot be read now: NATS is down, or the stream or consumer is missing."""


class NatsLink:
    """The service's one NATS connection, made in the background and remade after every outage.

    The service must start and serve while NATS is down, so nothing waits for this connection:
    readers ask :attr:`connected` and fall back to the scheduler while it is false. :attr:`epoch`
    grows with every (re)connection; a consumer made in an earlier epoch may be gone (a restarted
    server keeps no in-memory consumers), so readers remake theirs when it changes.
    """

    def __init__(self, servers: str | Sequence[str]) -> None:
        """``servers``: one server's URL, or the servers of a cluster."""
        self.servers = (servers,) if isinstance(servers, str) else tuple(servers)
        self.url = ",".join(self.servers)  # for messages
        self.epoch = 0
        self._nc: NATS | None = None
        self._up = asyncio.Event()
        self._warned = False  # about the current outage, so it is logged once
        self._task: asyncio.Task[None] | None = None
        # NATS failures (failed connects, lost connections, errors it reported), for metrics.
        self.errors = 0

    def start(self) -> None:
        """Begin connecting; returns at once."""
        self._task = asyncio.create_task(self._connect(), name="realtime-nats-connect")

    @property
    def connected(self) -> bool:
        return self._nc is not None and bool(self._nc.is_connected)

    def jetstream(self) -> JetStreamContext:
        """A JetStream context on the live connection; raises EventsUnavailable when down."""
        if self._nc is None or not self._nc.is_connected:
            raise EventsUnavailable(f"not connected to NATS at {self.url}")
        return self._nc.jetstream(timeout=JS_TIMEOUT)

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a live connection; true if there is one."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout)
        return self.connected

    async def stop(self) -> None:
        """Stop connecting and close the connection."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        nc, self._nc = self._nc, None
        self._up.clear()
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):  # NATS may be gone already
                await nc.close()

    async def _connect(self) -> None:
        delay = 0.2
        while True:
            try:
                # With max_reconnect_attempts=-1 nats-py retries the first connection too, so this
                # returns once NATS is up; the loop only covers errors it does not retry.
                self._nc = await jetstream.connect(
                    self.servers,
                    "runplane-realtime",
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                )
            except Exception as error:
                self.errors += 1
                log.warning("cannot connect to NATS at %s (%s); retrying", self.url, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("connected to NATS at %s", self.url)
            self._warned = False
            self.epoch += 1
            self._up.set()
            return

    async def _on_disconnected(self) -> None:
        self.errors += 1
        self._up.clear()
        self._outage(f"lost NATS at {self.url}")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS at %s", self.url)
        self._warned = False
        self.epoch += 1
        self._up.set()

    async def _on_error(self, error: Exception) -> None:
        # Every failed (re)connect attempt lands here: only the first of an outage is a warning.
        self.errors += 1
        self._outage(f"cannot reach NATS at {self.url} ({error!r})")

    def _outage(self, what: str) -> None:
        if self._warned:
            log.debug("%s", what)
            return
        self._warned = True
        log.warning("%s; subscriptions follow the scheduler until it is back", what)


class OrderedReader:
    """The messages of one subject of one stream in order, read with an ordered push consumer.

    The consumer is made on first read and remade after every NATS reconnection, starting at the
    stream sequence after the last message read, so an outage loses no message JetStream kept.
    """

    def __init__(self, link: NatsLink, stream: str, subject: str, start_sequence: int = 0) -> None:
        self._link = link
        self._stream = stream
        self._subject = subject
        self._sub: Any = None
        self._epoch = 0
        # Stream sequence to start the next consumer at; 0 means the stream's first message.
        self._next_sequence = start_sequence

    @property
    def subject(self) -> str:
        return self._subject

    @property
    def next_sequence(self) -> int:
        return self._next_sequence

    async def next_msg(self, timeout: float) -> Msg | None:
        """The next message, or None if none came within ``timeout`` seconds. Raises
        EventsUnavailable when the stream cannot be read."""
        if not self._link.connected:
            # An idle reader does not notice a dead connection until its timeout; asking the link
            # lets the caller switch to the scheduler at once.
            raise EventsUnavailable(f"not connected to NATS at {self._link.url}")
        sub = await self._subscription()
        try:
            msg: Msg = await sub.next_msg(timeout=timeout)
        except nats.errors.TimeoutError:
            return None
        except nats.errors.Error as error:  # the connection closed under the read
            await self._drop()
            raise EventsUnavailable(str(error) or type(error).__name__) from error
        self._next_sequence = msg.metadata.sequence.stream + 1
        return msg

    async def close(self) -> None:
        """Remove the consumer; the reader may be cancelled, so this never raises an Exception."""
        await self._drop()

    async def _subscription(self) -> Any:
        if self._sub is not None and self._epoch == self._link.epoch:
            return self._sub
        await self._drop()
        js = self._link.jetstream()
        epoch = self._link.epoch
        if self._next_sequence:
            policy = DeliverPolicy.BY_START_SEQUENCE
            config = ConsumerConfig(deliver_policy=policy, opt_start_seq=self._next_sequence)
        else:
            policy = DeliverPolicy.ALL
            config = ConsumerConfig(deliver_policy=policy)
        try:
            self._sub = await js.subscribe(
                self._subject,
                stream=self._stream,
                ordered_consumer=True,
                deliver_policy=policy,
                config=config,
                inactive_threshold=CONSUMER_INACTIVE_THRESHOLD,
                idle_heartbeat=CONSUMER_HEARTBEAT,
            )
        except (nats.errors.Error, TimeoutError) as error:
            raise EventsUnavailable(f"cannot read {self._subject}: {error!r}") from error
        self._epoch = epoch
        return self._sub

    async def _drop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is None:
            return
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        # nats-py leaves an ephemeral consumer on the server after unsubscribe (until the inactive
        # threshold); delete it now. Its name is only kept on a private attribute, which the
        # ordered consumer updates whenever it remakes the consumer.
        consumer = getattr(sub, "_consumer", None)
        if consumer and self._link.connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._link.jetstream().delete_consumer(self._stream, consumer),
                    JS_TIMEOUT,
                )


async def stream_bounds(link: NatsLink, stream: str) -> tuple[int, int]:
    """The stream's first kept sequence, and the sequence its next message will have (where a
    reader of only new messages starts). Raises EventsUnavailable when NATS cannot say."""
    try:
        info = await asyncio.wait_for(link.jetstream().stream_info(stream), JS_TIMEOUT)
    except (nats.errors.Error, TimeoutError) as error:
        raise EventsUnavailable(f"cannot read stream {stream}: {error!r}") from error
    last = int(info.state.last_seq)
    return max(int(info.state.first_seq), 1), last + 1
