"""The leader lease of scheduler replicas, and its fencing check.

One row (``scheduler_leases``, name ``scheduler``) says which replica leads, until when (epoch
seconds on the database's clock, so no replica trusts its own) and with which fencing token. A
replica takes the row only once it has expired, and each taking adds one to the token.

The leader's every write transaction starts with :func:`fence`: it reads the row ``FOR KEY
SHARE`` and requires its own holder and token. (Expired but not yet taken is still its own:
nobody else has loaded the state, so its writes are safe; a lapse alone is no reason to fail.)
A replica taking the lease first locks the row ``FOR UPDATE``, which waits for those
transactions: a leader's write either commits before the taking (and the new leader loads it)
or finds the lease gone and rolls back. A leader that was paused or cut off therefore never
commits over the replica that replaced it.

On SQLite there is one replica: it holds an exclusive lock on a file beside the database for
its whole life (:func:`lock_sqlite`), which the operating system drops when the process dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from dataclasses import dataclass
from typing import IO, Any

from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runplane_common.errors import FailedPrecondition
from runplane_scheduler.store import tables as db
from runplane_scheduler.store.errors import is_duplicate

# What callers outside the store are given: the database (opaque outside the store).
Database = AsyncEngine

NAME = "scheduler"
L = db.scheduler_leases.c

_NOW_PG = "extract(epoch from clock_timestamp())::float8"

_FENCE_PG = text(
    "SELECT 1 FROM scheduler_leases WHERE name = :name AND holder = :holder AND token = :token"
    " FOR KEY SHARE"
)


@dataclass(frozen=True)
class Lease:
    """The lease as last read: who holds it, with which token, where it serves."""

    holder: str
    token: int
    expires_at: float
    grpc_address: str
    http_address: str


def _postgres(conn: AsyncConnection | AsyncEngine) -> bool:
    return conn.dialect.name == "postgresql"


async def _now(conn: AsyncConnection) -> float:
    if _postgres(conn):
        return float((await conn.exec_driver_sql(f"SELECT {_NOW_PG}")).scalar_one())
    return time.time()


def _lease(row: Any) -> Lease:
    m = row._mapping
    return Lease(m["holder"], m["token"], m["expires_at"], m["grpc_address"], m["http_address"])


async def acquire(
    database: AsyncEngine,
    holder: str,
    seconds: float,
    grpc_address: str,
    http_address: str,
    *,
    force: bool = False,
) -> tuple[bool, Lease | None]:
    """Take the lease for ``seconds`` if nobody holds it or it has expired (``force``: in any
    case; SQLite's single replica, which holds the file lock). Returns whether this replica now
    holds it, and the lease as it stands (None: there is none and the race for it was lost)."""
    if not force:
        # Most checks find the lease held: a plain read, so the leader's writes (which hold the
        # row FOR KEY SHARE) never wait for a standby's look.
        async with database.connect() as conn:
            row = (await conn.execute(select(db.scheduler_leases).where(L.name == NAME))).first()
            now = await _now(conn)
        if row is not None and _lease(row).expires_at > now:
            return False, _lease(row)
    try:
        async with database.begin() as conn:
            if _postgres(conn):
                # A leader's write transaction holds the row; wait for it, not forever.
                await conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            row = (
                await conn.execute(
                    select(db.scheduler_leases).where(L.name == NAME).with_for_update()
                )
            ).first()
            now = await _now(conn)
            taken = Lease(holder, 1, now + seconds, grpc_address, http_address)
            values = {
                "holder": holder,
                "expires_at": taken.expires_at,
                "grpc_address": grpc_address,
                "http_address": http_address,
            }
            if row is None:
                await conn.execute(insert(db.scheduler_leases).values(name=NAME, token=1, **values))
                return True, taken
            current = _lease(row)
            if current.expires_at > now and not force:
                return False, current
            token = current.token + 1
            await conn.execute(
                update(db.scheduler_leases).where(L.name == NAME).values(token=token, **values)
            )
            return True, dataclasses.replace(taken, token=token)
    except Exception as error:
        if is_duplicate(error):  # another replica inserted the first row
            return False, None
        raise


async def renew(database: AsyncEngine, lease: Lease, seconds: float) -> float | None:
    """Extend ``lease`` if it is still this holder's (lapsed but not taken still is); the new
    expiry (database clock), or None when another replica took it."""
    async with database.begin() as conn:
        now = await _now(conn)
        result = await conn.execute(
            update(db.scheduler_leases)
            .where(L.name == NAME, L.holder == lease.holder, L.token == lease.token)
            .values(expires_at=now + seconds)
        )
        return now + seconds if result.rowcount == 1 else None


async def release(database: AsyncEngine, lease: Lease) -> None:
    """Give the lease up at once (a clean stop): a standby takes it without waiting for it to
    expire."""
    async with database.begin() as conn:
        await conn.execute(
            update(db.scheduler_leases)
            .where(L.name == NAME, L.holder == lease.holder, L.token == lease.token)
            .values(expires_at=0.0)
        )


async def current(database: AsyncEngine) -> Lease | None:
    async with database.connect() as conn:
        row = (await conn.execute(select(db.scheduler_leases).where(L.name == NAME))).first()
    return None if row is None else _lease(row)


async def fence(conn: AsyncConnection, lease: Lease) -> bool:
    """Inside a write transaction: whether ``lease`` is still this replica's (PostgreSQL). The
    row stays
    locked FOR KEY SHARE until the transaction ends, so nobody takes the lease meanwhile."""
    result = await conn.execute(
        _FENCE_PG, {"name": NAME, "holder": lease.holder, "token": lease.token}
    )
    return result.first() is not None


def sqlite_path(url: str) -> str:
    """The file of a SQLite URL; "" for an in-memory database."""
    path = url.split("///", 1)[1].split("?", 1)[0] if "///" in url else ""
    return "" if path == ":memory:" or path.startswith("file:") else path


def lock_sqlite(url: str) -> IO[str] | None:
    """Lock the SQLite database for this process's life; raises FailedPrecondition naming the
    problem when another scheduler has it (None: an in-memory database, nothing to lock)."""
    path = sqlite_path(url)
    if not path:
        return None
    handle = open(f"{path}.scheduler.lock", "a+")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        other = handle.read().strip() or "another process"
        handle.close()
        raise FailedPrecondition(
            f"another scheduler ({other}) already uses the SQLite database {path}: SQLite takes "
            "one scheduler replica; run replicas on PostgreSQL (RUNPLANE_DATABASE_URL)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def unlock_sqlite(handle: IO[str] | None) -> None:
    if handle is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
