"""Public access tokens against the scheduler in this process (SQLite and PostgreSQL): minted by
AuthService, scoped, expiring, single-use for triggers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import update

import runplane
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import run_service_pb2_grpc
from runplane_common.auth import Principal
from runplane_common.config import SchedulerSettings
from runplane_scheduler.app import Scheduler, start_scheduler
from runplane_scheduler.keys import PublicTokens, create_key
from runplane_scheduler.store import tables as db
from tests.helpers.registration import register_tasks

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def scheduler(database_url: str, nats_server: Any) -> AsyncIterator[Scheduler]:
    s = await start_scheduler(
        SchedulerSettings(database_url=database_url, nats_url=nats_server.url, listen="127.0.0.1:0")
    )
    yield s
    await s.stop()


async def _client(s: Scheduler, env: str = "dev") -> runplane.Client:
    """A client of ``env``, where the tasks these tests trigger are known and nobody runs them."""
    key = await create_key(s.engine_db, env)
    await register_tasks(f"127.0.0.1:{s.port}", await create_key(s.engine_db, env, kind="worker"))
    return runplane.Client(api_url=f"127.0.0.1:{s.port}", secret_key=key)


def _as(s: Scheduler, token: str) -> runplane.Client:
    return runplane.Client(api_url=f"127.0.0.1:{s.port}", secret_key=token)


async def test_a_run_token_reads_its_run_and_nothing_else(scheduler: Scheduler) -> None:
    client = await _client(scheduler)
    a = await client.tasks.trigger("not-deployed", {"n": 1}, tags=["user_1"])
    b = await client.tasks.trigger("not-deployed", {"n": 2}, tags=["user_2"])
    token = await client.auth.create_public_token(scopes={"read": {"runs": [a.id]}})
    public = _as(scheduler, token)

    assert (await public.runs.retrieve(a.id)).payload == {"n": 1}
    with pytest.raises(runplane.PermissionDeniedError):
        await public.runs.retrieve(b.id)
    with pytest.raises(runplane.PermissionDeniedError):
        await public.runs.retrieve("run_doesnotexist")
    with pytest.raises(runplane.PermissionDeniedError):
        [r async for r in public.runs.list(tag="user_1")]
    with pytest.raises(runplane.PermissionDeniedError):
        await public.runs.cancel(a.id)
    with pytest.raises(runplane.PermissionDeniedError):
        await public.auth.create_public_token(scopes={"read": {"runs": [b.id]}})
    with pytest.raises(runplane.PermissionDeniedError):
        await public.tasks.trigger("not-deployed", {})


async def test_a_tag_token_reads_and_lists_only_runs_with_its_tag(scheduler: Scheduler) -> None:
    client = await _client(scheduler)
    mine = [await client.tasks.trigger("not-deployed", i, tags=["user_1"]) for i in range(3)]
    other = await client.tasks.trigger("not-deployed", 9, tags=["user_2"])
    public = _as(
        scheduler, await client.auth.create_public_token(scopes={"read": {"tags": "user_1"}})
    )

    listed = [r.id async for r in public.runs.list(tag="user_1")]
    assert sorted(listed) == sorted(h.id for h in mine)
    assert (await public.runs.retrieve(mine[0].id)).tags == ["user_1"]
    with pytest.raises(runplane.PermissionDeniedError):
        await public.runs.retrieve(other.id)
    with pytest.raises(runplane.PermissionDeniedError):
        [r async for r in public.runs.list(tag="user_2")]
    with pytest.raises(runplane.PermissionDeniedError):
        [r async for r in public.runs.list()]


async def test_expired_and_forged_tokens_are_unauthenticated(scheduler: Scheduler) -> None:
    client = await _client(scheduler)
    run = await client.tasks.trigger("not-deployed", {})
    env_id = (await client.runs.retrieve(run)).raw.environment_id
    tokens = PublicTokens(scheduler.engine_db)
    expired = await tokens.mint(
        Principal(env_id, "dev"), [f"read:runs:{run.id}"], int(time.time() * 1000) - 1000
    )
    with pytest.raises(runplane.UnauthenticatedError, match="expired"):
        await _as(scheduler, expired).runs.retrieve(run.id)
    forged = await PublicTokens(scheduler.engine_db, "not-the-key").mint(
        Principal(env_id, "dev"), [f"read:runs:{run.id}"], int(time.time() * 1000) + 60_000
    )
    with pytest.raises(runplane.UnauthenticatedError, match="signature"):
        await _as(scheduler, forged).runs.retrieve(run.id)
    good = await client.auth.create_public_token(scopes={"read": {"runs": [run.id]}})
    head, body, mac = good.split(".")
    with pytest.raises(runplane.UnauthenticatedError):
        await _as(scheduler, f"{head}.{body}x.{mac}").runs.retrieve(run.id)


async def test_a_single_use_trigger_token_works_once(scheduler: Scheduler) -> None:
    client = await _client(scheduler)
    token = await client.auth.create_trigger_public_token("not-deployed")
    public = _as(scheduler, token)
    with pytest.raises(runplane.PermissionDeniedError):
        await public.tasks.trigger("another-task", {})
    handle = await public.tasks.trigger("not-deployed", {"from": "browser"})
    assert (await client.runs.retrieve(handle)).payload == {"from": "browser"}
    with pytest.raises(runplane.UnauthenticatedError, match="used"):
        await public.tasks.trigger("not-deployed", {"again": True})
    # The handle's own token reads the new run (and only it).
    reader = _as(scheduler, handle.public_access_token)
    assert (await reader.runs.retrieve(handle.id)).id == handle.id

    many = _as(
        scheduler, await client.auth.create_trigger_public_token("not-deployed", multiple_use=True)
    )
    for i in range(3):
        await many.tasks.trigger("not-deployed", {"i": i})


async def test_a_batch_read_token_reads_the_batchs_runs_only(scheduler: Scheduler) -> None:
    client = await _client(scheduler)
    run = await client.tasks.trigger("not-deployed", {})
    env_id = (await client.runs.retrieve(run)).raw.environment_id
    tokens = PublicTokens(scheduler.engine_db)
    token = await tokens.read_token(Principal(env_id, "dev"), "batch", "batch_1")
    public = _as(scheduler, token)
    stub = run_service_pb2_grpc.RunServiceStub(public.transport.channel())
    listing = await public.transport.call(stub.ListRuns, rpb.ListRunsRequest(batch_id="batch_1"))
    assert list(listing.runs) == []
    with pytest.raises(runplane.PermissionDeniedError):
        await public.transport.call(stub.ListRuns, rpb.ListRunsRequest(batch_id="batch_2"))
    with pytest.raises(runplane.PermissionDeniedError):
        await public.runs.retrieve(run.id)
    # Batches are made elsewhere; mark a run as one's directly.
    member = await client.tasks.trigger("not-deployed", {"in": "batch"})
    async with scheduler.engine_db.begin() as conn:
        await conn.execute(
            update(db.runs).where(db.runs.c.id == member.id).values(batch_id="batch_1")
        )
    sdk_token = await client.auth.create_batch_public_token("batch_1")
    batch_reader = _as(scheduler, sdk_token)
    assert (await batch_reader.runs.retrieve(member.id)).payload == {"in": "batch"}
    stub = run_service_pb2_grpc.RunServiceStub(batch_reader.transport.channel())
    listing = await batch_reader.transport.call(
        stub.ListRuns, rpb.ListRunsRequest(batch_id="batch_1")
    )
    assert [r.id for r in listing.runs] == [member.id]
    with pytest.raises(runplane.PermissionDeniedError):
        await batch_reader.runs.retrieve(run.id)


async def test_a_token_of_one_environment_sees_nothing_of_another(scheduler: Scheduler) -> None:
    dev, prod = await _client(scheduler, "dev"), await _client(scheduler, "prod")
    run = await dev.tasks.trigger("not-deployed", {}, tags=["shared"])
    prod_token = await prod.auth.create_public_token(
        scopes={"read": {"runs": [run.id], "tags": ["shared"]}}
    )
    public = _as(scheduler, prod_token)
    with pytest.raises(runplane.PermissionDeniedError):
        await public.runs.retrieve(run.id)
    assert [r async for r in public.runs.list(tag="shared")] == []


async def test_bad_scopes_and_lifetimes_are_invalid_arguments(scheduler: Scheduler) -> None:
    client = await _client(scheduler)
    with pytest.raises(runplane.InvalidArgumentError, match=r"scopes\[0\]"):
        await client.auth.create_public_token(scopes={"read": {"everything": ["x"]}})
    with pytest.raises(runplane.InvalidArgumentError, match="scopes"):
        await client.auth.create_public_token(scopes={})
    with pytest.raises(runplane.InvalidArgumentError, match="30 days"):
        await client.auth.create_public_token(
            scopes={"read": {"runs": ["run_1"]}}, expiration_time="31d"
        )
