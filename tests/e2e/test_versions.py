"""Worker versions end to end: version locking across a deploy, PENDING_VERSION while a
locked run's version has no executor, refused conflicting registrations, rollback, and
schedules that follow the promoted manifest.

The scheduler runs with manual promotion (RUNPLANE_VERSION_PROMOTION=manual, as in production):
an executor's registration stores its version, and only a promotion (``runplane deploy``)
makes it current. The cluster's executor is v1; tests start v2 executors beside it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest

import runplane
from runplane import RunStatus
from runplane.v1 import worker_service_pb2 as wpb
from runplane.v1 import worker_service_pb2_grpc
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CLUSTER_TASKS = "tests.e2e.version_tasks"
CLUSTER_ENV = {"RUNPLANE_VERSION": "v1", "RUNPLANE_VERSION_PROMOTION": "manual"}
V2 = "tests.e2e.version_tasks_v2"


async def _status_is(client: runplane.Client, run_id: str, status: RunStatus) -> bool:
    return (await client.runs.retrieve(run_id)).status is status


async def _final(client: runplane.Client, run_id: str) -> runplane.Run:
    return await client.runs.poll(run_id, interval=0.1, timeout=90)


async def _waiting_run(client: runplane.Client) -> tuple[str, str]:
    """A run of v1 waiting on a new token: (run id, token id)."""
    token = await runplane.WaitAPI(client).create_token(timeout="10m")
    handle = await client.tasks.trigger("version-waiter", {"token": token.id})
    await eventually(
        lambda: _status_is(client, handle.id, RunStatus.WAITING), 60, description="WAITING"
    )
    return handle.id, token.id


async def _echo(client: runplane.Client) -> runplane.Run:
    handle = await client.tasks.trigger("version-echo", None)
    return await _final(client, handle.id)


async def test_a_run_keeps_its_version_through_a_deploy_and_new_runs_take_the_new_one(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    # Registered, not promoted: a trigger waits for a current version.
    [v1] = await client.versions.list()
    assert (v1.version, v1.current_for, v1.executors) == ("v1", [], 1)
    early = await client.tasks.trigger("version-echo", None)
    assert (await client.runs.retrieve(early.id)).status is RunStatus.PENDING_VERSION
    await client.versions.promote("v1")
    assert (await _final(client, early.id)).output["version"] == "v1"

    run_id, token_id = await _waiting_run(client)
    assert (await client.runs.retrieve(run_id)).worker_version == "v1"
    await cluster.add_executor("executor-v2", V2, "--version", "v2")
    # v2 is registered beside v1; `runplane deploy v2` makes it current.
    env = {**cluster.executor.env, "RUNPLANE_API_URL": cluster.api_url}
    deploy = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "runplane_cli", "deploy", "v2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert deploy.returncode == 0, deploy.stderr
    assert "version v2 is current" in deploy.stdout

    new = await _echo(client)
    assert new.worker_version == "v2"
    assert new.output == {"version": "v2", "deployment": "v2"}

    # The v1 run resumes on v1's executor, not on the current version.
    await runplane.WaitAPI(client).complete_token(token_id, {"approved": True})
    run = await _final(client, run_id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == {"version": "v1", "data": {"approved": True}, "attempt": 1}
    assert run.worker_version == "v1"

    locked_to_v1 = {r.id async for r in client.runs.list(version="v1")}
    assert run_id in locked_to_v1 and new.id not in locked_to_v1
    listing = {v.version: v for v in await client.versions.list()}
    assert listing["v2"].current_for == ["version-echo", "version-nightly", "version-waiter"]
    assert listing["v1"].current_for == [] and listing["v1"].executors == 1

    # `runplane versions ls` shows both, with their executors and active runs.
    ls = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "runplane_cli", "versions", "ls"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ls.returncode == 0, ls.stderr
    lines = ls.stdout.splitlines()
    assert lines[0].split()[:2] == ["VERSION", "STATE"]
    assert any(line.split()[:2] == ["v2", "current"] for line in lines[1:]), ls.stdout


async def test_a_locked_run_waits_in_pending_version_while_its_version_is_gone_then_replays(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    await client.versions.promote("v1")
    run_id, token_id = await _waiting_run(client)
    await cluster.add_executor("executor-v2", V2, "--version", "v2")
    await client.versions.promote("v2")
    cluster.executor.kill()  # v1's only executor: its suspended attempt is gone

    await runplane.WaitAPI(client).complete_token(token_id, {"n": 7})
    await eventually(
        lambda: _status_is(client, run_id, RunStatus.PENDING_VERSION),
        30,
        description="the v1 run parked in PENDING_VERSION",
    )
    # A v2 executor is up and idle, yet the run is not replayed on v2's code.
    await asyncio.sleep(2)
    run = await client.runs.retrieve(run_id)
    assert run.status is RunStatus.PENDING_VERSION and run.worker_version == "v1"
    assert (await _echo(client)).output["version"] == "v2"  # new runs still start

    await cluster.start_executor()  # v1 is back
    run = await _final(client, run_id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    # Replayed from its journal on v1: the wait returned the token's data, same attempt number.
    assert run.output == {"version": "v1", "data": {"n": 7}, "attempt": 1}


async def test_a_rollback_sends_new_runs_back_to_the_previous_version(cluster: Cluster) -> None:
    client = cluster.client()
    with pytest.raises(runplane.FailedPreconditionError, match="no version was promoted yet"):
        await client.versions.rollback()
    await client.versions.promote("v1")
    await cluster.add_executor("executor-v2", V2, "--version", "v2")
    await client.versions.promote("v2")
    assert (await _echo(client)).output["version"] == "v2"

    back = await client.versions.rollback()
    assert back.version == "v1" and "version-echo" in back.current_for
    assert (await _echo(client)).output["version"] == "v1"
    listing = {v.version: v for v in await client.versions.list()}
    # v2 stays current only for the task v1 does not define.
    assert listing["v2"].rolled_back and listing["v2"].current_for == ["version-nightly"]
    assert listing["v1"].current_for == ["version-echo", "version-waiter"]
    # An explicit version still reaches v2; an unknown one is refused, naming the field.
    pinned = await client.tasks.trigger("version-echo", None, version="v2")
    assert (await _final(client, pinned.id)).output["version"] == "v2"
    with pytest.raises(runplane.InvalidArgumentError) as unknown:
        await client.tasks.trigger("version-echo", None, version="v9")
    assert "options.version" in str(unknown.value) and "v9" in str(unknown.value)


async def test_a_schedule_declared_only_in_v2_syncs_on_promote_and_not_before(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    await client.versions.promote("v1")
    await cluster.add_executor("executor-v2", V2, "--version", "v2")

    async def declared() -> list[str]:
        return [s.task_id async for s in client.schedules.list() if s.type == "DECLARATIVE"]

    assert await declared() == []  # v2 is registered, not current
    await client.versions.promote("v2")
    assert await declared() == ["version-nightly"]


async def test_an_executor_registering_a_known_version_with_other_tasks_is_refused(
    cluster: Cluster,
) -> None:
    manifest = wpb.Manifest(
        version="v1",
        tasks=[wpb.TaskDefinition(id="version-echo"), wpb.TaskDefinition(id="version-extra")],
    )
    metadata = (("authorization", f"Bearer {cluster.worker_keys['dev']}"),)
    async with grpc.aio.insecure_channel(cluster.api_url) as channel:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        call = stub.Connect(metadata=metadata)
        await call.write(wpb.ConnectRequest(register=wpb.Register(manifest=manifest, capacity=1)))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    message = refused.value.details() or ""
    assert "version 'v1' is already registered with another manifest" in message
    assert "'version-extra'" in message
    # Nothing changed: v1 still runs.
    client = cluster.client()
    await client.versions.promote("v1")
    assert (await _echo(client)).output["version"] == "v1"


async def test_an_operator_moves_parked_runs_to_v2_with_the_cli_or_fails_them(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    wait = runplane.WaitAPI(client)
    await client.versions.promote("v1")
    moved_id, moved_token = await _waiting_run(client)
    failed_id, failed_token = await _waiting_run(client)
    await cluster.add_executor("executor-v2", V2, "--version", "v2")
    await client.versions.promote("v2")
    cluster.executor.kill()  # v1 is gone for good
    await wait.complete_token(moved_token, {"n": 1})
    await wait.complete_token(failed_token, {"n": 2})
    for run_id in (moved_id, failed_id):
        await eventually(
            lambda run_id=run_id: _status_is(client, run_id, RunStatus.PENDING_VERSION),
            30,
            description=f"{run_id} parked",
        )

    env = {**cluster.executor.env, "RUNPLANE_API_URL": cluster.api_url}

    def migrate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runplane_cli", "runs", "migrate", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    # Not confirmed (no terminal, no --yes): a warning, and nothing moves.
    refused = await asyncio.to_thread(migrate, moved_id, "--to-version", "v2")
    assert refused.returncode != 0 and "--yes" in refused.stderr
    assert "replays its wait journal on that version's code" in refused.stderr
    assert (await client.runs.retrieve(moved_id)).status is RunStatus.PENDING_VERSION

    done = await asyncio.to_thread(migrate, moved_id, "--to-version", "v2", "--yes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [moved_id]
    run = await _final(client, moved_id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    # Replayed from its journal on v2's code: the wait returned the token's data.
    assert run.worker_version == "v2"
    assert run.output["version"] == "v2" and run.output["data"] == {"n": 1}

    # The rest of v1's parked runs fail; a run given by id that is not parked is skipped.
    result = await client.versions.migrate_runs(from_version="v1", fail=True)
    assert result.migrated == [failed_id]
    failed = await _final(client, failed_id)
    assert failed.status is RunStatus.FAILED
    assert failed.error is not None and failed.error.type == "VERSION_UNAVAILABLE"
    again = await client.versions.migrate_runs([moved_id], to_version="v2")
    assert (again.migrated, again.skipped) == ([], [moved_id])
