"""Shared fixtures: a real nats-server and real databases (SQLite and PostgreSQL), on free ports.

PostgreSQL comes from ``$RUNPLANE_TEST_POSTGRES_URL`` (default
``postgresql+asyncpg://postgres@127.0.0.1:5432/test``); each test gets a database of its own.
When a dependency is missing its tests are skipped, or fail when ``CI`` is set.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from runplane_scheduler.store.tables import create_engine, upgrade
from tests.helpers import postgres
from tests.helpers.cluster import Cluster
from tests.helpers.nats import NatsCluster, NatsServer, find_binary
from tests.helpers.unavailable import unavailable


def _nats_binary() -> str:
    binary = find_binary()
    if binary is None:
        unavailable("nats-server not found: run `make setup` or set RUNPLANE_NATS_SERVER")
    return binary


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server with JetStream for this test alone; it may stop, start and kill it."""
    server = NatsServer(tmp_path / "nats", binary=_nats_binary())
    await server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """Three nats-servers with JetStream in one cluster, for this test alone; it may stop,
    start and kill each node."""
    cluster = NatsCluster(tmp_path / "nats-cluster", binary=_nats_binary())
    try:
        await cluster.start()
        yield cluster
    finally:
        cluster.kill()


@pytest.fixture(scope="session")
def nats_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server shared by the session's tests; they must not stop it."""
    server = NatsServer(tmp_path_factory.mktemp("nats-session") / "store", binary=_nats_binary())
    server.start_blocking()
    try:
        yield server
    finally:
        server.stop_blocking()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'runplane.db'}"
        return
    server = postgres.server_url()
    if reason := await postgres.unreachable_reason(server):
        where = make_url(server)  # its str() hides a password
        unavailable(f"PostgreSQL at {where} is unreachable: {reason}")
    name, url = await postgres.create_database(server)
    try:
        yield url
    finally:
        await postgres.drop_database(server, name)


@pytest.fixture
async def migrated_database_url(database_url: str) -> str:
    """``database_url`` with every migration applied."""
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    return database_url


@pytest.fixture
async def cluster(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    nats_server,
    database_url: str,  # type: ignore[no-untyped-def]
) -> AsyncIterator[Cluster]:
    """Scheduler, realtime and an executor as processes. A test module picks the executor's task
    module with ``CLUSTER_TASKS`` (default ``examples.hello``) and extra environment with
    ``CLUSTER_ENV`` (a dict, or a function returning one when the cluster starts)."""
    extra = getattr(request.module, "CLUSTER_ENV", {})
    c = Cluster(
        tmp_path,
        nats_server.url,
        database_url,
        tasks=getattr(request.module, "CLUSTER_TASKS", "examples.hello"),
        env=extra() if callable(extra) else extra,
    )
    await c.start()
    try:
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        await c.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.failed and "cluster" in item.fixturenames:
        c = item.funcargs.get("cluster")
        if c is not None:
            report.sections.append(("service logs", c.logs()))
