"""Scheduler replicas: one leads, the others stand by and forward.

Any number of scheduler processes may share one PostgreSQL database. The replica holding the
lease (store/leases.py) runs the engine: dispatch, timers, the relay, schedules. The others
accept every call and forward it to the leader (runplane_common/forwarding.py), and poll the
lease; when it lapses (the leader died or was cut off) one of them takes it with the next
fencing token, loads the state from the database and leads.

A leader renews its lease every fifth of its length. If it cannot renew (its database is
unreachable) for most of its length, or a write finds the lease taken, it has lost the lease:
it stops serving and its process ends (:attr:`Leadership.lost`), so that whatever runs it (the
orchestrator) starts it again as a standby. Its writes are fenced, so stopping late is safe.

Why a lease row and not advisory locks: a session lock lasts as long as the database believes
the session lives, which for a process cut off from the network is until TCP gives up (minutes);
a lease with an expiry on the database clock has a known bound, and its token fences writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from runplane_common.errors import Unavailable
from runplane_common.forwarding import NoLeader
from runplane_scheduler.store import leases
from runplane_scheduler.store.leases import Database, Lease

log = logging.getLogger("runplane.scheduler.replicas")


class Leadership:
    """This replica's view of the lease, and the loop that takes and keeps it."""

    def __init__(
        self,
        database: Database,
        name: str,
        seconds: float,
        grpc_address: str,
        http_address: str,
        *,
        single: bool = False,
    ) -> None:
        """``single``: the only possible replica (SQLite, holding the file lock): it takes the
        lease whoever held it last."""
        self.database = database
        self.name = name
        self.seconds = seconds
        self.grpc_address = grpc_address
        self.http_address = http_address
        self.single = single
        # The lease as last seen; ours while we lead.
        self.lease: Lease | None = None
        self.leading = False  # the engine runs: this replica serves calls itself
        self.lost = asyncio.Event()  # the lease was lost: this process must end
        self.lost_why = ""
        self._task: asyncio.Task[None] | None = None
        self._taking: asyncio.Task[None] | None = None
        self._renewed = 0.0  # monotonic time of the last renewal

    @property
    def interval(self) -> float:
        return self.seconds / 5

    async def try_take(self) -> bool:
        """Take the lease if it is free; whether this replica now holds it (not yet leading:
        the caller starts the engine, then :meth:`led`)."""
        started = time.monotonic()
        mine, lease = await leases.acquire(
            self.database,
            self.name,
            self.seconds,
            self.grpc_address,
            self.http_address,
            force=self.single,
        )
        if lease is not None:
            self.lease = lease
        if mine:
            self._renewed = started
        return mine

    def led(self) -> None:
        """The engine runs: serve calls here from now on."""
        self.leading = True
        assert self.lease is not None
        log.info(
            "scheduler replica %s leads (fencing token %d, lease %.1f s)",
            self.name,
            self.lease.token,
            self.seconds,
        )

    def holds(self) -> bool:
        lease = self.lease
        return lease is not None and lease.holder == self.name and not self.lost.is_set()

    # -- where a call goes ------------------------------------------------------------------

    def route(self, forwarded: bool) -> str | None:
        if self.lost.is_set():
            raise NoLeader(f"replica {self.name} lost its lease and is stopping")
        if self.leading:
            return None
        lease = self.lease
        if lease is None or lease.holder == self.name:
            raise NoLeader(f"replica {self.name} is taking the lease over")
        if forwarded:
            raise NoLeader(f"the call was forwarded to {self.name}, which does not lead now")
        return lease.grpc_address

    def leader_http(self) -> str | None:
        """The leader's HTTP address when another replica leads (None: this one serves)."""
        if self.leading:
            return None
        lease = self.lease
        if lease is None or lease.holder == self.name or self.lost.is_set():
            raise Unavailable("no scheduler replica leads now; retry shortly", 1.0)
        return lease.http_address

    # -- the loop ---------------------------------------------------------------------------

    def start(self, take_over: Callable[[], Awaitable[None]]) -> None:
        """Keep the lease while leading; while standing by, watch it and, once it lapses, take
        it and call ``take_over`` (which starts the engine and calls :meth:`led`)."""
        if self.single:
            # SQLite: the file lock is the lease, held for the process's life; nothing to renew,
            # and a second writer on the file would only contend with the engine's.
            return
        self._task = asyncio.create_task(self._loop(take_over), name="replica-lease")

    async def _loop(self, take_over: Callable[[], Awaitable[None]]) -> None:
        while not self.lost.is_set():
            await asyncio.sleep(self.interval)
            try:
                if self.holds():
                    await self._renew()
                elif await self.try_take():
                    log.info("replica %s took the lease over; loading the state", self.name)
                    # Loading may outlast the lease: this loop goes on renewing meanwhile.
                    self._taking = asyncio.create_task(self._take(take_over), name="take-over")
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("replica %s: lease check failed: %r", self.name, error)
                if self.holds() and time.monotonic() - self._renewed > self.seconds * 0.8:
                    self.lose(f"it could not renew its lease for {self.seconds * 0.8:.1f} s")

    async def _take(self, take_over: Callable[[], Awaitable[None]]) -> None:
        try:
            await take_over()
        except Exception as error:
            log.exception("replica %s could not take over", self.name)
            self.lose(f"taking over failed ({error!r})")

    async def _renew(self) -> None:
        lease = self.lease
        assert lease is not None
        started = time.monotonic()
        expires = await leases.renew(self.database, lease, self.seconds)
        if expires is None:
            self.lose("another replica took its lease")
            return
        self._renewed = started

    def lose(self, why: str) -> None:
        """The lease is gone: stop serving; the process ends (see :attr:`lost`)."""
        if self.lost.is_set():
            return
        self.leading = False
        self.lost_why = why
        log.error("scheduler replica %s lost the lease: %s; it stops", self.name, why)
        self.lost.set()

    async def stop(self) -> None:
        """Stop the loop and, if this replica leads, give the lease up for a standby."""
        for task in (self._task, self._taking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._taking = None
        if self.holds() and self.lease is not None:
            with contextlib.suppress(Exception):
                await leases.release(self.database, self.lease)
        self.leading = False
