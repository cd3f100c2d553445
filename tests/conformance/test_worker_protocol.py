"""The worker protocol (docs/worker-protocol.md), checked against every worker implementation:
a scripted scheduler plays each case message by message and checks what the worker answers.

Nothing here asserts how fast a worker is: every expectation waits generously, and the only
fixed pauses set up a situation (a worker disconnected long enough to buffer a result)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import orjson
import pytest

from runplane.v1 import worker_service_pb2 as wpb
from runplane_common.protocol import BATCHES, SPOKEN_WORKER_PROTOCOL_VERSIONS
from tests.helpers.cluster import ServiceProcess
from tests.helpers.conformance import ScriptedScheduler, WorkerStream, summary

pytestmark = pytest.mark.timeout(180)

TASKS = {
    "conformance-echo",
    "conformance-wait",
    "conformance-token",
    "conformance-sleep",
    "conformance-log",
}


def output(result: wpb.AttemptResult) -> Any:
    assert result.WhichOneof("outcome") == "output", f"expected an output, got {result}"
    return orjson.loads(result.output)


def ok(seq: int, data: Any = None) -> wpb.WaitResult:
    return wpb.WaitResult(seq=seq, ok=True, output=orjson.dumps(data).decode())


def position(stream: WorkerStream, message: wpb.ConnectRequest) -> int:
    return next(i for i, m in enumerate(stream.received) if m is message)


# -- registration ----------------------------------------------------------------------------------


async def test_the_first_message_registers_the_conformance_tasks(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await scheduler.registered()
    register = stream.register
    assert register is not None
    assert stream.metadata.get("authorization") == f"Bearer {scheduler.key}"
    assert register.protocol_version in (0, *SPOKEN_WORKER_PROTOCOL_VERSIONS)
    assert {t.id for t in register.manifest.tasks} >= TASKS, register.manifest
    assert register.manifest.version == "conformance-1"  # RUNPLANE_VERSION
    assert register.capacity > 0
    assert not register.running_attempt_ids
    assert not register.session_token


async def test_heartbeats_keep_coming_at_the_interval_the_scheduler_gave(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await scheduler.registered(heartbeat_interval_ms=200)
    for n in range(3):
        await stream.expect("heartbeat", what=f"Heartbeat #{n + 1} (interval 200 ms)")


# -- assignments and results -----------------------------------------------------------------------


async def test_an_assignment_is_acknowledged_and_its_output_reported(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await scheduler.registered()
    payload = {"a": [1, "two", None], "b": {"c": 3.5}}
    stream.assign("att_echo", "conformance-echo", payload)
    first = await stream.expect(("ack", "started", "result"), "att_echo")
    if first.WhichOneof("message") == "result":
        result = first.result
    else:
        result = await stream.result("att_echo")
    assert output(result) == payload
    # Acknowledged by an AssignmentAck or an AttemptStarted, or (it ended at once) by the
    # result alone, which then says when it started.
    if first.WhichOneof("message") == "result" or not stream.sent("started", "att_echo"):
        assert result.HasField("started_at"), "a result without AttemptStarted needs started_at"
    for message in stream.sent("ack", "att_echo") + stream.sent("started", "att_echo"):
        assert position(stream, message) < position(stream, stream.sent("result", "att_echo")[0])


async def test_a_running_attempt_reports_started_before_its_result(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await scheduler.registered()
    stream.assign("att_sleep", "conformance-sleep", {"seconds": 1})
    started = await stream.expect("started", "att_sleep")
    assert started.started.HasField("started_at")
    result = await stream.result("att_sleep")
    assert output(result) == {"slept": 1}
    assert position(stream, started) < position(stream, stream.sent("result", "att_sleep")[0])


async def test_logs_and_metadata_of_an_attempt_reach_the_scheduler(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await scheduler.registered()
    stream.assign("att_log", "conformance-log", {}, run_id="run_log")
    update = await stream.expect("metadata", "att_log")
    assert update.metadata.run_id == "run_log"
    ops = [(o.type, o.key, orjson.loads(o.value)) for o in update.metadata.operations]
    assert ("set", "step", 1) in ops, ops
    result = await stream.result("att_log")
    assert output(result) == "ok"
    assert position(stream, update) < position(stream, stream.sent("result", "att_log")[0]), (
        "an attempt's metadata must reach the scheduler before its result"
    )

    def hello(message: wpb.ConnectRequest) -> bool:
        return any(
            e.message == "hello" and e.attempt_id == "att_log" and e.run_id == "run_log"
            for e in message.logs.entries
        )

    logs = await stream.expect("logs", where=hello, what='LogBatch with "hello"')
    entry = next(e for e in logs.logs.entries if e.message == "hello")
    assert entry.level == "info"
    assert entry.HasField("time")


async def test_a_failed_wait_fails_the_attempt_with_an_error(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await scheduler.registered()
    stream.assign("att_timeout", "conformance-token", {"token_id": "tok_1"})
    await stream.wait_request("att_timeout", seq=1)
    timed_out = wpb.WaitResult(seq=1, ok=False)
    timed_out.error.type, timed_out.error.message = "WaitpointTimeoutError", "the token timed out"
    stream.resume("att_timeout", timed_out)
    result = await stream.result("att_timeout")
    assert result.WhichOneof("outcome") == "error", result
    assert result.error.message, result
    assert not (result.canceled or result.lost), result


# -- waits, the journal and replay -----------------------------------------------------------------


async def test_a_wait_is_numbered_from_1_and_the_resume_ends_it(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await scheduler.registered()
    stream.assign("att_wait", "conformance-wait", {"seconds": 2})
    wait = await stream.wait_request("att_wait", seq=1)
    assert wait.WhichOneof("wait") == "duration_ms"
    assert wait.duration_ms == 2000
    stream.resume("att_wait", ok(1))
    assert output(await stream.result("att_wait")) == {"waited": 2}
    assert len(stream.sent("wait", "att_wait")) == 1


async def test_a_replay_finds_its_journaled_wait_and_goes_on(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    """The run's attempt was lost while it waited; a fresh attempt of the same run (same attempt
    number) runs the task from the top, and its wait, journaled, is answered at once."""
    stream = await scheduler.registered()
    stream.assign("att_first", "conformance-token", {"token_id": "tok_r"}, run_id="run_r")
    await stream.wait_request("att_first", seq=1)
    stream.resume("att_unknown_replay", ok(1))  # not this worker's: reported lost
    lost = await stream.result("att_unknown_replay")
    assert lost.lost, lost
    stream.assign("att_replay", "conformance-token", {"token_id": "tok_r"}, run_id="run_r")
    wait = await stream.wait_request("att_replay", seq=1)
    assert wait.token_id == "tok_r"
    stream.resume("att_replay", ok(1, {"approved": True}))
    assert output(await stream.result("att_replay")) == {"token": {"approved": True}}


async def test_results_it_already_has_are_ignored(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await scheduler.registered()
    stream.assign("att_twice", "conformance-token", {"token_id": "tok_t"})
    await stream.wait_request("att_twice", seq=1)
    stream.resume("att_twice", ok(1, "first"))
    stream.resume("att_twice", ok(1, "second"))
    assert output(await stream.result("att_twice")) == {"token": "first"}
    # A barrier: an attempt assigned after both Resumes reports after the worker took them in.
    stream.assign("att_after", "conformance-sleep", {"seconds": 0.5})
    await stream.result("att_after")
    results = stream.sent("result", "att_twice")
    assert all(r.result.lost for r in results[1:]), [summary(r) for r in results]


async def test_a_resume_for_an_attempt_it_does_not_have_is_reported_lost(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await scheduler.registered()
    stream.resume("att_nobody", ok(1))
    result = await stream.result("att_nobody")
    assert result.lost, result


# -- duplicates, cancels, reconnects ---------------------------------------------------------------


async def test_a_duplicate_assignment_of_a_running_attempt_is_not_run_twice(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await scheduler.registered()
    assignment = stream.assign("att_dup", "conformance-sleep", {"seconds": 1})
    await stream.expect("started", "att_dup")
    stream.send(wpb.ConnectResponse(assignment=assignment))
    assert output(await stream.result("att_dup")) == {"slept": 1}
    # A barrier: the same task assigned after the duplicate ends after a second run of it would.
    stream.assign("att_barrier", "conformance-sleep", {"seconds": 1})
    await stream.result("att_barrier")
    assert len(stream.sent("result", "att_dup")) == 1, "the duplicate assignment ran again"
    assert len(stream.sent("started", "att_dup")) == 1, "the duplicate assignment ran again"


async def test_cancel_of_a_running_attempt_reports_it_canceled(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await scheduler.registered()
    stream.assign("att_cancel", "conformance-sleep", {"seconds": 600})
    await stream.expect("started", "att_cancel")
    stream.cancel("att_cancel")
    result = await stream.result("att_cancel")
    assert result.canceled, result


async def test_cancel_during_a_wait_reports_it_canceled(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await scheduler.registered()
    stream.assign("att_wait_cancel", "conformance-token", {"token_id": "tok_c"})
    await stream.wait_request("att_wait_cancel", seq=1)
    stream.cancel("att_wait_cancel")
    result = await stream.result("att_wait_cancel")
    assert result.canceled, result
    assert result.WhichOneof("outcome") != "output", result


async def test_a_waiting_attempt_resumes_after_a_reconnect(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    first = await scheduler.registered(session_token="token-1")
    assert first.register is not None
    stream_id = first.register.executor_id
    first.assign("att_resume", "conformance-token", {"token_id": "tok_x"})
    await first.wait_request("att_resume", seq=1)
    first.drop()
    second = await scheduler.connection()
    register = second.register
    assert register is not None
    assert register.executor_id == (stream_id or "exec_conformance")
    assert register.session_token == "token-1"
    assert "att_resume" in register.running_attempt_ids, register
    second.registered(session_token="token-2")
    second.resume("att_resume", ok(1, {"v": 1}))
    assert output(await second.result("att_resume")) == {"token": {"v": 1}}


async def test_a_result_produced_while_disconnected_is_sent_after_the_reconnect(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    first = await scheduler.registered()
    first.assign("att_buffered", "conformance-sleep", {"seconds": 1})
    await first.expect("started", "att_buffered")
    first.drop()
    second = await scheduler.connection()
    assert second.register is not None
    assert "att_buffered" in second.register.running_attempt_ids, second.register
    # Not answered for a while, so the result is (most likely) produced before the worker is
    # registered again; it must come either way.
    await asyncio.sleep(2)
    second.registered()
    assert output(await second.result("att_buffered")) == {"slept": 1}


async def test_a_claimed_attempt_the_scheduler_no_longer_holds_is_cancelled(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    """A lost lease: the worker claims its attempt on reconnect, the scheduler has given it up
    and answers CancelAttempt."""
    first = await scheduler.registered()
    first.assign("att_lapsed", "conformance-sleep", {"seconds": 600})
    await first.expect("started", "att_lapsed")
    first.drop()
    second = await scheduler.connection()
    assert second.register is not None
    assert "att_lapsed" in second.register.running_attempt_ids, second.register
    second.registered()
    second.cancel("att_lapsed")
    result = await second.result("att_lapsed")
    assert result.canceled, result


async def test_a_refused_registration_is_retried_as_the_same_executor(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    first = await scheduler.registered(session_token="token-1")
    assert first.register is not None
    first.drop()
    refused = await scheduler.connection()
    assert refused.register is not None
    refused.refuse(grpc.StatusCode.ALREADY_EXISTS, "executor id held by another connection")
    again = await scheduler.connection()
    assert again.register is not None
    assert again.register.executor_id == refused.register.executor_id
    assert again.register.session_token == "token-1"
    again.registered()
    again.assign("att_after_refusal", "conformance-echo", "still here")
    assert output(await again.result("att_after_refusal")) == "still here"


# -- protocol version 2: batches -------------------------------------------------------------------


async def _speaks_batches(scheduler: ScriptedScheduler) -> WorkerStream:
    stream = await scheduler.connection()
    assert stream.register is not None
    if (stream.register.protocol_version or 1) < BATCHES:
        pytest.skip("this worker speaks worker protocol version 1, which has no batches")
    return stream


async def test_a_batch_from_the_scheduler_is_taken_in_order(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await _speaks_batches(scheduler)
    stream.registered(protocol_version=BATCHES)
    one = stream.assign("att_b1", "conformance-echo", {"n": 1}, send=False)
    two = stream.assign("att_b2", "conformance-echo", {"n": 2}, send=False)
    long = stream.assign("att_b3", "conformance-sleep", {"seconds": 60}, send=False)
    stream.batch(*(wpb.ConnectResponse(assignment=a) for a in (one, two, long)))
    assert output(await stream.result("att_b1")) == {"n": 1}
    assert output(await stream.result("att_b2")) == {"n": 2}
    await stream.expect("started", "att_b3")
    cancel = wpb.CancelAttempt(attempt_id="att_b3", run_id="run_att_b3")
    echo = stream.assign("att_b4", "conformance-echo", "after", send=False)
    stream.batch(wpb.ConnectResponse(cancel=cancel), wpb.ConnectResponse(assignment=echo))
    assert (await stream.result("att_b3")).canceled
    assert output(await stream.result("att_b4")) == "after"


async def test_a_version_1_answer_gets_no_batches(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    stream = await _speaks_batches(scheduler)
    stream.registered(protocol_version=1)  # a scheduler that speaks only version 1
    for n in range(20):
        stream.assign(f"att_v1_{n}", "conformance-echo", n)
    for n in range(20):
        assert output(await stream.result(f"att_v1_{n}")) == n
    assert stream.batches == 0


async def test_a_scheduler_refusing_version_2_is_asked_again_with_version_1(
    scheduler: ScriptedScheduler, worker: ServiceProcess
) -> None:
    refused = await _speaks_batches(scheduler)
    refused.refuse(
        grpc.StatusCode.FAILED_PRECONDITION,
        "worker protocol version 2 is not spoken by this scheduler (it speaks 1; "
        "docs/worker-protocol.md)",
    )
    again = await scheduler.registered()
    assert again.register is not None
    assert again.register.protocol_version == 1
    again.assign("att_downgraded", "conformance-echo", "v1")
    assert output(await again.result("att_downgraded")) == "v1"
