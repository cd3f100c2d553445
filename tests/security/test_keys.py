"""Key lifecycle, state on disk and the executor's admin port (security issue, findings 6-8).

Each test reproduces an attack and shows it refused: a revoked key (and the public tokens it
minted) keeps working nowhere, a rotated key hands over to its successor, a correctly signed
token living longer than 30 days is refused, ``runplane dev`` keeps its keys and database to the
user, and only the executor's own key may drain it (a drain can be undone).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

import runplane
from runplane import RunStatus
from runplane.v1 import executor_service_pb2 as epb
from runplane.v1 import executor_service_pb2_grpc
from runplane_common.auth import MAX_TOKEN_LIFETIME_MS, sign_jwt
from runplane_common.config import SchedulerSettings
from runplane_scheduler.app import Scheduler, start_scheduler
from tests.helpers.cluster import ROOT, Cluster
from tests.helpers.registration import register_in
from tests.helpers.wait import eventually

# Within this long of a revocation every service refuses the key (the caches hold 2 s).
REVOCATION_SECONDS = 10


async def runplane_cli(database_url: str, *args: str) -> tuple[int, str, str]:
    """``runplane ARGS`` against ``database_url``: exit code, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPLANE_")}
    env["RUNPLANE_DATABASE_URL"] = database_url
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "sdk"), str(ROOT / "services"), str(ROOT)])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runplane_cli", *args,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def create_key(database_url: str, *args: str) -> tuple[str, str]:
    """A new key made with ``runplane keys create ARGS`` and its id (found by its name)."""
    name = f"test-{time.monotonic_ns()}"
    code, out, err = await runplane_cli(database_url, "keys", "create", *args, "--name", name)
    assert code == 0, err
    listed = await list_keys(database_url)
    (entry,) = [k for k in listed if k["name"] == name]
    return out.strip(), entry["id"]


async def list_keys(database_url: str, *args: str) -> list[dict[str, Any]]:
    code, out, err = await runplane_cli(database_url, "keys", "ls", "--json", *args)
    assert code == 0, err
    keys: list[dict[str, Any]] = json.loads(out)
    return keys


def client(cluster: Cluster, key: str) -> runplane.Client:
    return runplane.Client(
        api_url=cluster.api_url, secret_key=key, realtime_url=cluster.realtime_url
    )


async def refused(call: Any) -> bool:
    """True once ``call()`` is refused as UNAUTHENTICATED."""
    try:
        await call()
    except runplane.UnauthenticatedError:
        return True
    return False


