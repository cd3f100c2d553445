"""Fixtures of the conformance tests: each test runs once per worker implementation
(:data:`tests.helpers.conformance.IMPLEMENTATIONS`), skipped (or, with CI set, failed) where an
implementation cannot run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.cluster import ServiceProcess
from tests.helpers.conformance import (
    IMPLEMENTATIONS,
    VERSION,
    Implementation,
    ScriptedScheduler,
    StartWorker,
)


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda i: i.name)
def implementation(request: pytest.FixtureRequest) -> Implementation:
    impl: Implementation = request.param
    if (why := impl.unavailable()) is not None:
        reason, fail = why
        if fail:
            pytest.fail(f"{impl.name} worker: {reason} (CI is set, so this fails)", pytrace=False)
        pytest.skip(f"{impl.name} worker: {reason}")
    return impl


@pytest.fixture
async def scheduler() -> AsyncIterator[ScriptedScheduler]:
    s = ScriptedScheduler()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[list[ServiceProcess]]:
    """The worker processes a test started; killed at its end, their logs shown on failure."""
    started: list[ServiceProcess] = []
    try:
        yield started
    finally:
        for p in started:
            p.kill()


@pytest.fixture
def start_worker(
    implementation: Implementation, workers: list[ServiceProcess], tmp_path: Path
) -> StartWorker:
    """Start a worker of the implementation against ``address`` with ``key``."""

    async def start(address: str, key: str, **env: str) -> ServiceProcess:
        p = implementation.process(address, key, tmp_path, {"RUNPLANE_VERSION": VERSION, **env})
        p.start()
        workers.append(p)
        return p

    return start


@pytest.fixture
async def worker(start_worker: StartWorker, scheduler: ScriptedScheduler) -> ServiceProcess:
    """A worker of the implementation, started against the scripted scheduler."""
    return await start_worker(scheduler.address, scheduler.key)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.failed and "workers" in item.fixturenames:
        for p in item.funcargs.get("workers") or ():
            report.sections.append((f"{p.name} log", p.log()[-8000:]))
