"""The worker plane under attack (issue 12, findings 1-3): attempts reported only by the
connection holding them, executor ids that cannot be taken over, and worker keys as the only
credential that connects an executor. Scheduler, realtime and executor run as processes."""

from __future__ import annotations

import itertools
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

import runplane
from runplane import RunStatus
from runplane.v1 import worker_service_pb2 as wpb
from runplane_common.ids import random_id
from runplane_scheduler.store import tables as db
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually
from tests.helpers.worker import RawWorker

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CLUSTER_TASKS = "examples.engine"


async def _current_attempt(cluster: Cluster, run_id: str) -> tuple[str, str]:
    """The run's current attempt id and executor id: what an attacker would have to guess."""
    engine = db.create_engine(cluster.database_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    select(db.runs.c.current_attempt_id, db.runs.c.executor_id).where(
                        db.runs.c.id == run_id
                    )
                )
            ).one()
    finally:
        await engine.dispose()
    return row.current_attempt_id or "", row.executor_id or ""


async def _held_run(cluster: Cluster, tmp_path: Path) -> tuple[runplane.Client, str, Path]:
    """A dev run executing on the real executor until the returned file exists."""
    client = cluster.client("dev")
    release = tmp_path / "release"
    handle = await client.tasks.trigger("serial-work", {"release": str(release), "label": "real"})
    await eventually(
        lambda: _status_is(client, handle.id, RunStatus.EXECUTING), 60, description="executing"
    )
    return client, handle.id, release


async def _status_is(client: runplane.Client, run_id: str, status: RunStatus) -> bool:
    return (await client.runs.retrieve(run_id)).status is status


def _forged(attempt_id: str, run_id: str) -> list[wpb.ConnectRequest]:
    return [
        wpb.ConnectRequest(ack=wpb.AssignmentAck(attempt_id=attempt_id)),
        wpb.ConnectRequest(started=wpb.AttemptStarted(attempt_id=attempt_id)),
        wpb.ConnectRequest(
            metadata=wpb.MetadataUpdate(
                run_id=run_id,
                attempt_id=attempt_id,
                operations=[wpb.MetadataOperation(type="set", key="owned", value="true")],
            )
        ),
        wpb.ConnectRequest(wait=wpb.WaitRequest(attempt_id=attempt_id, seq=1, duration_ms=1)),
        wpb.ConnectRequest(result=wpb.AttemptResult(attempt_id=attempt_id, output='"forged"')),
    ]


@pytest.mark.parametrize("attacker_env", ["prod", "dev"])
async def test_only_the_connection_holding_an_attempt_may_report_on_it(
    cluster: Cluster, tmp_path: Path, attacker_env: str
) -> None:
    """Finding 1: another environment's worker key (or the same environment's, on another
    connection) sends ack, started, metadata, a wait and a result for a live attempt: all are
    refused and logged, and the run ends with its own output."""
    client, run_id, release = await _held_run(cluster, tmp_path)
    attempt_id, _ = await _current_attempt(cluster, run_id)
    async with RawWorker(cluster.api_url, cluster.worker_keys[attacker_env]) as attacker:
        await attacker.register(tasks=["serial-work"])
        for message in _forged(attempt_id, run_id):
            attacker.send(message)
        await eventually(
            lambda: cluster.scheduler.log().count(f"for attempt {attempt_id} from executor") >= 5,
            30,
            description="the five forged reports refused and logged",
        )
    run = await client.runs.retrieve(run_id)
    assert run.status is RunStatus.EXECUTING and run.metadata == {}
    release.write_text("")
    run = await client.runs.poll(run_id, interval=0.05, timeout=60)
    assert run.status is RunStatus.COMPLETED and run.output == "real"


