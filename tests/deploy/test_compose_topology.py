"""The topology deploy/compose.yaml describes, as processes on loopback: a 3-node nats-server
cluster with routes, a fresh PostgreSQL database, the migration, two scheduler replicas behind
one network alias, two executors running the example task image's module, realtime and the
dashboard, each with the command and environment compose.yaml gives it, started in its
depends_on order and waited on by its healthcheck. One scheduler leads and the other stands by;
a run triggered through the SDK completes, and realtime shows its changes; once the leader is
killed the standby takes over, runs still complete, the killed one comes back as a standby,
and a wait token's URL posted to it completes on the leader."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

import runplane
from runplane_scheduler.store import leases
from runplane_scheduler.store import tables as db
from tests.helpers import postgres
from tests.helpers.compose import ComposeProcesses
from tests.helpers.deploy import load_compose
from tests.helpers.metrics import scrape, value
from tests.helpers.nats import find_binary
from tests.helpers.unavailable import unavailable
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(300)]

SCHEDULERS = ("scheduler-1", "scheduler-2")


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


async def leading(topology: ComposeProcesses, name: str) -> bool:
    """Whether the scheduler replica ``name`` says it leads (its runplane_scheduler_leader)."""
    url = topology.env(name)["RUNPLANE_SCHEDULER_HTTP_URL"]
    return value(await scrape(url), "runplane_scheduler_leader") == 1.0


async def the_leader(topology: ComposeProcesses) -> str:
    """The replica holding the lease, which it alone says it leads."""
    engine = db.create_engine(topology.database_url)
    try:
        lease = await leases.current(engine)
    finally:
        await engine.dispose()
    assert lease is not None
    assert [n for n in SCHEDULERS if await leading(topology, n)] == [lease.holder]
    assert lease.grpc_address == topology.env(lease.holder)["RUNPLANE_ADVERTISE"]
    return lease.holder


async def complete(client: runplane.Client, label: str, count: int) -> None:
    handles = [
        await client.tasks.trigger("acme-greet", {"name": f"{label}-{n}"}) for n in range(count)
    ]
    for n, handle in enumerate(handles):
        # Realtime replays the run's changes from JetStream, from its first version on.
        seen = [run async for run in client.runs.subscribe_to_run(handle)]
        final = await client.runs.retrieve(handle.id)
        assert [run.version for run in seen] == list(range(1, final.version + 1))
        assert seen[-1].status == final.status == "COMPLETED"
        assert final.output == {"message": f"Hello, {label}-{n}!", "attempt": 1}


async def test_runs_complete_on_the_compose_topology_and_survive_losing_the_leader(
    topology: ComposeProcesses,
) -> None:
    executor = topology.env("executor-1")
    # `scheduler:7070`: the alias of both replicas, as gRPC's list of their addresses.
    api_url = executor["RUNPLANE_API_URL"]
    assert api_url.startswith("ipv4:") and len(api_url.split(",")) == len(SCHEDULERS)
    client = runplane.Client(
        api_url=api_url,
        secret_key=topology.key("secret"),
        realtime_url=executor["RUNPLANE_REALTIME_URL"],
    )
    # up() waited on every healthcheck: both executors have registered (their /readyz), and
    # both schedulers are ready, one leading, the other standing by.
    assert {"executor-1", "executor-2", *SCHEDULERS} <= topology.processes.keys()
    leader = await the_leader(topology)
    await complete(client, "compose", 4)

    # The leader dies without a word: the standby takes the lapsed lease over (its length,
    # RUNPLANE_REPLICA_LEASE_SECONDS, 5 s), the executors, realtime and the client reconnect
    # to it through the same address list, and runs complete.
    topology.processes[leader].kill()
    (standby,) = set(SCHEDULERS) - {leader}
    await eventually(lambda: leading(topology, standby), timeout=60, description="takeover")
    await complete(client, "failover", 4)

    # The restart policy starts the dead replica again: it stands by behind the new leader.
    await topology.restart(leader)
    assert await the_leader(topology) == standby
    await complete(client, "restarted", 2)

    # A wait token's URL names the leader's HTTP endpoint (its RUNPLANE_SCHEDULER_HTTP_URL); the
    # standby forwards a POST of the same path to the address the leader advertised.
    wait = runplane.WaitAPI(client)
    token = await wait.create_token(timeout="1h")
    leader_http = topology.env(standby)["RUNPLANE_SCHEDULER_HTTP_URL"]
    assert token.url.startswith(f"{leader_http}/"), token.url
    path = token.url.removeprefix(leader_http)
    request = urllib.request.Request(
        topology.env(leader)["RUNPLANE_SCHEDULER_HTTP_URL"] + path,
        data=b'{"ok": true}',
        method="POST",
    )
    with await asyncio.to_thread(urllib.request.urlopen, request, timeout=30) as answer:
        assert answer.status == 200
    assert (await wait.retrieve_token(token.id)).status == "COMPLETED"
