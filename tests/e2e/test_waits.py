"""Durable waits and child runs (issue 4), end to end: scheduler, executor and realtime as
processes, real NATS, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

import runplane
from runplane import RunStatus
from runplane_scheduler.store import tables as db
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


CLUSTER_TASKS = "examples.waits"


async def _final(client: runplane.Client, run_id: str, timeout: float = 90) -> runplane.Run:
    return await client.runs.poll(run_id, interval=0.1, timeout=timeout)


async def _status_is(client: runplane.Client, run_id: str, status: RunStatus) -> bool:
    return (await client.runs.retrieve(run_id)).status is status


async def _count(client: runplane.Client, tag: str) -> int:
    return len([r async for r in client.runs.list(tag=tag, page_size=100)])


async def test_a_duration_wait_frees_the_slot_and_resumes_after_it(cluster: Cluster) -> None:
    client = cluster.client()
    sleeper = await client.tasks.trigger("sleeper", {"seconds": 2})
    await eventually(
        lambda: _status_is(client, sleeper.id, RunStatus.WAITING), 60, description="WAITING"
    )
    # The queue's limit is 1: this run can only start because the waiting one holds no slot.
    quick = await client.tasks.trigger("quick", None)
    quick_run = await _final(client, quick.id)
    assert quick_run.status is RunStatus.COMPLETED, cluster.logs()
    assert (await client.runs.retrieve(sleeper.id)).status is RunStatus.WAITING
    run = await _final(client, sleeper.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output["after"] - run.output["before"] >= 2
    assert run.output["before"] < quick_run.output["at"] < run.output["after"]


async def test_a_token_completed_by_http_post_resumes_the_run_with_the_json(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    token = await client_wait(client).create_token(timeout="10m", tags=["approval"])
    assert token.id.startswith("waitpoint_") and token.url.startswith("http://")
    handle = await client.tasks.trigger("token-waiter", {"token": token.id})
    await eventually(
        lambda: _status_is(client, handle.id, RunStatus.WAITING), 60, description="WAITING"
    )
    body = json.dumps({"approved": True, "by": "ops"}).encode()
    request = urllib.request.Request(
        token.url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with await asyncio.to_thread(urllib.request.urlopen, request) as response:
        assert response.status == 200
    run = await _final(client, handle.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == {"ok": True, "output": {"approved": True, "by": "ops"}}
    done = await client_wait(client).retrieve_token(token.id)
    assert done.status == "COMPLETED" and done.output == {"approved": True, "by": "ops"}
    listed = await client_wait(client).list_tokens(status="COMPLETED", tags="approval")
    assert [t.id for t in listed] == [token.id]


async def test_a_wrong_secret_does_not_complete_a_token(cluster: Cluster) -> None:
    client = cluster.client()
    token = await client_wait(client).create_token()
    bad = token.url.split("secret=")[0] + "secret=nope"
    request = urllib.request.Request(bad, data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        await asyncio.to_thread(urllib.request.urlopen, request)
    assert info.value.code == 404
    assert (await client_wait(client).retrieve_token(token.id)).status == "WAITING"


async def test_a_token_timing_out_gives_a_result_with_the_timeout_error(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("token-waiter", {"timeout": "1s"})
    run = await _final(client, handle.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output["ok"] is False
    assert run.output["error"] == "WaitpointTimeoutError"


async def test_trigger_and_wait_returns_the_child_output(cluster: Cluster) -> None:
    client = cluster.client()
    tag = f"c-{uuid.uuid4().hex[:8]}"
    handle = await client.tasks.trigger("parent", {"mode": "one", "child": {"n": 4}, "tag": tag})
    run = await _final(client, handle.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == {"ok": True, "output": {"n": 4, "double": 8}, "error": None}
    [child] = [r async for r in client.runs.list(tag=tag)]
    assert child.parent_run_id == handle.id and child.status is RunStatus.COMPLETED


async def test_a_failed_child_is_a_result_until_unwrap_raises(cluster: Cluster) -> None:
    client = cluster.client()
    failed = await client.tasks.trigger("parent", {"mode": "one", "child": {"n": 1, "fail": True}})
    run = await _final(client, failed.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output["ok"] is False and run.output["output"] is None
    assert "failed on purpose" in run.output["error"]
    unwrapped = await client.tasks.trigger("parent", {"mode": "unwrap"})
    run = await _final(client, unwrapped.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output["raised"] == "TaskRunError"
    assert "failed on purpose" in run.output["message"]


async def test_a_batch_of_20_children_returns_20_results_in_order(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("parent", {"mode": "batch", "count": 20})
    run = await _final(client, handle.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == list(range(20))
    by_id = await client.tasks.trigger("parent", {"mode": "batch-by-id"})
    run = await _final(client, by_id.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert [r["ok"] for r in run.output] == [True, False, True]
    assert run.output[2]["output"] == {"n": 2, "double": 4}


async def test_gather_of_three_child_runs_and_a_wait_returns_all(cluster: Cluster) -> None:
    client = cluster.client()
    tag = f"g-{uuid.uuid4().hex[:8]}"
    handle = await client.tasks.trigger("parent", {"mode": "gather", "tag": tag})
    run = await _final(client, handle.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == [1, 2, 3]
    assert await _count(client, tag) == 3


async def test_waits_outside_a_task_raise_a_clear_error() -> None:
    with pytest.raises(runplane.ConfigurationError, match="inside a task run"):
        await runplane.wait.for_(seconds=1)
    child = runplane.Task(id="x", fn=lambda p: p, queue=runplane.Queue(name="q"))
    with pytest.raises(runplane.ConfigurationError, match="inside a task run"):
        await child.trigger_and_wait({})


def client_wait(client: runplane.Client) -> runplane.WaitAPI:
    return runplane.WaitAPI(client)


async def test_a_retry_waits_again_but_a_keyed_wait_ends_with_the_first(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("keyed-sleeper", {"seconds": 1})
    run = await _final(client, handle.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == 2 and run.attempt_count == 2
    engine = db.create_engine(cluster.database_url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(db.waitpoints.c.attempt, db.waitpoints.c.seq, db.waitpoints.c.due_at)
                    .where(db.waitpoints.c.run_id == handle.id)
                    .order_by(db.waitpoints.c.attempt)
                )
            ).all()
    finally:
        await engine.dispose()
    # Each attempt journals its own wait; the retry's keyed wait took the first one's end.
    assert [(r.attempt, r.seq) for r in rows] == [(1, 1), (2, 1)]
    assert rows[0].due_at == rows[1].due_at


async def test_cancelling_a_waiting_parent_cancels_its_child(cluster: Cluster) -> None:
    client = cluster.client()
    tag = f"x-{uuid.uuid4().hex[:8]}"
    handle = await client.tasks.trigger(
        "parent", {"mode": "one", "child": {"n": 1, "seconds": 120}, "tag": tag}
    )

    async def child_running() -> runplane.Run:
        children = [r async for r in client.runs.list(tag=tag)]
        assert len(children) == 1 and children[0].status is RunStatus.EXECUTING, children
        return children[0]

    child = await eventually(child_running, 60, description="the child executes")
    await eventually(
        lambda: _status_is(client, handle.id, RunStatus.WAITING), 30, description="WAITING"
    )
    await client.runs.cancel(handle.id)
    assert (await _final(client, handle.id)).status is RunStatus.CANCELED
    assert (await _final(client, child.id)).status is RunStatus.CANCELED


async def test_token_calls_answer_bad_input_naming_the_field(cluster: Cluster) -> None:
    wait = client_wait(cluster.client())
    with pytest.raises(runplane.InvalidArgumentError) as info:
        await wait.create_token(tags=["x" * 200])
    assert info.value.field == "tags[0]"
    with pytest.raises(runplane.InvalidArgumentError) as info:
        await wait.complete_token("run_123", {})
    assert info.value.field == "token_id"
    with pytest.raises(runplane.NotFoundError):
        await wait.retrieve_token("waitpoint_0000000000000000000000000a")
    first = await wait.create_token(idempotency_key="approve-42")
    again = await wait.create_token(idempotency_key="approve-42")
    assert again.id == first.id and again.is_cached and not first.is_cached


async def test_a_tokens_public_access_token_completes_that_token_only(cluster: Cluster) -> None:
    client = cluster.client()
    token = await client_wait(client).create_token(tags=["pat"])
    other = await client_wait(client).create_token()
    assert token.public_access_token and token.public_access_token != other.public_access_token
    browser = runplane.Client(
        api_url=cluster.api_url, secret_key=token.public_access_token, realtime_url="-"
    )
    with pytest.raises(runplane.PermissionDeniedError):
        await client_wait(browser).complete_token(other.id, {"no": 1})
    with pytest.raises(runplane.PermissionDeniedError):
        await client_wait(browser).retrieve_token(token.id)  # it may complete, not read
    await client_wait(browser).complete_token(token.id, {"approved": True})
    done = await client_wait(client).retrieve_token(token.id)
    assert done.status == "COMPLETED" and done.output == {"approved": True}
    assert (await client_wait(client).retrieve_token(other.id)).status == "WAITING"


async def test_on_wait_and_on_resume_hooks_fire_around_each_wait(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("hooked-wait", None)
    run = await _final(client, handle.id)
    assert run.status is RunStatus.COMPLETED, cluster.logs()
    assert run.output == [
        "on_wait:duration",
        "on_resume:duration",
        "between",
        "on_wait:duration",
        "on_resume:duration",
    ]


async def test_on_cancel_runs_for_runs_cancelled_while_queued_or_waiting(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.client()
    await client.queues.pause("one-at-a-time")
    queued_file = tmp_path / "queued"
    queued = await client.tasks.trigger("cancel-hooked", {"file": str(queued_file)})
    await client.runs.cancel(queued.id)
    text = await eventually(lambda: queued_file.exists() and queued_file.read_text(), 30)
    assert text == "attempt=0 signal=True"  # no attempt ever ran

    await client.queues.resume("one-at-a-time")
    waiting_file = tmp_path / "waiting"
    waiting = await client.tasks.trigger("cancel-hooked", {"file": str(waiting_file)})
    await eventually(lambda: _status_is(client, waiting.id, RunStatus.WAITING), 60)
    await client.runs.cancel(waiting.id)
    text = await eventually(lambda: waiting_file.exists() and waiting_file.read_text(), 30)
    assert text == "attempt=1 signal=True"  # its suspended attempt was stopped
