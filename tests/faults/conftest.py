"""Fixtures of the fault tests: a cluster running ``tests.faults.tasks``, and a private
PostgreSQL cluster the tests may restart."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.cluster import Cluster
from tests.helpers.private_postgres import PrivatePostgres, unavailable_reason

TASKS = "tests.faults.tasks"


async def _running(
    tmp_path: Path, nats_url: str, database_url: str, env: dict[str, str] | None = None
) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, nats_url, database_url, tasks=TASKS, env=env)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()
        # A kill -9 test may leave a restarted process that ignores SIGTERM for long.
        for process in (c.executor, c.scheduler, c.realtime):
            process.kill()


@pytest.fixture
async def cluster(tmp_path: Path, nats_server: Any, database_url: str) -> AsyncIterator[Cluster]:
    async for c in _running(tmp_path, nats_server.url, database_url):
        yield c


@pytest.fixture
async def on_nats_cluster(tmp_path: Path, nats_cluster: Any) -> AsyncIterator[Cluster]:
    """The services on a 3-node NATS cluster (``nats_cluster``), streams at 3 replicas. On
    SQLite alone: what a NATS node's loss does to the relay and realtime is the same on either
    database (the PostgreSQL run of these tests took as long again and found nothing more)."""
    env = {"RUNPLANE_NATS_REPLICAS": "3"}
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'runplane.db'}"
    async for c in _running(tmp_path, nats_cluster.url, database_url, env):
        yield c


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if reason := unavailable_reason():
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
async def pg_cluster(
    tmp_path: Path, nats_server: Any, private_postgres: PrivatePostgres
) -> AsyncIterator[Cluster]:
    async for c in _running(tmp_path, nats_server.url, private_postgres.url):
        yield c


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name in ("cluster", "pg_cluster", "on_nats_cluster"):
            c = item.funcargs.get(name) if name in item.fixturenames else None
            if c is not None:
                report.sections.append(("service logs", c.logs()))
        pg = (
            item.funcargs.get("private_postgres")
            if "private_postgres" in item.fixturenames
            else None
        )
        if pg is not None:
            report.sections.append(("postgresql log", pg.log_tail()))
        nodes = item.funcargs.get("nats_cluster") if "nats_cluster" in item.fixturenames else None
        if nodes is not None:
            report.sections.append(("nats cluster logs", nodes.log_tail()))
