"""The run engine's triggering and queueing semantics (issue 3), end to end: scheduler,
executor and realtime as processes, real NATS, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import runplane
from runplane import InvalidArgumentError, RunStatus
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


CLUSTER_TASKS = "examples.engine"
CLUSTER_ENV = {"RUNPLANE_LIMIT_OUTPUT_BYTES": "100000"}


async def _final(client: runplane.Client, run_id: str, timeout: float = 60) -> runplane.Run:
    return await client.runs.poll(run_id, interval=0.05, timeout=timeout)


def _counts(path: Path) -> dict[str, int]:
    return json.loads(path.read_text()) if path.exists() else {}


async def test_a_queue_limit_of_2_never_has_more_than_2_executing(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.client()
    counts = tmp_path / "limited.json"
    handles = [
        await client.tasks.trigger("limited-work", {"file": str(counts), "seconds": 0.3})
        for _ in range(10)
    ]
    for h in handles:
        assert (await _final(client, h.id)).status is RunStatus.COMPLETED
    seen = _counts(counts)
    assert seen["max:limited"] == 2  # recorded by the tasks: reached, never exceeded
    assert seen["limited"] == 0


async def test_concurrency_keys_get_their_own_copy_of_the_limit(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.client()
    counts = tmp_path / "keys.json"
    handles = [
        await client.tasks.trigger(
            "per-key-work",
            {"file": str(counts), "key": key, "seconds": 0.3},
            concurrency_key=key,
        )
        for key in ("tenant-a", "tenant-b", "tenant-c")
        for _ in range(3)
    ]
    for h in handles:
        assert (await _final(client, h.id)).status is RunStatus.COMPLETED
    seen = _counts(counts)
    for key in ("tenant-a", "tenant-b", "tenant-c"):
        assert seen[f"max:{key}"] == 1, seen  # the queue's limit of 1 holds per key
    assert seen["max:*"] >= 2, seen  # while different keys ran side by side


async def test_priority_reorders_a_queued_backlog(cluster: Cluster, tmp_path: Path) -> None:
    client = cluster.client()
    order, release = tmp_path / "order.txt", tmp_path / "release"
    blocker = await client.tasks.trigger(
        "serial-work", {"order": str(order), "label": "blocker", "release": str(release)}
    )
    await eventually(lambda: order.exists(), 30, description="the blocker started")
    for label, priority in [("p0-a", 0), ("p0-b", 0), ("p60", 60), ("p10", 10), ("p0-c", 0)]:
        await client.tasks.trigger(
            "serial-work", {"order": str(order), "label": label}, priority=priority
        )
    release.touch()
    await _final(client, blocker.id)

    async def all_ran() -> list[str]:
        lines = order.read_text().split()
        return lines if len(lines) == 6 else []

    ran = await eventually(all_ran, 60)
    assert ran == ["blocker", "p60", "p10", "p0-a", "p0-b", "p0-c"]


async def test_paused_queue_starts_nothing_and_loses_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.client()
    paused = await client.queues.pause("serial")
    assert paused.paused and paused.name == "serial" and paused.id.startswith("queue_")
    handles = [
        await client.tasks.trigger("serial-work", {"label": str(i), "seconds": 0}) for i in range(3)
    ]
    info = await eventually(
        lambda: _queued_is(client, "serial", 3), 30, description="3 runs queued"
    )
    assert info.running == 0
    await asyncio.sleep(0.5)  # nothing may start while paused
    for h in handles:
        assert (await client.runs.retrieve(h.id)).status is RunStatus.QUEUED
    await client.queues.resume("serial")
    for h in handles:
        assert (await _final(client, h.id)).status is RunStatus.COMPLETED
    listed = [q async for q in client.queues.list()]
    assert {"serial", "limited", "per-key", "task/echo"} <= {q.name for q in listed}


async def _queued_is(client: runplane.Client, queue: str, n: int) -> runplane.QueueInfo | None:
    info = await client.queues.retrieve(queue)
    return info if info.queued == n else None


async def test_queue_limit_override_and_reset(cluster: Cluster) -> None:
    client = cluster.client()
    info = await client.queues.retrieve("limited")
    assert (info.concurrency_limit, info.base_concurrency_limit) == (2, 2)
    assert info.override_concurrency_limit is None
    info = await client.queues.override_concurrency_limit("limited", 5)
    assert (info.concurrency_limit, info.override_concurrency_limit) == (5, 5)
    assert info.overridden_at is not None
    by_id = await client.queues.retrieve(info.id)
    assert by_id.name == "limited" and by_id.concurrency_limit == 5
    info = await client.queues.reset_concurrency_limit("limited")
    assert (info.concurrency_limit, info.override_concurrency_limit) == (2, None)
    with pytest.raises(runplane.NotFoundError):
        await client.queues.pause("no-such-queue")


async def test_delay_keeps_the_run_delayed_then_runs_it(cluster: Cluster) -> None:
    client = cluster.client()
    before = datetime.now(UTC)
    handle = await client.tasks.trigger("echo", {"x": 1}, delay="1s")
    run = await client.runs.retrieve(handle.id)
    assert run.status is RunStatus.DELAYED
    assert run.delay_until is not None
    assert run.delay_until >= before + timedelta(seconds=1)
    final = await _final(client, handle.id)
    assert final.status is RunStatus.COMPLETED
    assert final.started_at is not None and final.started_at >= run.delay_until


async def test_reschedule_moves_a_delayed_run_and_refuses_others(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("echo", 1, delay="1h")
    moved = await client.runs.reschedule(handle.id, delay=0.2)
    assert moved.status is RunStatus.DELAYED
    assert moved.delay_until is not None
    assert moved.delay_until < datetime.now(UTC) + timedelta(minutes=1)
    assert (await _final(client, handle.id)).status is RunStatus.COMPLETED
    with pytest.raises(runplane.FailedPreconditionError, match="only DELAYED"):
        await client.runs.reschedule(handle.id, delay="1h")


async def test_ttl_expires_a_run_that_does_not_start_in_time(cluster: Cluster) -> None:
    client = cluster.client()
    await client.queues.pause("serial")
    handle = await client.tasks.trigger("serial-work", {"label": "late"}, ttl="1s")
    queued = await client.runs.retrieve(handle.id)
    assert queued.status is RunStatus.QUEUED and queued.ttl == 1.0
    final = await _final(client, handle.id)
    assert final.status is RunStatus.EXPIRED
    assert final.finished_at is not None and queued.queued_at is not None
    assert final.finished_at - queued.queued_at >= timedelta(seconds=1)
    assert final.started_at is None
    # A run that starts in time is not expired by its ttl later.
    await client.queues.resume("serial")
    ok = await client.tasks.trigger("serial-work", {"label": "x", "seconds": 1.5}, ttl="1s")
    assert (await _final(client, ok.id)).status is RunStatus.COMPLETED


async def test_ttl_counts_from_the_end_of_the_delay(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("echo", 1, delay="1s", ttl="1s")
    assert (await _final(client, handle.id)).status is RunStatus.COMPLETED


async def test_idempotency_key_returns_the_same_run_until_it_fails_or_expires(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    first = await client.tasks.trigger("echo", {"n": 1}, idempotency_key="welcome-42")
    again = await client.tasks.trigger("echo", {"n": 2}, idempotency_key="welcome-42")
    assert again.id == first.id and again.is_cached and not first.is_cached
    await _final(client, first.id)
    done = await client.tasks.trigger("echo", {"n": 3}, idempotency_key="welcome-42")
    assert done.id == first.id and done.is_cached  # a COMPLETED run keeps its key

    failed = await client.tasks.trigger("always-fails", 1, idempotency_key="k")
    assert (await _final(client, failed.id)).status is RunStatus.FAILED
    retried = await client.tasks.trigger("always-fails", 1, idempotency_key="k")
    assert retried.id != failed.id and not retried.is_cached  # a failed run released it

    short = await client.tasks.trigger("echo", 1, idempotency_key="short", idempotency_key_ttl=1)
    assert (await client.tasks.trigger("echo", 1, idempotency_key="short")).id == short.id
    await asyncio.sleep(1.1)
    assert (await client.tasks.trigger("echo", 1, idempotency_key="short")).id != short.id


async def test_idempotency_key_reset_releases_it(cluster: Cluster) -> None:
    client = cluster.client()
    first = await client.tasks.trigger("echo", 1, idempotency_key="once")
    await _final(client, first.id)
    assert await client.idempotency_keys.reset("echo", "once") == 1
    second = await client.tasks.trigger("echo", 1, idempotency_key="once")
    assert second.id != first.id and not second.is_cached


async def test_a_batch_of_1000_creates_1000_runs_in_item_order(cluster: Cluster) -> None:
    client = cluster.client()
    started = time.monotonic()
    batch = await client.tasks.batch_trigger(
        "echo", [{"payload": i, "options": {"tags": [f"i{i % 7}"]}} for i in range(1000)]
    )
    print(f"1,000-item batch accepted in {time.monotonic() - started:.2f} s")
    assert batch.batch_id.startswith("batch_") and batch.run_count == 1000
    assert [h.run.payload for h in batch.runs if h.run] == list(range(1000))
    assert len({h.id for h in batch.runs}) == 1000
    listed = [r async for r in client.runs.list(batch=batch.batch_id, page_size=100)]
    assert len(listed) == 1000
    assert [r.payload for r in reversed(listed)] == list(range(1000))  # newest first

    async def done() -> runplane.Batch | None:
        b = await client.batch.retrieve(batch.batch_id)
        return b if b.status is not runplane.BatchStatus.PROCESSING else None

    retrieved = await eventually(done, 120, interval=0.2)
    assert retrieved.status is runplane.BatchStatus.COMPLETED
    assert retrieved.runs == [h.id for h in batch.runs]


async def test_a_batch_with_one_bad_item_creates_nothing(cluster: Cluster) -> None:
    client = cluster.client()
    items = [{"id": "echo", "payload": i} for i in range(10)]
    items[7]["options"] = {"machine": "huge-9x"}
    with pytest.raises(InvalidArgumentError) as info:
        await client.batch.trigger(items)
    assert info.value.field == "items[7].options.machine"
    assert [r async for r in client.runs.list(task="echo")] == []
    # Across tasks, with per-item options, by task id.
    mixed = await client.batch.trigger(
        [
            {"id": "echo", "payload": "a", "options": {"priority": 5}},
            {"id": "serial-work", "payload": {"label": "b", "seconds": 0}},
        ]
    )
    assert [h.run.task_id for h in mixed.runs if h.run] == ["echo", "serial-work"]
    for h in mixed.runs:
        assert (await _final(client, h.id)).status is RunStatus.COMPLETED


async def test_replay_makes_a_new_run_with_the_same_payload(cluster: Cluster) -> None:
    client = cluster.client()
    original = await client.tasks.trigger("echo", {"v": 7}, tags=["t1"])
    await _final(client, original.id)
    replay = await client.runs.replay(original.id)
    final = await _final(client, replay.id)
    assert replay.id != original.id
    assert final.payload == {"v": 7} and final.tags == ["t1"]
    assert final.replayed_from_run_id == original.id and final.is_replay
    assert final.output["is_replay"] is True


async def test_cancel_also_cancels_children_in_progress(cluster: Cluster, tmp_path: Path) -> None:
    client = cluster.client()
    child_file = tmp_path / "child"
    parent = await client.tasks.trigger("parent-of-sleeper", {"child_file": str(child_file)})
    child_id = await eventually(lambda: child_file.exists() and child_file.read_text(), 60)
    child = await client.runs.retrieve(child_id)
    assert child.parent_run_id == parent.id and child.root_run_id == parent.id
    assert child.depth == 1
    await eventually(lambda: _status_is(client, child_id, RunStatus.EXECUTING), 60)
    cancelled = await client.runs.cancel(parent.id)
    assert cancelled.status is RunStatus.CANCELED
    assert (await client.runs.retrieve(child_id)).status is RunStatus.CANCELED


async def _status_is(client: runplane.Client, run_id: str, status: RunStatus) -> bool:
    return (await client.runs.retrieve(run_id)).status is status


async def test_unknown_queue_and_machine_are_refused_with_nothing_written(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    with pytest.raises(InvalidArgumentError) as info:
        await client.tasks.trigger("echo", 1, queue="nowhere")
    assert info.value.field == "options.queue" and "nowhere" in str(info.value)
    with pytest.raises(InvalidArgumentError) as info:
        await client.tasks.trigger("echo", 1, machine="huge-9x")
    assert info.value.field == "options.machine"
    with pytest.raises(InvalidArgumentError) as info:
        await client.tasks.trigger("echo", "x" * (3 * 1024 * 1024 + 1))
    assert info.value.field == "payload" and "3145728" in str(info.value)
    assert [r async for r in client.runs.list(task="echo")] == []
    # Named, defined queue: accepted.
    handle = await client.tasks.trigger("echo", 1, queue="limited")
    assert (await _final(client, handle.id)).queue == "limited"


async def _cli(cluster: Cluster, *argv: str) -> tuple[int, str, str]:
    env = {**cluster.env, "RUNPLANE_SECRET_KEY": cluster.keys["dev"]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runplane_cli", *argv,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_queues_ls_pause_resume_and_runs_replay(cluster: Cluster) -> None:
    code, out, _ = await _cli(cluster, "queues", "pause", "serial")
    assert code == 0 and "serial paused" in out
    code, out, _ = await _cli(cluster, "queues", "ls")
    assert code == 0
    line = next(row for row in out.splitlines() if row.startswith("serial "))
    assert line.split()[-1] == "paused" and line.split()[-2] == "1"
    code, out, _ = await _cli(cluster, "queues", "resume", "serial")
    assert code == 0 and "serial resumed" in out
    code, _, err = await _cli(cluster, "queues", "pause", "nope")
    assert code != 0 and err.count("\n") == 1 and "queue nope not found" in err

    client = cluster.client()
    original = await client.tasks.trigger("echo", {"v": 1})
    code, out, _ = await _cli(cluster, "runs", "replay", original.id)
    assert code == 0 and out.strip().startswith("run_")
    assert (await _final(client, out.strip())).replayed_from_run_id == original.id


async def test_task_ttl_applies_when_the_trigger_sets_none(cluster: Cluster) -> None:
    client = cluster.client()
    await client.queues.pause("serial")
    handle = await client.tasks.trigger("short-lived", 1)
    final = await _final(client, handle.id)
    assert final.status is RunStatus.EXPIRED and final.ttl == 1.0
    kept = await client.tasks.trigger("short-lived", 2, ttl=0)  # 0 opts out
    await asyncio.sleep(1.5)
    assert (await client.runs.retrieve(kept.id)).status is RunStatus.QUEUED
    await client.queues.resume("serial")
    assert (await _final(client, kept.id)).status is RunStatus.COMPLETED


async def test_debounce_collapses_triggers_into_one_run(cluster: Cluster) -> None:
    client = cluster.client()
    trailing = [
        await client.tasks.trigger(
            "debounced", {"n": i}, debounce={"key": "u1", "delay": "1s", "mode": "trailing"}
        )
        for i in range(5)
    ]
    assert len({h.id for h in trailing}) == 1
    assert [h.is_cached for h in trailing] == [False, True, True, True, True]
    leading = [
        await client.tasks.trigger("debounced", {"n": i}, debounce={"key": "u2", "delay": "1s"})
        for i in range(5)
    ]
    assert len({h.id for h in leading}) == 1
    assert (await _final(client, trailing[0].id)).output == {"n": 4}
    assert (await _final(client, leading[0].id)).output == {"n": 0}
    # Once the run has left DELAYED, the key makes a new run.
    later = await client.tasks.trigger("debounced", 9, debounce={"key": "u1", "delay": "1s"})
    assert later.id != trailing[0].id


async def test_debounce_max_delay_forces_a_run(cluster: Cluster) -> None:
    client = cluster.client()
    options = {"key": "busy", "delay": "1s", "max_delay": "2s", "mode": "trailing"}
    ids = []
    started = time.monotonic()
    while time.monotonic() - started < 3.5:  # a trigger every 0.3 s never lets the delay pass
        ids.append((await client.tasks.trigger("debounced", len(ids), debounce=options)).id)
        await asyncio.sleep(0.3)
    first = ids[0]
    assert len(set(ids)) >= 2  # max_delay made the first one run and started a new run
    run = await _final(client, first)
    assert run.status is RunStatus.COMPLETED
    assert run.started_at is not None and run.created_at is not None
    assert run.started_at - run.created_at < timedelta(seconds=3.5)


async def test_rate_limit_is_never_exceeded_over_several_periods(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.client()
    starts_file = tmp_path / "starts.txt"
    handles = [
        await client.tasks.trigger("rated-work", {"file": str(starts_file)}) for _ in range(8)
    ]
    for h in handles:
        assert (await _final(client, h.id)).status is RunStatus.COMPLETED
    starts = sorted(float(x) for x in starts_file.read_text().split())
    # 2 per second: 8 runs span at least 3 periods. Start times are taken inside the tasks, a
    # little after dispatch, so windows are checked 0.25 s shorter than the period.
    assert starts[-1] - starts[0] >= 2.75, starts
    for t in starts:
        assert sum(1 for u in starts if t <= u < t + 0.75) <= 2, starts


async def test_total_concurrency_limit_caps_all_keys_together(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.client()
    counts = tmp_path / "capped.json"
    handles = [
        await client.tasks.trigger(
            "capped-work", {"file": str(counts), "key": k, "seconds": 0.4}, concurrency_key=k
        )
        for k in ("a", "b", "c", "d")
        for _ in range(3)
    ]
    for h in handles:
        assert (await _final(client, h.id)).status is RunStatus.COMPLETED
    seen = _counts(counts)
    assert seen["max:*"] == 3, seen  # the total cap, reached and never exceeded
    assert all(seen[f"max:{k}"] <= 2 for k in "abcd"), seen


async def test_payloads_are_checked_against_the_registered_schema_at_trigger(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    with pytest.raises(InvalidArgumentError) as info:
        await client.tasks.trigger("typed-order", {"sku": "a", "quantity": "many"})
    assert info.value.field == "payload.quantity"
    with pytest.raises(InvalidArgumentError) as info:
        await client.tasks.trigger("typed-order", {"quantity": 1})
    assert info.value.field == "payload" and "sku" in str(info.value)
    with pytest.raises(InvalidArgumentError) as info:
        await client.batch.trigger(
            [
                {"id": "typed-order", "payload": {"sku": "a", "quantity": 1}},
                {"id": "typed-order", "payload": []},
            ]
        )
    assert info.value.field == "items[1].payload"
    assert [r async for r in client.runs.list(task="typed-order")] == []
    ok = await client.tasks.trigger("typed-order", {"sku": "a", "quantity": 3})
    assert (await _final(client, ok.id)).output == 3


async def test_an_output_over_the_limit_fails_the_run_without_retry(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("big-output", {"size": 200_000})
    final = await _final(client, handle.id)
    assert final.status is RunStatus.FAILED and final.attempt_count == 1
    assert final.error is not None and final.error.type == "OutputTooLargeError"
    assert "100000" in final.error.message
    ok = await client.tasks.trigger("big-output", {"size": 90_000})
    assert (await _final(client, ok.id)).status is RunStatus.COMPLETED