async def sse_status(cluster: Cluster, path: str, key: str) -> int:
    """The status of an SSE request (its events read to the end when it is 200)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{cluster.realtime_http_url}{path}", headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        if response.status == 200:
            async for raw in response.content:
                if raw.startswith(b"event: end"):
                    break
        return response.status


async def trigger_by_url_status(cluster: Cluster, key: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{cluster.realtime_http_url}/api/v1/tasks/hello-world/trigger",
            headers={"Authorization": f"Bearer {key}"},
            json={"payload": {"name": "by-url"}},
        ) as response,
    ):
        return response.status


@pytest.mark.timeout(180)
async def test_a_revoked_key_and_its_tokens_are_refused_everywhere_within_seconds(
    cluster: Cluster,
) -> None:
    key, key_id = await create_key(cluster.database_url, "--env", "dev")
    victim = client(cluster, key)
    handle = await victim.tasks.trigger("hello-world", {"name": "before"})
    await victim.runs.poll(handle, interval=0.05, timeout=60)
    token = await victim.auth.create_public_token(scopes={"read": {"runs": [handle.id]}})
    reader = client(cluster, token)
    # Everything works before the revocation: scheduler, realtime (gRPC and SSE), trigger by
    # URL, and the public token the key minted.
    assert (await victim.runs.retrieve(handle)).status is RunStatus.COMPLETED
    assert [r.status async for r in victim.runs.subscribe_to_run(handle)][-1] is (
        RunStatus.COMPLETED
    )
    assert await sse_status(cluster, f"/realtime/v1/runs/{handle.id}", key) == 200
    assert await trigger_by_url_status(cluster, key) == 200
    assert (await reader.runs.retrieve(handle)).id == handle.id

    code, _, err = await runplane_cli(cluster.database_url, "keys", "revoke", key_id)
    assert code == 0, err
    (listed,) = [k for k in await list_keys(cluster.database_url) if k["id"] == key_id]
    assert listed["revoked"] is True and listed["revoked_at"]

    # Each check has its own cache (of the key, of the key a token names): each is given the
    # same few seconds.
    async def sse_refused() -> bool:
        return await sse_status(cluster, f"/realtime/v1/runs/{handle.id}", key) == 401

    async def trigger_by_url_refused() -> bool:
        return await trigger_by_url_status(cluster, key) == 401

    for what, check in (
        ("scheduler: read", lambda: refused(lambda: victim.runs.retrieve(handle))),
        (
            "scheduler: trigger",
            lambda: refused(lambda: victim.tasks.trigger("hello-world", {"name": "after"})),
        ),
        (
            "realtime gRPC",
            lambda: refused(lambda: victim.runs.subscribe_to_run(handle).__anext__()),
        ),
        ("realtime SSE", sse_refused),
        ("trigger by URL", trigger_by_url_refused),
        ("the key's public token", lambda: refused(lambda: reader.runs.retrieve(handle))),
        (
            "the key's public token on realtime",
            lambda: refused(lambda: reader.runs.subscribe_to_run(handle).__anext__()),
        ),
    ):
        await eventually(check, REVOCATION_SECONDS, description=f"{what} refuses the revoked key")
    # Other keys of the environment are untouched.
    assert (await cluster.client().runs.retrieve(handle)).id == handle.id


@pytest.mark.timeout(120)
async def test_an_executor_stream_open_with_a_revoked_key_is_ended(cluster: Cluster) -> None:
    from runplane_common.config import ExecutorSettings
    from runplane_executor.app import Executor

    key, key_id = await create_key(cluster.database_url, "--env", "dev", "--kind", "worker")
    executor = Executor(
        ExecutorSettings(
            modules=["examples.hello"], api_url=cluster.api_url, secret_key=key, processes=1
        )
    )
    await executor.start()
    try:
        await eventually(lambda: executor.connected, 60, description="the executor connects")
        code, _, err = await runplane_cli(cluster.database_url, "keys", "revoke", key_id)
        assert code == 0, err
        # The open stream ends (its key is checked again every 2 s) and reconnecting is refused.
        await eventually(
            lambda: not executor.connected,
            REVOCATION_SECONDS,
            description="the scheduler ends the revoked key's stream",
        )
    finally:
        await executor.stop()


@pytest.mark.timeout(180)
async def test_rotate_hands_over_to_a_new_key_and_revokes_the_old(cluster: Cluster) -> None:
    url = cluster.database_url
    old, old_id = await create_key(url, "--env", "dev", "--execute")
    handle = await client(cluster, old).tasks.trigger("hello-world", {"name": "rotate"})

    # With a grace both keys work; the old one is revoked when it ends (here: by hand, early).
    code, out, err = await runplane_cli(url, "keys", "rotate", old_id, "--grace", "1h")
    assert code == 0, err
    graced = out.strip()
    assert graced.startswith("rp_dev_") and graced != old
    assert (await client(cluster, old).runs.retrieve(handle)).id == handle.id
    assert (await client(cluster, graced).runs.retrieve(handle)).id == handle.id
    keys = {k["id"]: k for k in await list_keys(url, "--env", "dev")}
    assert keys[old_id]["revoked"] is False and keys[old_id]["revoked_at"]
    (successor,) = [
        k
        for k in keys.values()
        if k["name"] == keys[old_id]["name"] and k != keys[old_id] and not k["revoked_at"]
    ]
    assert successor["rights"] == ["api", "execute"] == keys[old_id]["rights"]
    assert successor["env"] == "dev" and successor["kind"] == "secret"
    code, _, err = await runplane_cli(url, "keys", "revoke", old_id)
    assert code == 0, err
    await eventually(
        lambda: refused(lambda: client(cluster, old).runs.retrieve(handle)),
        REVOCATION_SECONDS,
        description="the rotated key is refused once revoked",
    )

    # Without a grace the old key stops at once; the new one has the same environment.
    code, out, err = await runplane_cli(url, "keys", "rotate", successor["id"])
    assert code == 0, err
    newest = out.strip()
    await eventually(
        lambda: refused(lambda: client(cluster, graced).runs.retrieve(handle)),
        REVOCATION_SECONDS,
        description="the key rotated without grace is refused",
    )
    assert (await client(cluster, newest).runs.retrieve(handle)).id == handle.id

    # A listing never shows a key or its hash; unknown ids and revoked keys are clear errors.
    code, text, _ = await runplane_cli(url, "keys", "ls")
    assert code == 0 and old not in text and newest not in text and "rp_" not in text
    code, _, err = await runplane_cli(url, "keys", "revoke", "key_doesnotexist")
    assert code != 0 and "no key with id 'key_doesnotexist'" in err
    code, _, err = await runplane_cli(url, "keys", "rotate", old_id)
    assert code != 0 and "revoked" in err


@pytest.fixture
async def scheduler(database_url: str, nats_server: Any) -> AsyncIterator[Scheduler]:
    s = await start_scheduler(
        SchedulerSettings(
            database_url=database_url,
            nats_url=nats_server.url,
            listen="127.0.0.1:0",
            signing_key="test-signing-key",
        )
    )
    yield s
    await s.stop()


@pytest.mark.timeout(90)
async def test_a_correctly_signed_token_living_over_30_days_is_refused(
    scheduler: Scheduler,
) -> None:
    from runplane_scheduler.keys import create_key as make_key

    api = f"127.0.0.1:{scheduler.port}"
    owner = runplane.Client(api_url=api, secret_key=await make_key(scheduler.engine_db, "dev"))
    await register_in(scheduler, "dev", ("not-deployed",))
    handle = await owner.tasks.trigger("not-deployed", {})
    env_id = (await owner.runs.retrieve(handle)).raw.environment_id
    now = int(time.time())
    day = 24 * 3600

    def token(**claims: Any) -> runplane.Client:
        body = {"sub": env_id, "env": "dev", "scopes": [f"read:runs:{handle.id}"], **claims}
        return runplane.Client(api_url=api, secret_key=sign_jwt(b"test-signing-key", body))

    # Exactly the maximum is fine, with or without iat.
    assert 30 * day * 1000 == MAX_TOKEN_LIFETIME_MS
    assert (await token(iat=now, exp=now + 30 * day).runs.retrieve(handle)).id == handle.id
    assert (await token(exp=now + 30 * day - 60).runs.retrieve(handle)).id == handle.id
    for claims in (
        {"iat": now, "exp": now + 31 * day},
        {"exp": now + 31 * day},  # no iat: the lifetime counts from now
        {"iat": now - 40 * day, "exp": now + day},  # issued long ago, still "valid"
        {"iat": now, "exp": now + 100 * 365 * day},
    ):
        with pytest.raises(runplane.UnauthenticatedError, match="30-day"):
            await token(**claims).runs.retrieve(handle)


@pytest.mark.timeout(10)
def test_the_lifetime_rule_counts_from_iat_or_from_now() -> None:
    from runplane_common.auth import verify_jwt
    from runplane_common.errors import Unauthenticated

    key, now_ms, day = b"k" * 32, 1_800_000_000_000, 24 * 3600
    now = now_ms // 1000
    ok = ({"iat": now, "exp": now + 30 * day}, {"iat": now - 29 * day, "exp": now + day})
    for claims in ok:
        assert verify_jwt(key, sign_jwt(key, claims), now_ms) == claims
    too_long = (
        {"iat": now, "exp": now + 30 * day + 2},
        {"exp": now + 31 * day},
        {"iat": now - 30 * day, "exp": now + 60},
        {"iat": "yesterday", "exp": now + 31 * day},
    )
    for claims in too_long:
        with pytest.raises(Unauthenticated, match="30-day"):
            verify_jwt(key, sign_jwt(key, claims), now_ms)


def _modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        if not path.is_symlink():
            found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_runplane_dev_keeps_its_state_to_the_user(tmp_path: Path) -> None:
    # An existing, world-readable .runplane (as made before this fix) is tightened too.
    state = tmp_path / ".runplane"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    (state / "dev.env").write_text("RUNPLANE_SECRET_KEY=rp_dev_old\n")
    (state / "dev.env").chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPLANE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "sdk"), str(ROOT / "services"), str(ROOT)])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runplane_cli", "dev", "--tasks", "examples.hello", "--port", "0",
        "--trigger", "hello-world", "--payload", '{"name": "modes"}', "--exit",
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, umask=0o022,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 100)
    assert proc.returncode == 0, out.decode()

    modes = _modes(state)
    assert {"dev.env", "runplane.db", "nats"} <= set(modes), modes
    assert any(name.startswith("nats/") for name in modes), modes  # the JetStream store
    loose = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o700 if (state / name).is_dir() else 0o600)
    }
    assert loose == {}, loose
    assert "rp_dev_old" not in (state / "dev.env").read_text()


async def _admin(address: str, method: str, key: str | None) -> epb.ExecutorStatus:
    request = getattr(epb, f"{method}Request")()
    metadata = (("authorization", f"Bearer {key}"),) if key is not None else ()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        reply = await getattr(stub, method)(request, metadata=metadata, timeout=10)
    status: epb.ExecutorStatus = reply.status
    return status


async def _admin_refused(address: str, method: str, key: str | None) -> bool:
    try:
        await _admin(address, method, key)
    except grpc.aio.AioRpcError as error:
        return error.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


@pytest.mark.timeout(180)
async def test_only_the_executors_own_key_drains_it_and_a_drain_can_be_undone(
    cluster: Cluster,
) -> None:
    address, own = cluster.executor_status_url, cluster.executor_key
    for method in ("GetExecutorStatus", "DrainExecutor", "ResumeExecutor"):
        for key in (None, "", cluster.keys["dev"], cluster.worker_keys["prod"], own + "x"):
            assert await _admin_refused(address, method, key), (method, key)
    status = await _admin(address, "GetExecutorStatus", own)
    assert status.connected and not status.draining

    client = cluster.client()
    assert (await _admin(address, "DrainExecutor", own)).draining
    held = await client.tasks.trigger("hello-world", {"name": "held"})
    # A drained executor takes no new attempt: the run is still queued a second later.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.runs.poll(held, interval=0.05), 1.0)
    assert (await client.runs.retrieve(held)).status is RunStatus.QUEUED

    assert not (await _admin(address, "ResumeExecutor", own)).draining
    run = await client.runs.poll(held, interval=0.05, timeout=60)
    assert run.status is RunStatus.COMPLETED

    # Undrained after a reconnection made while draining (registered with no capacity): the
    # executor registers again with its capacity and takes several attempts at once.
    await _admin(address, "DrainExecutor", own)
    await cluster.restart_scheduler()
    await eventually(
        lambda: _connected(address, own), 60, description="the executor reconnects, draining"
    )
    sleepy = [await client.tasks.trigger("sleepy", {"seconds": 2}) for _ in range(3)]
    await _admin(address, "ResumeExecutor", own)
    await eventually(
        lambda: _all_executing(client, [h.id for h in sleepy]),
        30,
        description="three runs executing at once after the resume",
    )

    # Revoking the executor's key closes its admin port within seconds too.
    (entry,) = [
        k
        for k in await list_keys(cluster.database_url, "--env", "dev")
        if k["kind"] == "worker" and not k["revoked_at"]
    ]
    code, _, err = await runplane_cli(cluster.database_url, "keys", "revoke", entry["id"])
    assert code == 0, err
    await eventually(
        lambda: _admin_refused(address, "GetExecutorStatus", own),
        REVOCATION_SECONDS,
        description="the executor refuses its revoked key",
    )


async def _connected(address: str, key: str) -> bool:
    status = await _admin(address, "GetExecutorStatus", key)
    return status.connected and status.draining


async def _all_executing(client: runplane.Client, run_ids: list[str]) -> bool:
    runs = [await client.runs.retrieve(run_id) for run_id in run_ids]
    return all(r.status is RunStatus.EXECUTING for r in runs)
