from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.cluster import Cluster


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
