"""The outbox relay: publishes committed outbox rows to JetStream in order, then deletes them.

Each event's id is its ``Nats-Msg-Id``, so a row published twice (a crash after publish, before
delete) is dropped by JetStream's duplicate window instead of reaching subscribers twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from runplane_common import jetstream, subjects
from runplane_scheduler.store import Store

log = logging.getLogger("runplane.scheduler.relay")

BATCH = 1000
# Committed events kept in memory for publishing; beyond this the relay reads the database.
MAX_PENDING = 50_000


class Outgoing(NamedTuple):
    event_id: str
    subject: str
    data: bytes
    traceparent: str


# Longest time a published row can wait for deletion before a restart re-publishes it.
DUPLICATE_WINDOW = 120.0
# A batch whose acknowledgements stop coming for this long is published again (JetStream drops
# what it already has). They stop when the server the relay is connected to dies, or a stream's
# leader does before a new one is elected: waiting longer only stalls every subscriber.
ACK_STALL = 2.0


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    config = StreamConfig(
        name=subjects.RUN_EVENTS_STREAM,
        subjects=subjects.run_events_subjects(),
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW,
        max_age=7 * 24 * 3600,
        num_replicas=replicas,
    )
    await jetstream.ensure_stream(js, config)


class Relay:
    def __init__(self, store: Store, nats_servers: Sequence[str], replicas: int = 1) -> None:
        """``nats_servers``: one server's URL, or the servers of a cluster; ``replicas``: the
        copies JetStream keeps of RUN_EVENTS."""
        self._store = store
        self._nats_servers = tuple(nats_servers)
        self._nats_url = ",".join(self._nats_servers)  # for the log
        self._replicas = replicas
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._nc: NATS | None = None
        self.published = 0
        # Events up to here are published; their deletion rides on the writer's next commit.
        self._after = ""
        # Committed events not yet published, in commit (= event id) order. The database holds
        # them too: after a restart, or when this overflows, the relay catches up from there.
        self._pending: deque[Outgoing] = deque()
        self._catching_up = True
        self._drops = 0
        self.connected = asyncio.Event()
        # The batch being published (for the outbox lag), and errors by what failed.
        self._in_flight: list[Outgoing] = []
        self.errors = {"nats_connect": 0, "nats_publish": 0, "database_read": 0}

    @property
    def nats_connected(self) -> bool:
        """The relay's NATS connection is up now."""
        return self._nc is not None and bool(self._nc.is_connected)

    @property
    def catching_up(self) -> bool:
        """The relay reads the outbox from the database: more rows may wait there than
        :meth:`backlog` counts."""
        return self._catching_up

    def backlog(self) -> tuple[int, str]:
        """Committed events not yet published that the relay holds (in flight and pending),
        and the id of the oldest ('' if none)."""
        count = len(self._in_flight) + len(self._pending)
        if self._in_flight:
            return count, self._in_flight[0].event_id
        return count, self._pending[0].event_id if self._pending else ""

    def committed(self, events: list[dict[str, Any]]) -> None:
        """The writer committed these outbox rows (called in commit order)."""
        if len(self._pending) + len(events) > MAX_PENDING:
            self._pending.clear()  # still in the database; read them from there
            self._drops += 1
            self._catching_up = True
        else:
            self._pending.extend(
                Outgoing(e["event_id"], e["subject"], e["data"], e["traceparent"]) for e in events
            )
        self._wake.set()

    async def _next_batch(self) -> list[Outgoing]:
        if self._catching_up:
            drops = self._drops
            rows = await self._store.read_outbox(self._after, BATCH)
            if rows:
                return [Outgoing(r.event_id, r.subject, r.data, r.traceparent) for r in rows]
            if drops == self._drops:
                # Everything committed before now is published; later commits are in memory.
                self._catching_up = False
        batch: list[Outgoing] = []
        while self._pending and len(batch) < BATCH:
            item = self._pending.popleft()
            if item.event_id > self._after:
                batch.append(item)
        return batch

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):  # NATS may be gone already
                await self._nc.close()

    async def _connect(self) -> JetStreamContext:
        backoff = 0.2
        while True:
            try:
                self._nc = await jetstream.connect(
                    self._nats_servers, "runplane-relay", error_cb=self._on_error
                )
                js = self._nc.jetstream()
                await ensure_streams(js, self._replicas)
                self.connected.set()
                log.info("relay connected to NATS at %s", self._nats_url)
                return js
            except Exception as error:
                self.errors["nats_connect"] += 1
                if isinstance(error, jetstream.StreamSetupError):
                    log.error("%s; retrying", error)
                else:
                    log.warning("NATS at %s not reachable (%s); retrying", self._nats_url, error)
                if self._nc is not None:
                    await self._nc.close()
                    self._nc = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _on_error(self, error: Exception) -> None:
        # nats-py's own report is a traceback per failed reconnect; one line says as much.
        log.warning("NATS: %r", error)

    async def _run(self) -> None:
        js = await self._connect()
        backoff = 0.2
        rows: list[Outgoing] = []
        while True:
            if not rows:
                self._wake.clear()
                try:
                    rows = await self._next_batch()
                except Exception as error:  # the database is away while catching up
                    self.errors["database_read"] += 1
                    log.warning("reading the outbox failed (%s); retrying", error)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if not rows:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                    continue
                self._in_flight = rows
            try:
                acks = [
                    await js.publish_async(
                        r.subject,
                        r.data,
                        headers={"Nats-Msg-Id": r.event_id, "traceparent": r.traceparent}
                        if r.traceparent
                        else {"Nats-Msg-Id": r.event_id},
                    )
                    for r in rows
                ]
                await _acknowledged(acks)
            except Exception as error:
                self.errors["nats_publish"] += 1
                log.warning("publishing %d events failed (%s); retrying", len(rows), error)
                await asyncio.sleep(backoff)
                # At most a second: a cluster elects a new stream leader within seconds, and
                # the relay should find it soon after.
                backoff = min(backoff * 2, 1.0)
                continue  # the same batch again: JetStream drops the ones it already has
            backoff = 0.2
            self._store.writer.published([r.event_id for r in rows])
            self._after = rows[-1].event_id
            self.published += len(rows)
            rows = []
            self._in_flight = []


async def _acknowledged(acks: list[asyncio.Future[Any]]) -> None:
    """Wait for every acknowledgement while they keep coming; raise the first failure, or
    TimeoutError once none came for ACK_STALL seconds."""
    pending: set[asyncio.Future[Any]] = set(acks)
    while pending:
        done, pending = await asyncio.wait(pending, timeout=ACK_STALL)
        # Every failure is looked at (asyncio logs the ones nobody retrieved); the first is raised.
        errors = [e for f in done if (e := f.exception()) is not None]
        error = errors[0] if errors else None
        if error is None and not done:
            error = TimeoutError(f"{len(pending)} of {len(acks)} events not acknowledged")
        if error is not None:
            for future in pending:
                future.cancel()
            raise error
