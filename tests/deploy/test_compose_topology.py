"""The topology deploy/compose.yaml describes, as processes on loopback: a 3-node nats-server
cluster with routes, a fresh PostgreSQL database, the migration, the scheduler, two executors
running the example task image's module, realtime and the dashboard, each with the command
and environment compose.yaml gives it, started in its depends_on order and waited on by its
healthcheck. A run triggered through the SDK completes, and realtime shows its changes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

import runplane
from tests.helpers import postgres
from tests.helpers.compose import ComposeProcesses
from tests.helpers.deploy import load_compose
from tests.helpers.nats import find_binary
from tests.helpers.unavailable import unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(300)]


@pytest.fixture
async def topology(tmp_path: Path) -> AsyncIterator[ComposeProcesses]:
    nats_binary = find_binary()
    if nats_binary is None:
        unavailable("nats-server not found: run `make setup` or set RUNPLANE_NATS_SERVER")
    server = postgres.server_url()
    if reason := await postgres.unreachable_reason(server):
        unavailable(f"PostgreSQL at {make_url(server)} is unreachable: {reason}")
    name, database_url = await postgres.create_database(server)
    compose = ComposeProcesses(load_compose(), tmp_path, database_url, nats_binary)
    try:
        await compose.up()
        yield compose
    except BaseException:
        print(compose.logs())
        raise
    finally:
        await compose.down()
        await postgres.drop_database(server, name)


async def test_a_run_completes_on_the_compose_topology(topology: ComposeProcesses) -> None:
    executor = topology.env("executor-1")
    client = runplane.Client(
        api_url=executor["RUNPLANE_API_URL"],
        secret_key=topology.key("secret"),
        realtime_url=executor["RUNPLANE_REALTIME_URL"],
    )
    # up() waited on every healthcheck: both executors have registered (their /readyz).
    assert {"executor-1", "executor-2"} <= topology.processes.keys()
    handles = [await client.tasks.trigger("acme-greet", {"name": f"compose-{n}"}) for n in range(4)]
    for n, handle in enumerate(handles):
        # Realtime replays the run's changes from JetStream, from its first version on.
        seen = [run async for run in client.runs.subscribe_to_run(handle)]
        final = await client.runs.retrieve(handle.id)
        assert [run.version for run in seen] == list(range(1, final.version + 1))
        assert seen[-1].status == final.status == "COMPLETED"
        assert final.output == {"message": f"Hello, compose-{n}!", "attempt": 1}
