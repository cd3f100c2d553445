"""The task-process side of waits: sequence numbers in call order (what a replay matches the
journal by) and resumes that resolve exactly the waits they are for."""

from __future__ import annotations

import asyncio
from typing import Any

from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import worker_service_pb2 as wpb
from runplane.worker import AttemptWaiter
from runplane_executor.waits import resume_results, wait_request


async def test_waits_take_sequence_numbers_in_call_order_also_under_gather() -> None:
    sent: list[tuple[Any, ...]] = []
    waiter = AttemptWaiter("attempt_1", sent.append)
    gathered = asyncio.gather(
        waiter.wait({"duration_ms": 10}),
        waiter.wait({"token_id": "waitpoint_a"}),
        waiter.wait({"until_ms": 5}),
    )
    await asyncio.sleep(0)
    assert [(m[0], m[1], m[2]) for m in sent] == [
        ("wait", "attempt_1", 1),
        ("wait", "attempt_1", 2),
        ("wait", "attempt_1", 3),
    ]
    # A resume carries every completed wait of the run; each resolves its own future.
    waiter.resume([(2, False, "", {"type": "WaitpointTimeoutError", "message": "late"})])
    waiter.resume([(1, True, "null", None), (2, True, "ignored", None), (3, True, "7", None)])
    assert await gathered == [
        (True, "null", None),
        (False, "", {"type": "WaitpointTimeoutError", "message": "late"}),
        (True, "7", None),
    ]


async def test_a_replay_numbers_its_waits_like_the_first_run() -> None:
    """A fresh attempt (a replay) starts counting at 1 again, so its waits meet the journal."""
    first: list[tuple[Any, ...]] = []
    replay: list[tuple[Any, ...]] = []
    for sent in (first, replay):
        waiter = AttemptWaiter("attempt_x", sent.append)
        task = asyncio.ensure_future(waiter.wait({"duration_ms": 1}))
        await asyncio.sleep(0)
        waiter.resume([(1, True, "null", None)])
        await task
        task = asyncio.ensure_future(waiter.wait({"token_id": "waitpoint_b"}))
        await asyncio.sleep(0)
        waiter.resume([(1, True, "null", None), (2, True, '"go"', None)])
        assert await task == (True, '"go"', None)
    assert [m[2:] for m in first] == [m[2:] for m in replay]


def test_wait_requests_and_resumes_cross_the_stream_intact() -> None:
    item = rpb.BatchTriggerItem(task_id="child", payload='{"n": 1}')
    request = wait_request("attempt_1", 4, {"children": [item.SerializeToString()]})
    assert request.seq == 4 and request.WhichOneof("wait") == "children"
    assert request.children.items[0] == item
    assert wait_request("attempt_1", 1, {"until_ms": 99}).until_ms == 99
    resume = wpb.Resume(
        attempt_id="attempt_1",
        results=[
            wpb.WaitResult(seq=1, ok=True, output="3"),
            wpb.WaitResult(seq=2, ok=False, error={"type": "E", "message": "m"}),
        ],
    )
    assert resume_results(resume) == [
        (1, True, "3", None),
        (2, False, "", {"type": "E", "message": "m", "stack_trace": ""}),
    ]
