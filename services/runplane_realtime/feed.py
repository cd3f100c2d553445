"""A subscriber's bounded buffer, between what it follows and its connection.

A subscription (or a stream reader) reads JetStream as fast as events come; its subscriber's
connection takes them only as fast as the client reads. A :class:`Feed` pumps the one into a
buffer of at most ``RealtimeSettings.subscriber_buffer`` bytes that the other drains. A
subscriber whose buffer is full is cut off: the pump stops, the subscription closes (its
JetStream consumer is deleted, so NATS stops sending and the buffer's memory returns), and the
connection ends with :class:`FellBehind`, which names where to resume. Nothing the subscriber was
sent is lost: it resumes after the last version, cursor or index it received.

A subscriber whose credentials are a public access token is cut off when the token expires, with
UNAUTHENTICATED, whether or not an event is due.

    ServiceError
    └── FellBehind     RESOURCE_EXHAUSTED, with an ErrorInfo (reason SUBSCRIBER_FELL_BEHIND)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from typing import Generic, TypeVar

from runplane_common import errors
from runplane_realtime.scheduler import Metadata

log = logging.getLogger("runplane.realtime")

T = TypeVar("T")

# How long closing a feed waits for its source to close before cancelling it again.
CLOSE_PATIENCE = 1.0

# The ErrorInfo reason of a FellBehind status: clients resume on it (the SDK does).
FELL_BEHIND_REASON = "SUBSCRIBER_FELL_BEHIND"


class FellBehind(errors.ServiceError):
    """The subscriber did not read fast enough; it may resume where ``resume`` says."""

    code = errors.Code.RESOURCE_EXHAUSTED
    reason = FELL_BEHIND_REASON

    def __init__(self, limit: int, resume: dict[str, str]) -> None:
        where = ", ".join(f"{name}={value}" for name, value in resume.items())
        super().__init__(
            f"the subscriber fell behind (more than {limit} bytes not yet read) and was cut "
            f"off; resume with {where}"
        )
        self.info = resume  # the ErrorInfo's metadata: where to resume


class Feed(Generic[T]):
    """Items of ``source`` for one subscriber, through a buffer of at most ``limit`` bytes
    (``size`` measures an item; one item always fits an empty buffer).

    Read with :meth:`next`. ``resume(last)`` says where a subscriber resumes after ``last``, the
    last item it took (None: none yet). When the feed is cut off (buffer full, token expired) its
    source is closed and its buffer dropped at once, :attr:`cut_off` is set, and :meth:`next`
    raises the error. A gRPC call blocked sending to a client that does not read gets it when
    the client reads again (or the call goes with the client); an SSE response waits for
    :attr:`cut_off` as well as for its writes.
    """

    def __init__(
        self,
        source: AsyncGenerator[T, None],
        limit: int,
        size: Callable[[T], int],
        resume: Callable[[T | None], dict[str, str]],
        expires_at_ms: int | None = None,
    ) -> None:
        self._source = source
        self._limit = max(limit, 1)
        self._size = size
        self._resume = resume
        self._items: collections.deque[tuple[T, int]] = collections.deque()
        self.buffered_bytes = 0
        self._last: T | None = None
        self._ended = False
        self._error: BaseException | None = None
        loop = asyncio.get_running_loop()
        self._ready = Signal(loop)
        self._taken = 0  # items the subscriber has taken
        self._space = Signal(loop)
        # Set when the feed is cut off: a subscriber busy writing waits for this too.
        self.cut_off = asyncio.Event()
        # The feed is cut off or closing: the pump stops (and, when it stops by itself, is not
        # cancelled while it deletes its consumer).
        self._stopping = False
        self._pump = asyncio.create_task(self._fill(), name="realtime-feed")
        self._expiry: asyncio.TimerHandle | None = None
        if expires_at_ms is not None:
            loop = asyncio.get_running_loop()
            delay = max(expires_at_ms / 1000 - time.time(), 0.0)
            self._expiry = loop.call_at(loop.time() + delay, self._expire)

    async def next(self) -> T:
        """The next item; raises StopAsyncIteration at the end, or the reason the feed stopped."""
        while not self._items:
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self.take_ready(1)[0]

    def take_ready(self, limit: int) -> list[T]:
        """Up to ``limit`` items that are buffered already, in order; never waits, never
        raises. A subscriber sends what came together in one message or write."""
        taken: list[T] = []
        while self._items and len(taken) < limit:
            item, size = self._items.popleft()
            self.buffered_bytes -= size
            taken.append(item)
        if taken:
            self._last = taken[-1]
            self._taken += len(taken)
            self._space.set()
        return taken

    def when_stopped(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the feed reads no more (its source is closed)."""
        self._pump.add_done_callback(lambda _: callback())

    def __aiter__(self) -> Feed[T]:
        return self

    async def __anext__(self) -> T:
        return await self.next()

    async def aclose(self) -> None:
        """Stop the pump and close the source (deleting its consumer)."""
        if self._expiry is not None:
            self._expiry.cancel()
        if not self._stopping:
            self._stopping = True
            self._pump.cancel()
        while not self._pump.done():
            try:
                await asyncio.wait({self._pump}, timeout=CLOSE_PATIENCE)
            except asyncio.CancelledError:
                self._pump.cancel()
                raise
            if not self._pump.done():
                # A source can lose a cancellation (asyncio.wait_for in Python 3.11, used by
                # nats-py, may return a result that came at the same time): insist.
                self._pump.cancel()
        self._drop_buffer()

    async def _fill(self) -> None:
        try:
            async with contextlib.aclosing(self._source):
                async for item in self._source:
                    if self._stopping:  # cut off or closed, though the cancellation was lost
                        return
                    size = self._size(item)
                    while self._taken == 0 and self._full(size):
                        # Not started yet (a subscriber takes its first item at once, even if
                        # its client does not read): a cut-off now would resume where it is.
                        self._space.clear()
                        await self._space.wait()
                    if self._full(size):
                        self._cut(FellBehind(self._limit, self._resume(self._last)))
                        return  # aclosing closes the source: its consumer goes
                    self._items.append((item, size))
                    self.buffered_bytes += size
                    self._ready.set()
                    # A stream replaying history has its next event at hand: let the subscriber
                    # take this one first.
                    await asyncio.sleep(0)
            self._ended = True
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the source's failure is the subscriber's (a refusal, ...)
            self._error = error
        finally:
            self._ready.set()

    def _full(self, size: int) -> bool:
        return bool(self._items) and self.buffered_bytes + size > self._limit

    def _expire(self) -> None:
        self._expiry = None
        if self._stopping:
            return
        self._stopping = True
        self._pump.cancel()  # its source closes as the cancellation unwinds
        self._cut(errors.Unauthenticated("public access token: expired"))

    def _cut(self, error: errors.ServiceError) -> None:
        if self._error is not None:
            return
        self._stopping = True
        self._error = error
        log.info("a subscriber is cut off: %s", error.message)
        self._drop_buffer()
        self._ready.set()
        self.cut_off.set()

    def _drop_buffer(self) -> None:
        self._items.clear()
        self.buffered_bytes = 0


class Signal:
    """An asyncio.Event for one waiter at a time, bound to its loop once: asyncio's Event
    looks the running loop up at each wait, which on Python 3.11 is a getpid() system call,
    and a subscriber in a busy feed waits thousands of times a second."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    async def wait(self) -> None:
        if self._flag:
            return
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None


def token_expiry_ms(credentials: Metadata) -> int | None:
    """When the caller's public access token expires (ms since the epoch); None for a secret
    key. The scheduler has checked the token's signature by the time a feed opens, so its claims
    can be read here without the signing key."""
    for key, value in credentials:
        if key != "authorization":
            continue
        token = value.removeprefix("Bearer ").strip()
        if token.count(".") != 2:
            return None
        body = token.split(".")[1]
        try:
            claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (ValueError, binascii.Error):
            return None
        exp = claims.get("exp") if isinstance(claims, dict) else None
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            return math.ceil(exp * 1000)
        return None
    return None
