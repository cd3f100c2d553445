"""Every worker implementation against the real scheduler (a nats-server, SQLite, the scheduler
and realtime as processes): a run completes, and a waiting run survives a kill -9 of its worker
by replay on a new one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import runplane
from runplane import RunStatus
from tests.helpers.cluster import Cluster
from tests.helpers.conformance import VERSION, StartWorker
from tests.helpers.nats import NatsServer
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture
async def stack(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[Cluster]:
    """Scheduler and realtime without an executor of their own."""
    c = Cluster(tmp_path, nats_server.url, f"sqlite+aiosqlite:///{tmp_path / 'runplane.db'}")
    await c.start(executor=False)
    try:
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        await c.stop()


async def connected(client: runplane.Client) -> None:
    async def registered() -> bool:
        versions = await client.versions.list()
        return any(v.version == VERSION and v.executors > 0 for v in versions)

    await eventually(registered, 90, description=f"a worker of version {VERSION} is connected")


async def test_a_triggered_run_completes_with_the_worker_s_output(
    stack: Cluster, start_worker: StartWorker
) -> None:
    await start_worker(stack.api_url, stack.worker_keys["dev"])
    client = stack.client()
    try:
        await connected(client)
        payload = {"hello": "world", "n": [1, 2, 3]}
        handle = await client.tasks.trigger("conformance-echo", payload)
        run = await client.runs.poll(handle.id, interval=0.2, timeout=90)
        assert run.status is RunStatus.COMPLETED, (run, stack.logs())
        assert run.output == payload
    finally:
        await client.close()


async def test_a_waiting_run_resumes_by_replay_after_a_kill_9_of_its_worker(
    stack: Cluster, start_worker: StartWorker
) -> None:
    first = await start_worker(stack.api_url, stack.worker_keys["dev"])
    client = stack.client()
    try:
        await connected(client)
        wait = runplane.WaitAPI(client)
        token = await wait.create_token(timeout="10m")
        handle = await client.tasks.trigger("conformance-token", {"token_id": token.id})

        async def waiting() -> bool:
            return (await client.runs.retrieve(handle.id)).status is RunStatus.WAITING

        await eventually(waiting, 90, description="the run waits on the token")
        first.kill()
        await wait.complete_token(token.id, {"approved": True})
        await start_worker(stack.api_url, stack.worker_keys["dev"])
        run = await client.runs.poll(handle.id, interval=0.2, timeout=120)
        assert run.status is RunStatus.COMPLETED, (run, stack.logs())
        assert run.output == {"token": {"approved": True}}
        assert f"run {handle.id} resumes by replay" in stack.scheduler.log()
    finally:
        await client.close()
