"""End to end: every service is its own process, talking gRPC over loopback, with a real
nats-server and a real database."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys

import orjson
import pytest

import runplane
from runplane import RunStatus
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_hello_from_the_sdk_completes_with_its_output(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("hello-world", {"name": "Ada"})
    run = await client.runs.poll(handle, interval=0.05, timeout=60)
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"message": "Hello, Ada!", "run": handle.id, "attempt": 1}
    assert run.attempt_count == 1
    assert run.is_success and run.is_completed and not run.is_failed


async def test_hello_from_the_cli_completes_with_its_output(cluster: Cluster) -> None:
    env = {**cluster.env, "RUNPLANE_SECRET_KEY": cluster.keys["dev"]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runplane_cli", "trigger", "hello-world",
        "--payload", '{"name": "CLI"}', "--wait",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "COMPLETED" in text
    assert '"message":"Hello, CLI!"' in text
    run_id = text.split()[0]
    run = await cluster.client().runs.retrieve(run_id)
    assert run.output["message"] == "Hello, CLI!"


async def test_a_failing_task_is_retried_with_backoff_and_ends_failed(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("flaky", {"succeed_on": 99})
    history = [run async for run in client.runs.subscribe_to_run(handle)]
    final = history[-1]
    assert final.status is RunStatus.FAILED
    assert final.attempt_count == 3
    assert final.error is not None
    assert final.error.type == "RuntimeError"
    assert "attempt 3 failed on purpose" in final.error.message
    assert "Traceback" in final.error.stack_trace
    # Each failed attempt but the last waits out its back-off (min_timeout 0.2 s, factor 2) before
    # the run is queued again.
    waits = []
    for before, after in itertools.pairwise(history):
        if before.status is RunStatus.EXECUTING and after.status is RunStatus.QUEUED:
            assert before.updated_at is not None and after.updated_at is not None
            waits.append((after.updated_at - before.updated_at).total_seconds())
    assert len(waits) == 2
    assert waits[0] >= 0.2 - 0.01
    assert waits[1] >= 0.4 - 0.01


async def test_a_task_that_succeeds_on_retry_completes(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("flaky", {"succeed_on": 2})
    run = await client.runs.poll(handle, interval=0.05, timeout=60)
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"attempt": 2}


async def test_abort_fails_without_retrying(cluster: Cluster) -> None:
    client = cluster.client()
    run = await client.runs.poll(await client.tasks.trigger("refuse"), interval=0.05, timeout=60)
    assert run.status is RunStatus.FAILED
    assert run.attempt_count == 1
    assert run.error is not None and run.error.type == "AbortTaskRunError"


async def test_subscriber_sees_every_status_in_order_without_gaps(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("hello-world", {"name": "sub"})
    seen = [run async for run in client.runs.subscribe_to_run(handle)]
    versions = [r.version for r in seen]
    assert versions == list(range(1, len(seen) + 1))
    assert [r.status for r in seen] == [
        RunStatus.QUEUED,
        RunStatus.DEQUEUED,
        RunStatus.EXECUTING,
        RunStatus.COMPLETED,
    ]
    assert seen[-1].output["message"] == "Hello, sub!"


async def test_cancel_stops_a_busy_looping_plain_def_task(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("busy-loop", {"seconds": 600})
    await eventually(
        lambda: _status_is(client, handle.id, RunStatus.EXECUTING),
        timeout=30,
        description="run executing",
    )
    canceled = await client.runs.cancel(handle)
    assert canceled.status is RunStatus.CANCELED
    # The attempt is stopped hard: its process is killed, the executor's slot frees up, and a new
    # run still completes.
    await eventually(
        lambda: "ignored its cancel; killing task process" in cluster.executor.log(),
        timeout=15,
        description="the busy task process was killed",
    )
    after = await client.runs.poll(
        await client.tasks.trigger("hello-world", {"name": "next"}), interval=0.05, timeout=60
    )
    assert after.status is RunStatus.COMPLETED
    assert (await client.runs.retrieve(handle)).status is RunStatus.CANCELED


async def test_kill_9_of_the_executor_retries_on_a_restarted_executor(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("sleepy", {"seconds": 3})
    await eventually(
        lambda: _status_is(client, handle.id, RunStatus.EXECUTING),
        timeout=30,
        description="run executing",
    )
    cluster.executor.kill()
    await cluster.start_executor()
    run = await client.runs.poll(handle, interval=0.1, timeout=90)
    assert run.status is RunStatus.COMPLETED
    assert run.output == 3
    assert run.attempt_count == 2


async def test_a_key_of_one_environment_cannot_read_another_environments_run(
    cluster: Cluster,
) -> None:
    dev, prod = cluster.client("dev"), cluster.client("prod")
    handle = await dev.tasks.trigger("hello-world", {"name": "private"})
    with pytest.raises(runplane.NotFoundError):
        await prod.runs.retrieve(handle)
    with pytest.raises(runplane.NotFoundError):
        await prod.runs.cancel(handle)
    assert [r async for r in prod.runs.list()] == []
    with pytest.raises(runplane.NotFoundError):
        async for _ in prod.runs.subscribe_to_run(handle):
            pass
    bad = runplane.Client(
        api_url=cluster.api_url, secret_key="rp_dev_wrong", realtime_url=cluster.realtime_url
    )
    with pytest.raises(runplane.UnauthenticatedError):
        await bad.runs.retrieve(handle)
    assert (await dev.runs.retrieve(handle)).id == handle.id


async def _status_is(client: runplane.Client, run_id: str, status: RunStatus) -> bool:
    return (await client.runs.retrieve(run_id)).status is status


async def test_a_run_waits_in_pending_version_until_an_executor_provides_its_task(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    await cluster.executor.stop()
    handle = await client.tasks.trigger("hello-world", {"name": "later"})
    assert (await client.runs.retrieve(handle)).status is RunStatus.PENDING_VERSION
    await cluster.start_executor()
    run = await client.runs.poll(handle, interval=0.05, timeout=60)
    assert run.status is RunStatus.COMPLETED
    assert run.output["message"] == "Hello, later!"


async def test_a_scheduler_restart_mid_run_loses_nothing(cluster: Cluster) -> None:
    client = cluster.client()
    running = await client.tasks.trigger("sleepy", {"seconds": 2})
    await eventually(
        lambda: _status_is(client, running.id, RunStatus.EXECUTING),
        timeout=30,
        description="executing",
    )
    await cluster.restart_scheduler()
    queued_after = await client.tasks.trigger("hello-world", {"name": "after restart"})
    first = await client.runs.poll(running, interval=0.1, timeout=60)
    second = await client.runs.poll(queued_after, interval=0.05, timeout=60)
    # The executor reconnected, claimed its attempt and reported it: no second attempt.
    assert first.status is RunStatus.COMPLETED
    assert first.attempt_count == 1
    assert second.status is RunStatus.COMPLETED


async def _cli(cluster: Cluster, *args: str) -> tuple[int, str, str]:
    env = {**cluster.env, "RUNPLANE_SECRET_KEY": cluster.keys["dev"]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runplane_cli",
        *args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_runs_ls_show_watch_and_cancel(cluster: Cluster) -> None:
    client = cluster.client()
    done = await client.runs.poll(
        await client.tasks.trigger("hello-world", {"name": "cli"}), interval=0.05, timeout=60
    )
    code, out, err = await _cli(cluster, "runs", "ls")
    assert code == 0, err
    assert done.id in out and "COMPLETED" in out
    code, out, err = await _cli(cluster, "runs", "show", done.id)
    assert code == 0, err
    assert '"status": "COMPLETED"' in out and '"Hello, cli!"' in out
    code, out, err = await _cli(cluster, "runs", "watch", done.id)
    assert code == 0, err
    assert [line.split()[1] for line in out.splitlines() if line.startswith("v")] == [
        "QUEUED",
        "DEQUEUED",
        "EXECUTING",
        "COMPLETED",
    ]
    busy = await client.tasks.trigger("busy-loop", {"seconds": 600})
    code, out, err = await _cli(cluster, "runs", "cancel", busy.id)
    assert code == 0, err
    assert "CANCELED" in out
    code, out, err = await _cli(cluster, "runs", "show", "run_nosuchrun")
    assert code != 0
    assert err.startswith("runplane: ") and "Traceback" not in err
    code, out, err = await _cli(cluster, "trigger", "hello-world", "--payload", "{bad")
    assert code != 0
    assert "--payload is not valid JSON" in err and "Traceback" not in err


async def test_cli_listings_take_any_status_case_print_json_and_headers_and_survive_a_closed_pipe(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    retried = await client.runs.poll(
        await client.tasks.trigger("flaky", {"succeed_on": 2}), interval=0.05, timeout=60
    )
    assert retried.status is RunStatus.COMPLETED and retried.error is not None

    # Any case; JSON; an unknown status names the ones there are.
    code, out, err = await _cli(cluster, "runs", "ls", "--status", "completed", "--json")
    assert code == 0, err
    listed = orjson.loads(out)
    assert retried.id in [r["id"] for r in listed]
    assert {r["status"] for r in listed} == {"COMPLETED"}
    code, out, err = await _cli(cluster, "runs", "ls", "--status", "done")
    assert code == 2 and "unknown status 'done'" in err and "completed" in err
    assert "Traceback" not in err

    # A run that completed after a failed attempt shows no error.
    code, out, err = await _cli(cluster, "runs", "watch", retried.id)
    assert code == 0, err
    assert "COMPLETED" in out and "error:" not in out

    # Empty listings still print their header; every ls takes --json.
    code, out, err = await _cli(cluster, "schedules", "ls")
    assert code == 0 and out.split()[:2] == ["SCHEDULE", "TASK"], (out, err)
    code, out, err = await _cli(cluster, "runs", "ls", "--tag", "no-such-tag")
    assert code == 0 and out.split()[:2] == ["RUN", "TASK"], (out, err)
    for command in (["queues", "ls"], ["versions", "ls"], ["schedules", "ls"]):
        code, out, err = await _cli(cluster, *command, "--json")
        assert code == 0, err
        assert isinstance(orjson.loads(out), list), command

    # stdout already closed by its reader (`runplane runs ls | head`): no traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**cluster.env, "RUNPLANE_SECRET_KEY": cluster.keys["dev"]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runplane_cli", "runs", "ls", "--json",
        env=env, stdout=write_end, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(write_end)
    _, err_bytes = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 141, err_bytes.decode()
    assert b"Traceback" not in err_bytes and b"BrokenPipe" not in err_bytes
