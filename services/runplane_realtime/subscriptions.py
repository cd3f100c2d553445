"""Subscriptions: runs' versions in order, from JetStream, checked against the scheduler.

A subscription reads run events with an ordered JetStream consumer and sends every version newer
than the last one sent for that run, once and in order. The scheduler's database is the system
of record, so whenever the stream cannot say what happened next the subscription asks the
scheduler for the snapshot (``GetRun``, or ``ListRuns`` for a set of runs) and sends what is newer:

- a version gap (events lost or purged): at once;
- no event for ``reconcile_interval`` seconds: in case the last events never reached NATS (a
  snapshot more than one version ahead waits a grace first: the versions between are most likely
  still in the relay, and would be skipped);
- NATS unreachable: every second until it returns, then the stream again.

:class:`RunSubscription` follows one run from the start of its events. :class:`RunSetSubscription`
follows the runs with a tag, or of a batch: the scheduler's list first, then the environment's
new events filtered to the set (a consumer positioned before the list is taken, so nothing falls
between the two).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Callable

from runplane.v1 import run_pb2
from runplane_common import errors, subjects
from runplane_realtime.events import EventsUnavailable, NatsLink, stream_bounds
from runplane_realtime.fanout import Hubs, RunEvents, batch_key, last_run_event, tag_key
from runplane_realtime.scheduler import Metadata, Scheduler

log = logging.getLogger("runplane.realtime")

FINAL_STATUSES = frozenset(
    {
        run_pb2.RUN_STATUS_COMPLETED,
        run_pb2.RUN_STATUS_CANCELED,
        run_pb2.RUN_STATUS_FAILED,
        run_pb2.RUN_STATUS_CRASHED,
        run_pb2.RUN_STATUS_SYSTEM_FAILURE,
        run_pb2.RUN_STATUS_EXPIRED,
        run_pb2.RUN_STATUS_TIMED_OUT,
    }
)

# While the stream cannot be read, ask the scheduler this often.
OUTAGE_POLL_INTERVAL = 1.0
# A waiting subscription looks up from the stream this often, to notice a NATS outage promptly.
READ_SLICE = 1.0
MIN_RECONCILE_INTERVAL = 0.1
# An idle check that finds the scheduler more than one version ahead sends its snapshot only
# when the gap has lasted this many reconcile intervals (and at least GAP_GRACE_MIN seconds):
# until then the versions between are most likely still on their way through the relay, and
# sending the snapshot would skip them.
GAP_GRACE_INTERVALS = 5
GAP_GRACE_MIN = 5.0
# The idle checks of all the subscriptions of a process ask the scheduler this many times a
# second at most, however many subscribers there are (see IdleChecks).
IDLE_CHECKS_PER_SECOND = 100.0


class IdleChecks:
    """Keeps the idle checks of a process's subscriptions within a rate. Each subscription
    checks after ``reconcile_interval`` quiet seconds, or, with more subscriptions than the
    rate allows at that interval, after ``subscriptions / rate`` seconds (spread at random over
    half as much again, so that subscribers that came together do not check together). 10,000
    idle subscribers so cost the scheduler 100 GetRun a second, not 2,000."""

    def __init__(self, rate: float = IDLE_CHECKS_PER_SECOND) -> None:
        self.rate = rate
        self.subscriptions = 0

    def interval(self, base: float) -> float:
        spread = self.subscriptions / self.rate
        return base if spread <= base else spread * (1 + random.random() / 2)

    def join(self) -> None:
        self.subscriptions += 1

    def leave(self) -> None:
        self.subscriptions -= 1


class GapGrace:
    """When a gap between the last version sent and the scheduler's was first seen, per run."""

    def __init__(self, interval: float) -> None:
        self._grace = max(GAP_GRACE_INTERVALS * interval, GAP_GRACE_MIN)
        self._since: dict[str, tuple[int, float]] = {}

    def may_send(self, snapshot: run_pb2.Run, last_version: int) -> bool:
        """True for the next version (no gap), or for a gap that has outlasted the grace."""
        if last_version == 0 or snapshot.version == last_version + 1:
            self._since.pop(snapshot.id, None)
            return True
        now = asyncio.get_running_loop().time()
        seen = self._since.get(snapshot.id)
        if seen is None or seen[0] != last_version:
            self._since[snapshot.id] = (last_version, now)
            return False
        if now - seen[1] >= self._grace:
            del self._since[snapshot.id]
            return True
        return False