async def test_attempt_ids_cannot_be_derived_from_run_ids(cluster: Cluster) -> None:
    """Finding 1: on the fast path the attempt was the run id's ULID plus one."""
    client = cluster.client("dev")
    for _ in range(5):
        handle = await client.tasks.trigger("echo", {})
        await client.runs.poll(handle, interval=0.05, timeout=60)
        engine = db.create_engine(cluster.database_url)
        try:
            async with engine.connect() as conn:
                attempt_ids = (
                    await conn.execute(
                        select(db.attempts.c.id).where(db.attempts.c.run_id == handle.id)
                    )
                ).scalars()
                for attempt_id in attempt_ids:
                    assert abs(_ulid(attempt_id) - _ulid(handle.id)) > 2**40
        finally:
            await engine.dispose()


def _ulid(value: str) -> int:
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    number = 0
    for char in value.split("_", 1)[1]:
        number = number * 32 + alphabet.index(char)
    return number


def test_random_ids_in_one_millisecond_are_not_sequential() -> None:
    ids = sorted(_ulid(random_id("attempt")) for _ in range(1000))
    assert min(b - a for a, b in itertools.pairwise(ids)) > 1


async def test_an_executor_id_cannot_be_taken_over(cluster: Cluster, tmp_path: Path) -> None:
    """Finding 2: registering the dev executor's id, from prod or from a second dev
    connection without its session token, is refused; dev keeps running its runs."""
    client, run_id, release = await _held_run(cluster, tmp_path)
    attempt_id, executor_id = await _current_attempt(cluster, run_id)
    assert executor_id
    for env in ("prod", "dev"):
        async with RawWorker(cluster.api_url, cluster.worker_keys[env]) as attacker:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await attacker.register(
                    executor_id=executor_id, tasks=["serial-work"], running=[attempt_id]
                )
            assert refused.value.code() is grpc.StatusCode.ALREADY_EXISTS
            assert "session_token" in (refused.value.details() or "")
    release.write_text("")
    run = await client.runs.poll(run_id, interval=0.05, timeout=60)
    assert run.status is RunStatus.COMPLETED and run.output == "real"
    handle = await client.tasks.trigger("echo", {"after": "takeover"})
    run = await client.runs.poll(handle, interval=0.05, timeout=60)
    assert run.status is RunStatus.COMPLETED


async def test_a_reconnect_with_the_session_token_keeps_the_executor_id(cluster: Cluster) -> None:
    """The one way to register a known id again: present its session token."""
    key = cluster.worker_keys["dev"]
    async with RawWorker(cluster.api_url, key) as first:
        registered = await first.register(tasks=["nothing-here"])
        async with RawWorker(cluster.api_url, key) as thief:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await thief.register(executor_id=registered.executor_id)
            assert refused.value.code() is grpc.StatusCode.ALREADY_EXISTS
        async with RawWorker(cluster.api_url, key) as again:
            back = await again.register(
                executor_id=registered.executor_id, session_token=registered.session_token
            )
            assert back.executor_id == registered.executor_id
            assert back.session_token and back.session_token != registered.session_token


async def test_only_keys_with_the_execute_right_connect_an_executor(cluster: Cluster) -> None:
    """Finding 3: a plain secret key triggers and reads but cannot execute; a worker key
    executes and cannot trigger or read."""
    async with RawWorker(cluster.api_url, cluster.keys["dev"]) as secret:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await secret.register(tasks=["echo"])
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "worker key" in (refused.value.details() or "")
    worker = runplane.Client(
        api_url=cluster.api_url,
        secret_key=cluster.worker_keys["dev"],
        realtime_url=cluster.realtime_url,
    )
    with pytest.raises(runplane.PermissionDeniedError):
        await worker.tasks.trigger("echo", {})
    with pytest.raises(runplane.PermissionDeniedError):
        await worker.runs.list().__anext__()
    # The real executor connects with its worker key and runs work.
    handle = await cluster.client("dev").tasks.trigger("echo", {"n": 1})
    run = await cluster.client("dev").runs.poll(handle, interval=0.05, timeout=60)
    assert run.status is RunStatus.COMPLETED
