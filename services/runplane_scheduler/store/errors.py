"""The database's failures in the scheduler's terms: :func:`map_database_error`, the
``ErrorMapper`` the scheduler's gRPC server passes to the interceptor (so the shared server code
needs no database), and :func:`is_duplicate` for callers that race on a unique key."""

from __future__ import annotations

import sqlite3

import asyncpg
from sqlalchemy import exc as sa_exc

from runplane_common.errors import ServiceError
from runplane_common.grpcserver import unavailable


def map_database_error(error: Exception) -> ServiceError | None:
    """UNAVAILABLE for a failure to reach the database (worth a retry); None otherwise, so a
    refused statement stays a logged INTERNAL."""
    if isinstance(error, sa_exc.DBAPIError) and _is_unavailable(error):
        return unavailable(error)
    if _driver_unavailable(error):
        return unavailable(error)
    return None


def _driver_unavailable(error: Exception) -> bool:
    """The same for the drivers' own errors (statements ``store/hot.py`` and the writer's
    inserts send without SQLAlchemy)."""
    if isinstance(error, OSError | asyncpg.InterfaceError | sqlite3.OperationalError):
        return True
    code = str(getattr(error, "sqlstate", "") or "")
    return isinstance(error, asyncpg.PostgresError) and code.startswith(("08", "57"))


def _is_unavailable(error: sa_exc.DBAPIError) -> bool:
    """A failure to reach the database, not a refused statement."""
    if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
        return True
    code = str(getattr(error.orig, "sqlstate", "") or getattr(error.orig, "pgcode", "") or "")
    # SQLSTATE classes 08 (connection exception) and 57 (operator intervention: shutdown).
    return bool(error.connection_invalidated) or code.startswith(("08", "57"))


def is_duplicate(error: Exception) -> bool:
    """A write refused by a unique constraint (another writer inserted the same key first)."""
    return isinstance(
        error, sa_exc.IntegrityError | asyncpg.UniqueViolationError | sqlite3.IntegrityError
    )