def is_final(run: run_pb2.Run) -> bool:
    return run.status in FINAL_STATUSES


class RunSubscription:
    """One subscriber's cursor over one run: the last version sent and where the next comes from."""

    def __init__(
        self,
        scheduler: Scheduler,
        link: NatsLink,
        events: RunEvents,
        credentials: Metadata,
        run_id: str,
        after_version: int,
        reconcile_interval: float,
        idle_checks: IdleChecks | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._link = link
        self._events = events
        self._idle = idle_checks if idle_checks is not None else IdleChecks()
        self._credentials = credentials
        self._run_id = run_id
        # A floor, so that a zero setting cannot turn reconciling into a busy loop.
        self._interval = max(reconcile_interval, MIN_RECONCILE_INTERVAL)
        self._gaps = GapGrace(self._interval)
        self.last_version = after_version

    async def runs(self, keep_open: bool) -> AsyncGenerator[run_pb2.Run, None]:
        """Every version newer than the last sent, in order; ends after a final one unless
        ``keep_open``."""
        self._idle.join()
        try:
            while True:
                run = await self._next()
                self.last_version = run.version
                yield run
                if is_final(run) and not keep_open:
                    return
        finally:
            self._idle.leave()
            await self._events.close()

    async def _next(self) -> run_pb2.Run:
        """The next version to send: from the stream, or the scheduler's snapshot when the
        stream falls short."""
        loop = asyncio.get_running_loop()
        reconcile_at = loop.time() + self._idle.interval(self._interval)
        while True:
            if loop.time() >= reconcile_at:
                # Nothing new for a while: the last events may never have reached NATS.
                reconcile_at = loop.time() + self._idle.interval(self._interval)
                snapshot = await self._newer_snapshot()
                if snapshot is not None and self._gaps.may_send(snapshot, self.last_version):
                    return snapshot
                continue
            try:
                run = await self._events.next(min(READ_SLICE, reconcile_at - loop.time()))
            except EventsUnavailable as error:
                log.debug("run %s: events unreadable (%s)", self._run_id, error)
                nats_down = not self._link.connected
                # NATS down: give it up to a poll interval to come back (a service just started,
                # a blip) before asking the scheduler; that wait also paces the polling.
                if nats_down and await self._link.wait_connected(OUTAGE_POLL_INTERVAL):
                    continue
                if snapshot := await self._newer_snapshot():
                    return snapshot
                if not nats_down:  # connected, but no stream or consumer yet: pace the retries
                    await asyncio.sleep(OUTAGE_POLL_INTERVAL)
                continue
            if run is None or run.version <= self.last_version:
                continue  # a quiet slice, or a duplicate, or history the subscriber already has
            if run.version == self.last_version + 1:
                if self._events.truncated:  # too big for NATS: the scheduler has it whole
                    snapshot = await self._newer_snapshot()
                    if snapshot is not None and snapshot.version >= run.version:
                        return snapshot
                return run
            # A gap: versions between were lost or purged. The snapshot is at least as new as
            # this event unless the scheduler is unreachable; send whichever is newer.
            snapshot = await self._newer_snapshot()
            return snapshot if snapshot is not None and snapshot.version > run.version else run

    async def _newer_snapshot(self) -> run_pb2.Run | None:
        """The scheduler's snapshot if newer than the last version sent."""
        try:
            run = await self._scheduler.get_run(self._run_id, self._credentials)
        except errors.Unavailable as error:
            # The stream may still deliver; the subscriber keeps it. A refusal (key revoked,
            # run gone) is not caught: it ends the subscription.
            log.warning("run %s: no snapshot from the scheduler: %s", self._run_id, error.message)
            return None
        return run if run.version > self.last_version else None


class RunSet:
    """Which runs a set subscription follows, and how the scheduler lists them."""

    def __init__(
        self,
        name: str,
        matches: Callable[[run_pb2.Run], bool],
        tags: tuple[str, ...] = (),
        batch_id: str = "",
        created_after_ms: int | None = None,
    ) -> None:
        self.name = name
        self._matches = matches
        self.tags = tags
        self.batch_id = batch_id
        self.created_after_ms = created_after_ms

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of the events that may concern the set (see fanout)."""
        batch = (batch_key(self.batch_id),) if self.batch_id else ()
        return (*(tag_key(tag) for tag in self.tags), *batch)

    def matches(self, run: run_pb2.Run) -> bool:
        if self.created_after_ms is not None and run.created_at.ToMilliseconds() < (
            self.created_after_ms
        ):
            return False
        return self._matches(run)

    @classmethod
    def with_tag(cls, tag: str, created_after_ms: int) -> RunSet:
        return cls(f"tag {tag}", lambda run: tag in run.tags, (tag,), "", created_after_ms)

    @classmethod
    def of_batch(cls, batch_id: str) -> RunSet:
        return cls(f"batch {batch_id}", lambda run: run.batch_id == batch_id, (), batch_id)


class RunSetSubscription:
    """One subscriber's cursor over a set of runs: the last version sent of each.

    Never ends by itself: new runs may join the set at any time."""

    def __init__(
        self,
        scheduler: Scheduler,
        link: NatsLink,
        hubs: Hubs,
        credentials: Metadata,
        environment_id: str,
        runs: RunSet,
        after_versions: dict[str, int],
        reconcile_interval: float,
        resume_cursor: int = 0,
        idle_checks: IdleChecks | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._link = link
        self._hubs = hubs
        self._idle = idle_checks if idle_checks is not None else IdleChecks()
        self._credentials = credentials
        self._environment_id = environment_id
        self._set = runs
        self._interval = max(reconcile_interval, MIN_RECONCILE_INTERVAL)
        self.versions = dict(after_versions)
        self._resume_cursor = resume_cursor
        # A subscriber that resumes from a cursor naming no versions (an EventSource, from its
        # Last-Event-ID) has every change before the cursor: a list must not send those again.
        self._blind_cursor = resume_cursor if resume_cursor and not after_versions else 0
        # Runs looked up for that (id: the version they were at), so each is looked up once.
        self._looked_up: dict[str, int] = {}
        self._gaps = GapGrace(self._interval)
        self._events: RunEvents | None = None
        self._pending: list[run_pb2.Run] = []

    async def runs(self) -> AsyncGenerator[tuple[run_pb2.Run, int], None]:
        """Every version newer than the last sent of each run in the set, in order per run,
        each with its cursor: the stream position before which every change has been sent."""
        self._idle.join()
        try:
            if not await self._start_events():
                await self._relist()
            while True:
                while self._pending:
                    run = self._pending.pop(0)
                    if run.version > self.versions.get(run.id, 0):
                        self.versions[run.id] = run.version
                        cursor = self._events.next_sequence if self._events is not None else 0
                        yield run, cursor
                await self._fill()
        finally:
            self._idle.leave()
            if self._events is not None:
                await self._events.close()

    async def _start_events(self) -> bool:
        """Position a consumer (at the resume cursor, or at the stream's end) and list the set
        unless resuming; False while NATS cannot say where to start."""
        if self._events is not None:
            return True
        try:
            first, start = await stream_bounds(self._link, subjects.RUN_EVENTS_STREAM)
        except EventsUnavailable as error:
            log.debug("%s: events unreadable (%s)", self._set.name, error)
            return False
        if self._resume_cursor >= first:
            # Every change since the cursor is still in the stream: replay it, in order.
            self._events = self._reader(self._resume_cursor)
            self._resume_cursor = 0
            return True
        # A first subscription, or a cursor JetStream has purged since: the list, then what
        # follows it.
        self._resume_cursor = 0
        self._events = self._reader(start)
        await self._relist_unless_unavailable()
        return True

    def _reader(self, start_sequence: int) -> RunEvents:
        return RunEvents(
            self._hubs, self._environment_id, keys=self._set.keys, start_sequence=start_sequence
        )

    async def _relist(self, idle: bool = False) -> None:
        """Queue the scheduler's list: the state of every run in the set now. After an idle
        interval a run's snapshot across a gap waits out the grace (see GapGrace)."""
        listed = await self._scheduler.list_runs(
            self._credentials,
            tags=self._set.tags,
            batch_id=self._set.batch_id,
            created_after_ms=self._set.created_after_ms,
        )
        for run in listed:
            last = self.versions.get(run.id, 0)
            if last == 0 and self._blind_cursor and not await self._changed_unseen(run):
                continue
            if run.version > last and (not idle or self._gaps.may_send(run, last)):
                self._pending.append(run)

    async def _changed_unseen(self, run: run_pb2.Run) -> bool:
        """For a subscriber resumed from a cursor alone, and a run not sent since: whether the
        run changed after the cursor and its event was read past without arriving (it was lost),
        so its snapshot must go. A run whose last event is before the cursor is one the
        subscriber has; one whose event is still ahead of the reader will come through it."""
        if self._looked_up.get(run.id) == run.version:
            return False
        try:
            found = await last_run_event(self._link, self._environment_id, run.id)
        except EventsUnavailable:
            return False  # the replay from the cursor brings every change once NATS is back
        if found is None or found[0] < self._blind_cursor:
            self._looked_up[run.id] = run.version
            return False
        return self._events is not None and self._events.next_sequence > found[0]

    async def _fill(self) -> None:
        """Wait for something to send and queue it."""
        loop = asyncio.get_running_loop()
        reconcile_at = loop.time() + self._idle.interval(self._interval)
        while not self._pending:
            if loop.time() >= reconcile_at:
                reconcile_at = loop.time() + self._idle.interval(self._interval)
                await self._relist_unless_unavailable(idle=True)
                continue
            if not await self._start_events():
                # The consumer starts after the list, so it must be made first: poll the
                # scheduler meanwhile.
                await self._link.wait_connected(OUTAGE_POLL_INTERVAL)
                if await self._start_events():
                    continue
                await self._relist_unless_unavailable()
                await asyncio.sleep(OUTAGE_POLL_INTERVAL)
                continue
            assert self._events is not None
            try:
                run = await self._events.next(min(READ_SLICE, reconcile_at - loop.time()))
            except EventsUnavailable as error:
                log.debug("%s: events unreadable (%s)", self._set.name, error)
                nats_down = not self._link.connected
                if nats_down and await self._link.wait_connected(OUTAGE_POLL_INTERVAL):
                    continue
                await self._relist_unless_unavailable()
                if not nats_down:
                    await asyncio.sleep(OUTAGE_POLL_INTERVAL)
                continue
            if run is None or not self._set.matches(run):
                continue
            last = self.versions.get(run.id, 0)
            if run.version <= last:
                continue
            # A run not sent before starts wherever the stream has it (a resumed SSE client
            # names no versions: it had the versions before the cursor).
            if (last == 0 or run.version == last + 1) and not self._events.truncated:
                self._pending.append(run)
                continue
            # A gap (or a truncated event): the scheduler's snapshot is at least as new.
            self._pending.append(await self._snapshot_or(run))

    async def _snapshot_or(self, run: run_pb2.Run) -> run_pb2.Run:
        try:
            snapshot = await self._scheduler.get_run(run.id, self._credentials)
        except errors.Unavailable as error:
            log.warning("run %s: no snapshot from the scheduler: %s", run.id, error.message)
            return run
        return snapshot if snapshot.version >= run.version else run

    async def _relist_unless_unavailable(self, idle: bool = False) -> None:
        try:
            await self._relist(idle)
        except errors.Unavailable as error:
            # A refusal (token expired, key revoked) is not caught: it ends the subscription.
            log.warning("%s: no list from the scheduler: %s", self._set.name, error.message)
