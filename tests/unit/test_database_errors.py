"""The database's failures in the scheduler's terms, for SQLAlchemy's errors and for the
drivers' own (the hot path's statements and the writer's inserts go straight to the driver)."""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from runplane_common.errors import Unavailable
from runplane_scheduler.store.errors import is_duplicate, map_database_error


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.InterfaceError("connection is closed"),
        ConnectionRefusedError(111, "Connection refused"),
        sqlite3.OperationalError("database is locked"),
        sa_exc.OperationalError("SELECT 1", {}, Exception("gone")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_database_out_of_reach_is_unavailable(error: Exception) -> None:
    mapped = map_database_error(error)
    assert isinstance(mapped, Unavailable)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.UndefinedColumnError("column x does not exist"),
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        ValueError("not a database error"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_refused_statement_is_not_unavailable(error: Exception) -> None:
    assert map_database_error(error) is None


def test_duplicates_are_recognised_from_every_driver() -> None:
    assert is_duplicate(asyncpg.exceptions.UniqueViolationError("duplicate key"))
    assert is_duplicate(sqlite3.IntegrityError("UNIQUE constraint failed: runs.id"))
    assert is_duplicate(sa_exc.IntegrityError("INSERT", {}, Exception("duplicate")))
    assert not is_duplicate(asyncpg.exceptions.UndefinedColumnError("no column"))
