from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.cluster import Cluster


@pytest.fixture
async def cluster(tmp_path: Path, nats_server, database_url: str) -> AsyncIterator[Cluster]:  # type: ignore[no-untyped-def]
    c = Cluster(tmp_path, nats_server.url, database_url)
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
