"""RunService's contract under bad input: random and malformed values for every field of every RPC.

TriggerRun and BatchTriggerRuns (with every option: debounce, delays, TTLs, parents, machines),
GetRun, CancelRun, ListRuns, GetBatch, ReplayRun, RescheduleRun, ResetIdempotencyKey,
UpdateRunMetadata, AddRunTags, ListRunLogs and GetRunTimeline, called over real gRPC
(``tests.helpers.contract``). Every answer must be proper (never UNKNOWN, INTERNAL or a hang), a
refusal must name the field at fault and leave the database exactly as it was (no run, batch,
timer or event row), and a valid request must be accepted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import queue
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from runplane.v1 import realtime_service_pb2, run_pb2
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import worker_service_pb2 as wpb
from runplane_common.grpcserver import MAX_MESSAGE_BYTES
from runplane_scheduler.store import tables as db
from tests.helpers.contract import (
    CONNECT,
    FAILED_PRECONDITION,
    FUZZ,
    INVALID,
    KEYS,
    LIMITS,
    NOT_FOUND,
    OK,
    RUN,
    SUBSCRIBE,
    UNAUTHENTICATED,
    Stack,
    assert_proper,
    assert_refused,
    assert_unchanged,
    other_env,
    some_runs,
    streaming,
    unary,
)
from tests.helpers.inputs import (
    BATCH_ID,
    MAX_TS,
    MIN_TS,
    RUN_ID,
    TASK_ID,
    TEN_YEARS_MS,
    all_finite,
    any_durations,
    any_timestamps,
    auths,
    decoded,
    duration_ms,
    id_like,
    int32,
    int64,
    json_texts,
    json_values,
    millis,
    page_tokens,
    resolve_run,
    run_ids,
    stamp,
    task_id_ok,
    texts,
    timestamp_ok,
    trigger_requests,
    valid_trigger_requests,
)
from tests.helpers.wait import eventually
from tests.helpers.worlds import (
    KEY,
    KEYED_TASK,
    RunWorld,
    ScheduleWorld,
    stable,
)

pytestmark = pytest.mark.timeout(600)

MACHINES = ["micro", "small-1x", "small-2x", "medium-1x", "medium-2x", "large-1x", "large-2x"]


def _bad_metadata() -> st.SearchStrategy[str]:
    not_json = st.sampled_from(["{", "{'a': 1}", "nope", "[1,]", "NaN", '{"a": 1e400}'])
    not_object = st.sampled_from(["[]", "1", '"x"', "null", "true", "[{}]"])
    return st.one_of(not_json, not_object)


# Per field: (a definitely invalid value's strategy, how to set it, the field the error must name).
BREAKERS: dict[str, tuple[st.SearchStrategy[Any], Callable[[rpb.TriggerRunRequest, Any], None]]]
BREAKERS = {
    "task_id": (
        st.one_of(
            st.just(""),
            st.just("a" * 129),
            st.just("nosuch-task-#!"),
            st.text(min_size=1, max_size=20).filter(lambda s: not s[0].isascii()),
            st.from_regex(r"\A[_.:/-][A-Za-z0-9]{0,5}\Z"),
        ),
        lambda r, v: setattr(r, "task_id", v),
    ),
    "payload": (
        st.sampled_from(
            ["{bad", "{'a': 1}", "undefined", "[1,]", '"unterminated', "1e400", "\x00"]
        ),
        lambda r, v: setattr(r, "payload", v),
    ),
    "options.metadata": (_bad_metadata(), lambda r, v: setattr(r.options, "metadata", v)),
    "options.tags": (
        st.one_of(
            st.lists(task_id_ok, min_size=LIMITS.tags + 1, max_size=LIMITS.tags + 5),
            st.just([""]),
            st.just(["t" * (LIMITS.tag_length + 1)]),
        ),
        lambda r, v: _set_tags(r, v),
    ),
    "options.max_attempts": (
        st.one_of(st.integers(-(2**31), -1), st.integers(251, 2**31 - 1)),
        lambda r, v: setattr(r.options, "max_attempts", v),
    ),
    "options.idempotency_key": (
        st.integers(LIMITS.idempotency_key_length + 1, LIMITS.idempotency_key_length + 50).map(
            lambda n: "i" * n
        ),
        lambda r, v: setattr(r.options, "idempotency_key", v),
    ),
    "options.priority": (
        st.integers(-(2**31), -1),
        lambda r, v: setattr(r.options, "priority", v),
    ),
    "options.concurrency_key": (
        st.integers(257, 400).map(lambda n: "c" * n),
        lambda r, v: setattr(r.options, "concurrency_key", v),
    ),
    "options.queue": (
        # Malformed names, and well-formed ones no registered task defines.
        st.one_of(st.sampled_from(["bad queue", "#", "-x", "q" * 129, "ü"]), task_id_ok),
        lambda r, v: setattr(r.options, "queue", v),
    ),
    "options.delay": (
        st.integers(-(10**9), -1),
        lambda r, v: r.options.delay.FromSeconds(v),
    ),
    "options.ttl": (
        # Negative, or under the 1 s minimum (0 is valid: no ttl).
        st.one_of(st.integers(-(10**9), -1).map(lambda n: n * 1000), st.integers(1, 999)),
        lambda r, v: r.options.ttl.FromMilliseconds(v),
    ),
    "options.idempotency_key_ttl": (
        st.integers(-(10**6), 999),
        lambda r, v: r.options.idempotency_key_ttl.FromMilliseconds(v),
    ),
    "options.max_duration": (
        st.integers(10 * 3650 * 86400 + 1, 10**12),
        lambda r, v: r.options.max_duration.FromSeconds(v),
    ),
    "options.machine": (
        st.sampled_from(["huge", "small", "Small-1x", "large-3x", "micro "]),
        lambda r, v: setattr(r.options, "machine", v),
    ),
    "options.parent_run_id": (
        st.sampled_from(["run_", "nope", "batch_123", "run_ABC", "run_" + "x" * 40]),
        lambda r, v: setattr(r.options, "parent_run_id", v),
    ),
}


def _set_tags(request: rpb.TriggerRunRequest, tags: list[str]) -> None:
    request.options.ClearField("tags")
    request.options.tags.extend(tags)


def _same_json(sent: str, stored: str) -> bool:
    return bool(json.loads(sent or "null") == json.loads(stored))


# -- RunService.TriggerRun -------------------------------------------------------------------------


@given(request=trigger_requests(), who=auths)
@FUZZ
def test_trigger_run_with_random_fields_answers_properly(
    stack: Stack, request: rpb.TriggerRunRequest, who: str
) -> None:
    channel = stack.channel()
    before = stack.state()
    outcome = unary(channel, RUN + "TriggerRun", request, stack.auth(who), rpb.TriggerRunResponse)
    assert_proper(outcome, f"TriggerRun({request!r})")
    after = stack.state()
    if outcome.code is not OK:
        assert_unchanged(before, after, f"TriggerRun refused with {outcome}")
        return
    assert who in ("dev", "prod"), f"a trigger with key {who!r} was accepted"
    response: rpb.TriggerRunResponse = outcome.responses[0]
    if response.is_cached:
        assert after["runs"] == before["runs"]
        assert response.run.idempotency_key == request.options.idempotency_key
        return
    assert after["runs"] == before["runs"] + 1
    assert after["outbox"] == before["outbox"] + 1  # its "created" event, in the same commit
    run = response.run
    assert run.task_id == request.task_id
    assert _same_json(request.payload, run.payload)
    assert list(run.tags) == list(request.options.tags)
    assert run.version == 1
    assert run.status == run_pb2.RUN_STATUS_PENDING_VERSION  # no executor provides any task
    # It belongs to the key's environment only.
    other = "prod" if who == "dev" else "dev"
    mine = unary(channel, RUN + "GetRun", rpb.GetRunRequest(run_id=run.id), stack.auth(who))
    theirs = unary(channel, RUN + "GetRun", rpb.GetRunRequest(run_id=run.id), stack.auth(other))
    assert mine.code is OK, str(mine)
    assert theirs.code is grpc.StatusCode.NOT_FOUND, str(theirs)


@given(base=valid_trigger_requests(), data=st.data())
@FUZZ
def test_trigger_run_with_one_bad_field_is_refused_naming_that_field(
    stack: Stack, base: rpb.TriggerRunRequest, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(BREAKERS)), label="field")
    strategy, apply = BREAKERS[name]
    value = data.draw(strategy, label="value")
    request = rpb.TriggerRunRequest()
    request.CopyFrom(base)
    apply(request, value)
    before = stack.state()
    outcome = unary(stack.channel(), RUN + "TriggerRun", request, stack.auth("dev"))
    assert_proper(outcome, f"TriggerRun with bad {name}")
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, f"bad {name}={value!r}: {outcome}"
    assert outcome.violations[0][0].startswith(name), f"bad {name}, but it named {outcome}"
    assert_unchanged(before, stack.state(), f"TriggerRun with bad {name}")


@given(request=valid_trigger_requests())
@FUZZ
def test_a_valid_trigger_is_accepted(stack: Stack, request: rpb.TriggerRunRequest) -> None:
    """The other side of the property above: the 'valid' generator really is valid, so the
    refusals there come from the one broken field."""
    outcome = unary(
        stack.channel(), RUN + "TriggerRun", request, stack.auth("dev"), rpb.TriggerRunResponse
    )
    assert outcome.code is OK, f"TriggerRun({request!r}): {outcome}"


def test_a_task_no_version_registered_is_refused_naming_the_known_tasks(stack: Stack) -> None:
    """A typo in a task id (or the wrong environment's key) is INVALID_ARGUMENT at once, with
    the tasks the environment knows, not a run that waits forever; nothing is written."""
    before = stack.state()
    outcome = unary(
        stack.channel(),
        RUN + "TriggerRun",
        rpb.TriggerRunRequest(task_id="t-typo"),
        stack.auth("dev"),
        rpb.TriggerRunResponse,
    )
    assert_refused(outcome, {"task_id"}, "TriggerRun(t-typo)")
    assert "unknown task 't-typo'" in outcome.details and "known tasks: 't'" in outcome.details
    items = [rpb.BatchTriggerItem(task_id="t"), rpb.BatchTriggerItem(task_id="t-typo")]
    outcome = unary(
        stack.channel(),
        RUN + "BatchTriggerRuns",
        rpb.BatchTriggerRunsRequest(items=items),
        stack.auth("dev"),
        rpb.BatchTriggerRunsResponse,
    )
    assert_refused(outcome, {"items[1].task_id"}, "BatchTriggerRuns([t, t-typo])")
    assert_unchanged(before, stack.state(), "refused triggers of an unknown task")


# -- RunService.GetRun, CancelRun, ListRuns --------------------------------------------------------


@given(data=st.data())
@FUZZ
def test_get_and_cancel_run_with_random_ids_answer_properly(
    stack: Stack, data: st.DataObject
) -> None:
    ids = some_runs(stack)
    channel = stack.channel()
    method = data.draw(st.sampled_from(["GetRun", "CancelRun"]), label="method")
    run_id = resolve_run(data.draw(run_ids, label="run_id"), ids)
    who = data.draw(auths, label="who")
    request_type = rpb.GetRunRequest if method == "GetRun" else rpb.CancelRunRequest
    before = stack.state()
    outcome = unary(channel, RUN + method, request_type(run_id=run_id), stack.auth(who))
    assert_proper(outcome, f"{method}({run_id!r}) as {who!r}")
    owner = next((name for name, i in ids.items() if i == run_id), None)
    env_of = {"dev": "dev", "dev-canceled": "dev", "prod": "prod"}
    if outcome.code is OK:
        assert owner is not None and env_of[owner] == who, f"{run_id!r} was visible to {who!r}"
    else:
        assert_unchanged(before, stack.state(), f"{method} refused with {outcome}")
        if owner is not None and who in ("dev", "prod") and env_of[owner] != who:
            assert outcome.code is grpc.StatusCode.NOT_FOUND, str(outcome)
    if method == "GetRun":
        assert_unchanged(before, stack.state(), "GetRun")


def _timestamps() -> st.SearchStrategy[Timestamp | None]:
    return st.one_of(
        st.none(),
        st.builds(
            Timestamp,
            seconds=st.integers(-62135596800, 253402300799),
            nanos=st.integers(0, 999_999_999),
        ),
        st.builds(Timestamp, seconds=int64, nanos=int32),
    )


# Each field is often valid, so that the later checks are reached too.
@given(
    statuses=st.lists(
        st.one_of(st.sampled_from(list(run_pb2.RunStatus.values())), int32), max_size=3
    )
    | st.just([]),
    task_ids=st.lists(st.one_of(task_id_ok, texts), max_size=3) | st.just([]),
    tags=st.lists(texts, max_size=3),
    after=_timestamps(),
    before_ts=_timestamps(),
    page_size=st.one_of(st.integers(0, 120), st.integers(0, 100), int32),
    page_token=st.one_of(
        st.just(""),
        texts,
        st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()),
        texts.map(lambda t: base64.urlsafe_b64encode(("run_" + t).encode()).decode()),
    ),
    who=auths,
)
@settings(FUZZ, max_examples=150)
def test_list_runs_with_random_filters_answers_properly(
    stack: Stack,
    statuses: list[int],
    task_ids: list[str],
    tags: list[str],
    after: Timestamp | None,
    before_ts: Timestamp | None,
    page_size: int,
    page_token: str,
    who: str,
) -> None:
    ids = some_runs(stack)
    request = rpb.ListRunsRequest(
        task_ids=task_ids, tags=tags, page_size=page_size, page_token=page_token
    )
    request.statuses.extend(run_pb2.RunStatus.ValueType(s) for s in statuses)  # any int32
    if after is not None:
        request.created_after.CopyFrom(after)
    if before_ts is not None:
        request.created_before.CopyFrom(before_ts)
    before = stack.state()
    outcome = unary(
        stack.channel(), RUN + "ListRuns", request, stack.auth(who), rpb.ListRunsResponse
    )
    assert_proper(outcome, f"ListRuns({request!r})")
    assert_unchanged(before, stack.state(), "ListRuns")
    if outcome.code is OK:
        response: rpb.ListRunsResponse = outcome.responses[0]
        assert len(response.runs) <= (page_size or 25)
        visible = {ids["dev"], ids["dev-canceled"]}
        if who == "dev":
            assert {r.id for r in response.runs} <= visible
        else:
            assert not {r.id for r in response.runs} & visible


# -- the payload and metadata limits ---------------------------------------------------------------


def test_a_payload_over_the_payload_limit_is_refused_naming_the_limit(stack: Stack) -> None:
    channel = stack.channel()
    before = stack.state()
    limit = LIMITS.payload_bytes
    over = json.dumps("x" * (limit - 1))  # two quotes make it limit + 1 bytes
    assert limit < len(over) < MAX_MESSAGE_BYTES
    outcome = unary(
        channel,
        RUN + "TriggerRun",
        rpb.TriggerRunRequest(task_id="t", payload=over),
        stack.auth("dev"),
    )
    assert_proper(outcome, "TriggerRun with a payload over the limit")
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, str(outcome)
    assert outcome.violations[0][0] == "payload"
    assert str(limit) in outcome.details and "limit" in outcome.details, str(outcome)
    meta = json.dumps({"m": "x" * LIMITS.metadata_bytes})
    outcome = unary(
        channel,
        RUN + "TriggerRun",
        rpb.TriggerRunRequest(task_id="t", options=rpb.TriggerOptions(metadata=meta)),
        stack.auth("dev"),
    )
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, str(outcome)
    assert outcome.violations[0][0] == "options.metadata"
    assert str(LIMITS.metadata_bytes) in outcome.details, str(outcome)
    assert_unchanged(before, stack.state(), "payloads over the limit")
    # Exactly at the limit is fine.
    at = json.dumps("x" * (limit - 2))
    assert len(at) == limit
    outcome = unary(
        channel,
        RUN + "TriggerRun",
        rpb.TriggerRunRequest(task_id="t", payload=at),
        stack.auth("dev"),
    )
    assert outcome.code is OK, str(outcome)


# -- a legal but large payload and the event relay -------------------------------------------------


def test_a_large_legal_payload_does_not_stall_the_event_relay(live_stack: Stack) -> None:
    """A payload under the 3 MB limit makes a run event bigger than NATS's default 1 MB
    max_payload; later runs' events must still reach JetStream."""
    stack = live_stack
    channel = stack.channel()
    big = unary(
        channel,
        RUN + "TriggerRun",
        rpb.TriggerRunRequest(task_id="t", payload=json.dumps("x" * (2 * 1024 * 1024))),
        stack.auth("dev"),
    )
    assert big.code is OK, str(big)
    small = unary(
        channel,
        RUN + "TriggerRun",
        rpb.TriggerRunRequest(task_id="t", payload="1"),
        stack.auth("dev"),
        rpb.TriggerRunResponse,
    )
    assert small.code is OK, str(small)
    small_id = small.responses[0].run.id
    # Its event comes through the realtime service's JetStream consumer; with the relay stalled it
    # could still come from the scheduler's snapshot, so look at the outbox too.
    first = streaming(
        stack.realtime_channel(),
        SUBSCRIBE,
        [realtime_service_pb2.SubscribeToRunRequest(run_id=small_id)],
        stack.auth("dev"),
        response_type=realtime_service_pb2.SubscribeToRunResponse,
        first_only=True,
    )
    assert first.code is OK and first.responses, str(first)

    async def outbox_drained() -> int:
        assert stack.scheduler is not None
        for _ in range(100):
            async with stack.scheduler.engine_db.connect() as conn:
                left = int(
                    (await conn.execute(select(func.count()).select_from(db.outbox))).scalar_one()
                )
            if left == 0:
                return 0
            await asyncio.sleep(0.1)
        return left

    left = stack.run(outbox_drained())
    assert left == 0, f"{left} events still in the outbox after 10 s: the relay is stuck"


# -- NUL characters and invalid timestamps: bugs these tests found, one case each ------------------


def _nul_cases() -> dict[str, tuple[str, Message]]:
    token = base64.urlsafe_b64encode(b"run_\x00").decode()
    return {
        "trigger-tag": (
            "TriggerRun",
            rpb.TriggerRunRequest(task_id="t", options=rpb.TriggerOptions(tags=["a\x00"])),
        ),
        "trigger-idempotency-key": (
            "TriggerRun",
            rpb.TriggerRunRequest(task_id="t", options=rpb.TriggerOptions(idempotency_key="\x00")),
        ),
        "trigger-concurrency-key": (
            "TriggerRun",
            rpb.TriggerRunRequest(task_id="t", options=rpb.TriggerOptions(concurrency_key="\x00")),
        ),
        "get-run": ("GetRun", rpb.GetRunRequest(run_id="run_\x00")),
        "cancel-run": ("CancelRun", rpb.CancelRunRequest(run_id="run_\x00")),
        "list-tag": ("ListRuns", rpb.ListRunsRequest(tags=["\x00"])),
        "list-page-token": ("ListRuns", rpb.ListRunsRequest(page_token=token)),
    }


@pytest.mark.parametrize("case", sorted(_nul_cases()))
def test_a_nul_character_is_refused_as_invalid_argument(stack: Stack, case: str) -> None:
    """PostgreSQL text cannot hold NUL; both databases refuse it alike, before any SQL."""
    method, message = _nul_cases()[case]
    before = stack.state()
    outcome = unary(stack.channel(), RUN + method, message, stack.auth("dev"))
    assert_proper(outcome, f"{method} with a NUL ({case})")
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, str(outcome)
    assert_unchanged(before, stack.state(), f"{method} refused")


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(2**62, 0), (-(2**62), 0), (0, -1), (0, 1_000_000_000)]
)
def test_list_runs_with_an_invalid_timestamp_is_refused_properly(
    stack: Stack, seconds: int, nanos: int
) -> None:
    request = rpb.ListRunsRequest()
    request.created_after.seconds, request.created_after.nanos = seconds, nanos
    outcome = unary(stack.channel(), RUN + "ListRuns", request, stack.auth("dev"))
    assert_proper(outcome, "ListRuns with a bad created_after")
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, str(outcome)
    assert outcome.violations[0][0] == "created_after", str(outcome)


# -- RunService.BatchTriggerRuns -------------------------------------------------------------------


@st.composite
def random_options(draw: st.DrawFn, options: rpb.TriggerOptions) -> None:
    """Sets the newer options to anything, each often left unset."""

    def maybe(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(st.one_of(st.none(), strategy))

    for name in ("delay", "ttl", "idempotency_key_ttl", "max_duration"):
        if (d := maybe(any_durations)) is not None:
            getattr(options, name).CopyFrom(d)
    if (t := maybe(any_timestamps)) is not None:
        options.delay_until.CopyFrom(t)
    options.machine = draw(st.one_of(st.just(""), st.sampled_from(MACHINES), texts))
    options.parent_run_id = draw(
        st.one_of(st.just(""), st.sampled_from(["@dev", "@prod"]), id_like("run_"), texts)
    )
    if draw(st.booleans()):
        options.debounce.key = draw(st.one_of(task_id_ok, texts, st.just("k" * 513)))
        if (d := maybe(any_durations)) is not None:
            options.debounce.delay.CopyFrom(d)
        if (d := maybe(any_durations)) is not None:
            options.debounce.max_delay.CopyFrom(d)
        options.debounce.mode = draw(st.one_of(st.integers(0, 2), st.integers(3, 2**31 - 1)))


@st.composite
def random_batches(draw: st.DrawFn) -> rpb.BatchTriggerRunsRequest:
    items = []
    for _ in range(draw(st.integers(0, 4))):
        base = draw(trigger_requests())
        item = rpb.BatchTriggerItem(task_id=base.task_id, payload=base.payload)
        item.options.CopyFrom(base.options)
        if draw(st.booleans()):
            draw(random_options(item.options))
        items.append(item)
    key = draw(st.one_of(st.just(""), texts, st.just("b" * (LIMITS.idempotency_key_length + 1))))
    return rpb.BatchTriggerRunsRequest(items=items, idempotency_key=key)


def _resolve_parents(w: RunWorld, items: Any) -> None:
    for item in items:
        item.options.parent_run_id = w.resolve(item.options.parent_run_id)


@given(request=random_batches(), who=auths)
@FUZZ
def test_batch_trigger_with_random_items_answers_properly(
    run_world: RunWorld, request: rpb.BatchTriggerRunsRequest, who: str
) -> None:
    w = run_world
    _resolve_parents(w, request.items)
    before = w.state()
    outcome = w.call(RUN + "BatchTriggerRuns", request, who, rpb.BatchTriggerRunsResponse)
    assert_proper(outcome, f"BatchTriggerRuns({request!r})")
    after = w.state()
    if outcome.code is not OK:
        assert_unchanged(stable(before), stable(after), f"BatchTriggerRuns refused: {outcome}")
        if who not in ("dev", "prod"):
            assert outcome.code is UNAUTHENTICATED, str(outcome)
        elif outcome.code is INVALID:
            assert_refused(outcome, {"items", "idempotency_key"}, "BatchTriggerRuns")
            if not request.items or len(request.items) > LIMITS.batch_items:
                assert outcome.violations[0][0] == "items", str(outcome)
        return
    assert who in ("dev", "prod"), f"a batch with key {who!r} was accepted"
    assert 1 <= len(request.items) <= LIMITS.batch_items
    response: rpb.BatchTriggerRunsResponse = outcome.responses[0]
    assert len(response.runs) == len(response.is_cached)
    if response.batch_id in w.batch_runs:  # the batch's idempotency key matched
        assert request.idempotency_key and w.batch_env[response.batch_id] == who
        assert [r.id for r in response.runs] == w.batch_runs[response.batch_id]
        assert all(response.is_cached)
        assert after["batches"] == before["batches"] and after["runs"] == before["runs"]
        return
    assert len(response.runs) == len(request.items)
    new = [r for r, cached in zip(response.runs, response.is_cached, strict=True) if not cached]
    assert after["batches"] == before["batches"] + 1
    assert after["runs"] == before["runs"] + len(new)
    for run, item in zip(response.runs, request.items, strict=True):
        assert run.task_id == item.task_id
        assert run.environment_id == response.runs[0].environment_id
    for run in new:
        assert run.batch_id == response.batch_id
    w.batch_env[response.batch_id] = who
    w.batch_runs[response.batch_id] = [r.id for r in new]
    got = w.ok(
        RUN + "GetBatch", rpb.GetBatchRequest(batch_id=response.batch_id), who, rpb.GetBatchResponse
    )
    assert got.batch.run_count == len(request.items)
    assert list(got.batch.run_ids) == [r.id for r in new]
    assert got.batch.idempotency_key == request.idempotency_key
    theirs = w.call(
        RUN + "GetBatch", rpb.GetBatchRequest(batch_id=response.batch_id), other_env(who)
    )
    assert theirs.code is NOT_FOUND, str(theirs)


def _set_debounce(r: Any, **fields: Any) -> None:
    r.options.debounce.CopyFrom(rpb.Debounce(**{"key": "k", "delay": millis(5000), **fields}))


def _debounce_with_delay(r: Any, v: tuple[str, int]) -> None:
    _set_debounce(r)
    kind, n = v
    if kind == "delay":
        r.options.delay.CopyFrom(millis(n))
    else:
        r.options.delay_until.CopyFrom(stamp(n))


def _set_max_delay(r: Any, v: tuple[int, int]) -> None:
    delay, max_delay = v
    _set_debounce(r, delay=millis(delay), max_delay=millis(max_delay))


def _set_delay_until(r: Any, v: Timestamp | int) -> None:
    if isinstance(v, int):  # delay and delay_until both
        r.options.delay.CopyFrom(millis(v))
        r.options.delay_until.CopyFrom(stamp(2_000_000_000))
    else:
        r.options.delay_until.CopyFrom(v)


def _set_debounce_delay(r: Any, v: Duration | None) -> None:
    _set_debounce(r)
    if v is None:
        r.options.debounce.ClearField("delay")
    else:
        r.options.debounce.delay.CopyFrom(v)


# More per-field breakers, for the options TriggerRun and batch items share (see BREAKERS).
DEBOUNCE_BREAKERS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any, Any], None]]] = {
    "options.debounce.key": (
        st.one_of(
            st.just(""),
            st.integers(513, 700).map(lambda n: "k" * n),
            st.sampled_from(["\x00", "a\x00b"]),
        ),
        lambda r, v: _set_debounce(r, key=v),
    ),
    "options.debounce.delay": (
        st.one_of(
            st.none(),
            st.integers(0, 999).map(millis),
            st.integers(-(10**12), -1).map(millis),
            st.integers(TEN_YEARS_MS + 1000, 10**15).map(millis),
            st.builds(Duration, seconds=st.integers(1, 100), nanos=st.sampled_from([-1, 10**9])),
        ),
        _set_debounce_delay,
    ),
    "options.debounce.max_delay": (
        st.integers(1000, 10**8).flatmap(
            lambda d: st.tuples(st.just(d), st.one_of(st.integers(0, d), st.integers(-(10**9), -1)))
        ),
        _set_max_delay,
    ),
    "options.debounce.mode": (
        st.one_of(st.integers(3, 2**31 - 1), st.integers(-(2**31), -1)),
        lambda r, v: _set_debounce(r, mode=v),
    ),
    # A debounced run is delayed by the debounce alone.
    "options.debounce": (
        st.one_of(
            st.tuples(st.just("delay"), st.integers(0, 10**9)),
            st.tuples(st.just("delay_until"), st.one_of(st.just(0), st.integers(MIN_TS, MAX_TS))),
        ),
        _debounce_with_delay,
    ),
}
ITEM_BREAKERS = {
    **BREAKERS,
    **DEBOUNCE_BREAKERS,
    "options.delay_until": (
        st.one_of(
            st.builds(
                stamp,
                st.one_of(st.integers(-(2**63), MIN_TS - 1), st.integers(MAX_TS + 1, 2**63 - 1)),
            ),
            st.builds(
                stamp, st.integers(0, 10**10), st.sampled_from([-1, -(10**9), 10**9, 2**31 - 1])
            ),
            st.integers(0, 10**6),  # and delay as well
        ),
        _set_delay_until,
    ),
}


def _item(request: rpb.TriggerRunRequest) -> rpb.BatchTriggerItem:
    item = rpb.BatchTriggerItem(task_id=request.task_id, payload=request.payload)
    item.options.CopyFrom(request.options)
    item.options.idempotency_key = uuid.uuid4().hex if item.options.idempotency_key else ""
    return item


@st.composite
def valid_items(draw: st.DrawFn) -> rpb.BatchTriggerItem:
    """An item the API documents as valid, its newer options set now and then."""
    item = _item(draw(valid_trigger_requests()))
    o = item.options
    when = draw(st.sampled_from(["now", "delay", "delay_until", "debounce"]))
    if when == "delay":
        o.delay.CopyFrom(millis(draw(st.integers(0, 86_400_000))))
    elif when == "delay_until":
        o.delay_until.CopyFrom(
            stamp(draw(st.integers(1, MAX_TS)), draw(st.integers(0, 999_999_999)))
        )
    elif when == "debounce":
        delay = draw(st.integers(1000, 10**8))
        o.debounce.CopyFrom(
            rpb.Debounce(
                key=uuid.uuid4().hex
                + draw(
                    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
                ),
                delay=millis(delay),
                mode=draw(st.sampled_from([0, 1, 2])),
            )
        )
        if draw(st.booleans()):
            o.debounce.max_delay.CopyFrom(millis(delay + draw(st.integers(1, 10**8))))
    if draw(st.booleans()):
        o.ttl.CopyFrom(millis(draw(st.one_of(st.just(0), st.integers(1000, 10**9)))))
    if draw(st.booleans()):
        o.idempotency_key_ttl.CopyFrom(millis(draw(st.integers(1000, 10**9))))
    if draw(st.booleans()):
        o.max_duration.CopyFrom(millis(draw(st.integers(1000, 10**9))))
    o.machine = draw(st.sampled_from(["", *MACHINES]))
    o.parent_run_id = draw(st.sampled_from(["", "@dev"]))
    return item


@given(
    items=st.lists(valid_items(), min_size=1, max_size=8),
    keyed=st.booleans(),
    data=st.data(),
)
@FUZZ
def test_batch_with_one_bad_item_field_is_refused_naming_that_item_and_writes_nothing(
    run_world: RunWorld, items: list[rpb.BatchTriggerItem], keyed: bool, data: st.DataObject
) -> None:
    w = run_world
    _resolve_parents(w, items)
    i = data.draw(st.integers(0, len(items) - 1), label="item")
    name = data.draw(st.sampled_from(sorted(ITEM_BREAKERS)), label="field")
    strategy, apply = ITEM_BREAKERS[name]
    value = data.draw(strategy, label="value")
    bad = items[i]
    if name.startswith("options.debounce") or name == "options.delay_until":
        for f in ("delay", "delay_until", "debounce"):
            bad.options.ClearField(f)  # so that only the breaker's values are there
    apply(bad, value)
    request = rpb.BatchTriggerRunsRequest(
        items=items, idempotency_key=uuid.uuid4().hex if keyed else ""
    )
    before = w.state()
    outcome = w.call(RUN + "BatchTriggerRuns", request, "dev")
    assert_proper(outcome, f"BatchTriggerRuns with a bad items[{i}].{name}")
    assert outcome.code is INVALID, f"bad items[{i}].{name}={value!r}: {outcome}"
    assert outcome.violations[0][0].startswith(f"items[{i}].{name}"), (
        f"bad items[{i}].{name}, but it named {outcome}"
    )
    assert_unchanged(before, w.state(), f"BatchTriggerRuns with a bad items[{i}].{name}")


@given(items=st.lists(valid_items(), min_size=1, max_size=8), keyed=st.booleans())
@FUZZ
def test_a_valid_batch_makes_one_run_per_item_and_its_key_returns_it_again(
    run_world: RunWorld, items: list[rpb.BatchTriggerItem], keyed: bool
) -> None:
    """The other side of the property above: the 'valid' items really are valid."""
    w = run_world
    _resolve_parents(w, items)
    request = rpb.BatchTriggerRunsRequest(
        items=items, idempotency_key=uuid.uuid4().hex if keyed else ""
    )
    before = w.state()
    response = w.ok(RUN + "BatchTriggerRuns", request, "dev", rpb.BatchTriggerRunsResponse)
    after = w.state()
    assert after["runs"] == before["runs"] + len(items)
    assert after["batches"] == before["batches"] + 1
    assert list(response.is_cached) == [False] * len(items)
    assert [r.task_id for r in response.runs] == [i.task_id for i in items]
    for run, item in zip(response.runs, items, strict=True):
        assert run.batch_id == response.batch_id
        o = item.options
        if (
            o.HasField("debounce")
            or (o.HasField("delay") and o.delay.seconds >= 60)
            or (o.HasField("delay_until") and o.delay_until.seconds > 2_000_000_000)
        ):
            assert run.status == run_pb2.RUN_STATUS_DELAYED, run
        if item.options.parent_run_id:
            assert run.parent_run_id == item.options.parent_run_id
    got = w.ok(
        RUN + "GetBatch",
        rpb.GetBatchRequest(batch_id=response.batch_id),
        "dev",
        rpb.GetBatchResponse,
    )
    assert list(got.batch.run_ids) == [r.id for r in response.runs]
    assert got.batch.run_count == len(items)
    assert got.batch.status == rpb.BATCH_STATUS_PROCESSING
    if keyed:
        again = w.ok(RUN + "BatchTriggerRuns", request, "dev", rpb.BatchTriggerRunsResponse)
        assert again.batch_id == response.batch_id
        assert [r.id for r in again.runs] == [r.id for r in response.runs]
        assert all(again.is_cached)
        assert stable(w.state()) == stable(after), "a repeated batch key wrote rows"


@pytest.mark.parametrize("count", [0, LIMITS.batch_items + 1, 3 * LIMITS.batch_items])
def test_a_batch_of_no_items_or_too_many_is_refused_naming_items(
    run_world: RunWorld, count: int
) -> None:
    w = run_world
    items = [rpb.BatchTriggerItem(task_id="t") for _ in range(count)]
    before = w.state()
    outcome = w.call(RUN + "BatchTriggerRuns", rpb.BatchTriggerRunsRequest(items=items), "dev")
    assert_proper(outcome, f"BatchTriggerRuns with {count} items")
    assert outcome.code is INVALID, str(outcome)
    assert outcome.violations[0][0] == "items", str(outcome)
    if count:
        assert str(LIMITS.batch_items) in outcome.details, str(outcome)
    assert_unchanged(before, w.state(), f"a batch of {count} items")


def test_a_batch_at_the_item_limit_is_accepted(run_world: RunWorld) -> None:
    w = run_world
    items = [rpb.BatchTriggerItem(task_id="t", payload=str(i)) for i in range(LIMITS.batch_items)]
    before = w.state()
    response = w.ok(
        RUN + "BatchTriggerRuns",
        rpb.BatchTriggerRunsRequest(items=items),
        "dev",
        rpb.BatchTriggerRunsResponse,
    )
    assert len(response.runs) == LIMITS.batch_items
    assert [r.payload for r in response.runs] == [str(i) for i in range(LIMITS.batch_items)]
    after = w.state()
    assert after["runs"] == before["runs"] + LIMITS.batch_items
    assert after["batches"] == before["batches"] + 1


@pytest.mark.parametrize(
    "key", ["\x00", "a\x00", "b" * (LIMITS.idempotency_key_length + 1)], ids=["nul", "nul2", "long"]
)
def test_a_batch_with_a_bad_idempotency_key_is_refused_naming_it(
    run_world: RunWorld, key: str
) -> None:
    w = run_world
    request = rpb.BatchTriggerRunsRequest(
        items=[rpb.BatchTriggerItem(task_id="t")], idempotency_key=key
    )
    before = w.state()
    outcome = w.call(RUN + "BatchTriggerRuns", request, "dev")
    assert_proper(outcome, "BatchTriggerRuns with a bad idempotency_key")
    assert outcome.code is INVALID, str(outcome)
    assert outcome.violations[0][0] == "idempotency_key", str(outcome)
    assert_unchanged(before, w.state(), "a batch with a bad idempotency_key")


def test_a_batch_whose_late_item_fails_in_the_engine_writes_nothing(run_world: RunWorld) -> None:
    """Items pass validation one by one; the last names another environment's parent run (found
    only inside the transaction) or an unknown queue: the earlier items must not be written."""
    w = run_world
    good = [rpb.BatchTriggerItem(task_id="t", payload=str(i)) for i in range(5)]
    for name, options in (
        ("options.parent_run_id", rpb.TriggerOptions(parent_run_id=w.runs["prod"])),
        ("options.queue", rpb.TriggerOptions(queue="engine-pq")),
    ):
        request = rpb.BatchTriggerRunsRequest(
            items=[*good, rpb.BatchTriggerItem(task_id="t", options=options)],
            idempotency_key="late-" + name,
        )
        before = w.state()
        outcome = w.call(RUN + "BatchTriggerRuns", request, "dev")
        assert_proper(outcome, f"BatchTriggerRuns with a bad items[5].{name}")
        assert outcome.code is INVALID, str(outcome)
        assert outcome.violations[0][0] == f"items[5].{name}", str(outcome)
        assert_unchanged(before, w.state(), f"a batch with a bad items[5].{name}")


# -- RunService.GetBatch ---------------------------------------------------------------------------


@given(
    batch_id=st.one_of(st.sampled_from(["@dev-batch", "@prod-batch"]), id_like("batch_"), texts),
    who=auths,
)
@FUZZ
def test_get_batch_with_random_ids_answers_properly(
    run_world: RunWorld, batch_id: str, who: str
) -> None:
    w = run_world
    batch_id = w.resolve(batch_id)
    before = w.state()
    outcome = w.call(
        RUN + "GetBatch", rpb.GetBatchRequest(batch_id=batch_id), who, rpb.GetBatchResponse
    )
    assert_proper(outcome, f"GetBatch({batch_id!r}) as {who!r}")
    assert_unchanged(before, w.state(), "GetBatch")
    if who not in ("dev", "prod"):
        assert outcome.code is UNAUTHENTICATED, str(outcome)
    elif not BATCH_ID.fullmatch(batch_id):
        assert_refused(outcome, {"batch_id"}, f"GetBatch({batch_id!r})")
    elif w.batch_env.get(batch_id) != who:
        assert outcome.code is NOT_FOUND, f"GetBatch({batch_id!r}) as {who}: {outcome}"
        assert batch_id in outcome.details
    else:
        assert outcome.code is OK, str(outcome)
        batch = outcome.responses[0].batch
        assert batch.id == batch_id
        assert list(batch.run_ids) == w.batch_runs[batch_id]
        assert batch.status == rpb.BATCH_STATUS_PROCESSING


# -- RunService.ReplayRun --------------------------------------------------------------------------

run_refs = st.one_of(
    st.sampled_from(["@dev", "@prod", "@dev-canceled", "@dev-keyed"]), id_like("run_"), texts
)


@given(run_id=run_refs, who=auths)
@FUZZ
def test_replay_run_with_random_ids_answers_properly(
    run_world: RunWorld, run_id: str, who: str
) -> None:
    w = run_world
    run_id = w.resolve(run_id)
    before = w.state()
    outcome = w.call(
        RUN + "ReplayRun", rpb.ReplayRunRequest(run_id=run_id), who, rpb.ReplayRunResponse
    )
    assert_proper(outcome, f"ReplayRun({run_id!r}) as {who!r}")
    if outcome.code is not OK:
        assert_unchanged(before, w.state(), f"ReplayRun refused with {outcome}")
    if who not in ("dev", "prod"):
        assert outcome.code is UNAUTHENTICATED, str(outcome)
    elif not RUN_ID.fullmatch(run_id):
        assert_refused(outcome, {"run_id"}, f"ReplayRun({run_id!r})")
    elif w.run_env.get(run_id) != who:
        assert outcome.code is NOT_FOUND, f"ReplayRun({run_id!r}) as {who}: {outcome}"
    else:
        assert outcome.code is OK, str(outcome)
        run = outcome.responses[0].run
        original = w.ok(
            RUN + "GetRun", rpb.GetRunRequest(run_id=run_id), who, rpb.GetRunResponse
        ).run
        assert run.id != run_id and run.replayed_from_run_id == run_id
        assert (run.task_id, run.payload, list(run.tags), run.metadata) == (
            original.task_id,
            original.payload,
            list(original.tags),
            original.metadata,
        )
        assert run.idempotency_key == ""  # a replay never takes the key over
        assert w.state()["runs"] == before["runs"] + 1
        w.run_env[run.id] = who


# -- RunService.RescheduleRun ----------------------------------------------------------------------


@given(
    run_id=st.one_of(st.just("@delayed"), st.just("@prod-delayed"), run_refs),
    delay=st.one_of(st.none(), any_durations),
    delay_until=st.one_of(st.none(), any_timestamps),
    who=auths,
)
@FUZZ
def test_reschedule_run_with_random_fields_answers_properly(
    run_world: RunWorld,
    run_id: str,
    delay: Duration | None,
    delay_until: Timestamp | None,
    who: str,
) -> None:
    w = run_world
    if run_id == "@delayed":
        run_id = w.delayed_run("dev")
    elif run_id == "@prod-delayed":
        run_id = w.delayed_run("prod")
    run_id = w.resolve(run_id)
    request = rpb.RescheduleRunRequest(run_id=run_id)
    if delay is not None:
        request.delay.CopyFrom(delay)
    if delay_until is not None:
        request.delay_until.CopyFrom(delay_until)
    before = w.state()
    called_ms = int(time.time() * 1000)
    outcome = w.call(RUN + "RescheduleRun", request, who, rpb.RescheduleRunResponse)
    what = f"RescheduleRun({request!r}) as {who!r}"
    assert_proper(outcome, what)
    if outcome.code is not OK:
        assert_unchanged(
            stable(before, run_id), stable(w.state(), run_id), f"{what} refused: {outcome}"
        )
    bad = set()
    if not RUN_ID.fullmatch(run_id):
        bad.add("run_id")
    if (delay is None) == (delay_until is None):
        bad |= {"delay", "delay_until"}
    if delay is not None and duration_ms(delay) is None:
        bad.add("delay")
    if delay_until is not None and not timestamp_ok(delay_until):
        bad.add("delay_until")
    if who not in ("dev", "prod"):
        assert outcome.code is UNAUTHENTICATED, str(outcome)
    elif bad:
        assert_refused(outcome, bad, what)
    elif w.run_env.get(run_id) != who:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
    elif run_id in w.runs.values():  # the world's runs are not DELAYED
        assert outcome.code is FAILED_PRECONDITION, f"{what}: {outcome}"
        assert "DELAYED" in outcome.details, str(outcome)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        run = outcome.responses[0].run
        assert run.id == run_id
        if delay_until is not None:
            expected = delay_until.ToMilliseconds()
            assert run.delay_until.ToMilliseconds() == expected, run
        else:
            assert delay is not None
            assert run.delay_until.ToMilliseconds() >= called_ms + (duration_ms(delay) or 0)
        assert w.state()["runs"] == before["runs"]


RESCHEDULE_BREAKERS: dict[
    str, tuple[st.SearchStrategy[Any], Callable[[rpb.RescheduleRunRequest, Any], None]]
] = {
    "run_id": (
        st.one_of(
            st.just(""),
            st.sampled_from(["run_", "run_ABC", "nope", "batch_123"]),
            id_like("run_").filter(lambda s: not RUN_ID.fullmatch(s)),
        ),
        lambda r, v: setattr(r, "run_id", v),
    ),
    "delay": (
        st.one_of(
            st.integers(-(10**12), -1).map(millis),
            st.integers(TEN_YEARS_MS + 1000, 10**15).map(millis),
            st.builds(Duration, seconds=st.integers(0, 100), nanos=st.sampled_from([-1, 10**9])),
        ),
        lambda r, v: (r.ClearField("delay_until"), r.delay.CopyFrom(v)),
    ),
    "delay_until": (
        st.one_of(
            st.builds(
                stamp,
                st.one_of(st.integers(-(2**63), MIN_TS - 1), st.integers(MAX_TS + 1, 2**63 - 1)),
            ),
            st.builds(stamp, st.integers(0, 10**10), st.sampled_from([-1, 10**9])),
        ),
        lambda r, v: (r.ClearField("delay"), r.delay_until.CopyFrom(v)),
    ),
    # Exactly one of the two: both, or neither.
    "delay|delay_until": (
        st.booleans(),
        lambda r, both: (
            (r.delay.CopyFrom(millis(60_000)), r.delay_until.CopyFrom(stamp(2_000_000_000)))
            if both
            else (r.ClearField("delay"), r.ClearField("delay_until"))
        ),
    ),
}


@given(
    use_delay=st.booleans(),
    ms=st.integers(0, 10**9),
    data=st.data(),
)
@FUZZ
def test_reschedule_with_one_bad_field_is_refused_naming_that_field(
    run_world: RunWorld, use_delay: bool, ms: int, data: st.DataObject
) -> None:
    w = run_world
    run_id = w.delayed_run("dev")
    request = rpb.RescheduleRunRequest(run_id=run_id)
    if use_delay:
        request.delay.CopyFrom(millis(ms))
    else:
        request.delay_until.CopyFrom(stamp(2_000_000_000 + ms))
    name = data.draw(st.sampled_from(sorted(RESCHEDULE_BREAKERS)), label="field")
    strategy, apply = RESCHEDULE_BREAKERS[name]
    value = data.draw(strategy, label="value")
    apply(request, value)
    before = w.state()
    outcome = w.call(RUN + "RescheduleRun", request, "dev")
    assert_proper(outcome, f"RescheduleRun with bad {name}")
    assert_refused(outcome, set(name.split("|")), f"RescheduleRun with bad {name}={value!r}")
    assert_unchanged(before, w.state(), f"RescheduleRun with bad {name}")


def test_reschedule_refuses_runs_that_are_not_delayed_or_not_the_callers(
    run_world: RunWorld,
) -> None:
    w = run_world
    later = rpb.RescheduleRunRequest(delay=millis(60_000))
    cases = [
        ("dev", w.runs["dev"], FAILED_PRECONDITION, "PENDING_VERSION"),
        ("dev", w.runs["dev-canceled"], FAILED_PRECONDITION, "CANCELED"),
        ("dev", w.delayed_run("prod"), NOT_FOUND, "not found"),
        ("prod", w.delayed_run("dev"), NOT_FOUND, "not found"),
    ]
    for who, run_id, code, words in cases:
        request = rpb.RescheduleRunRequest()
        request.CopyFrom(later)
        request.run_id = run_id
        before = w.state()
        outcome = w.call(RUN + "RescheduleRun", request, who)
        assert_proper(outcome, f"RescheduleRun({run_id}) as {who}")
        assert outcome.code is code, str(outcome)
        assert words in outcome.details and run_id in outcome.details, str(outcome)
        assert_unchanged(before, w.state(), f"RescheduleRun({run_id}) as {who}")
    # The valid counterpart moves the run and keeps it DELAYED.
    run_id = w.delayed_run("dev")
    request = rpb.RescheduleRunRequest(run_id=run_id, delay_until=stamp(4_000_000_000))
    run = w.ok(RUN + "RescheduleRun", request, "dev", rpb.RescheduleRunResponse).run
    assert run.status == run_pb2.RUN_STATUS_DELAYED and run.delay_until.seconds == 4_000_000_000


# -- RunService.ResetIdempotencyKey ----------------------------------------------------------------


@given(
    task=st.one_of(st.just(KEYED_TASK), task_id_ok, texts),
    key=st.one_of(
        st.just(KEY),
        st.just(""),
        texts,
        st.integers(LIMITS.idempotency_key_length - 1, LIMITS.idempotency_key_length + 3).map(
            lambda n: "k" * n
        ),
    ),
    who=auths,
)
@FUZZ
def test_reset_idempotency_key_with_random_fields_answers_properly(
    run_world: RunWorld, task: str, key: str, who: str
) -> None:
    w = run_world
    request = rpb.ResetIdempotencyKeyRequest(task_id=task, idempotency_key=key)
    before = w.state()
    outcome = w.call(RUN + "ResetIdempotencyKey", request, who, rpb.ResetIdempotencyKeyResponse)
    what = f"ResetIdempotencyKey({task!r}, {key[:50]!r}...) as {who!r}"
    assert_proper(outcome, what)
    bad = set()
    if not TASK_ID.fullmatch(task):
        bad.add("task_id")
    if not key or "\x00" in key or len(key) > LIMITS.idempotency_key_length:
        bad.add("idempotency_key")
    if outcome.code is not OK:
        assert_unchanged(before, w.state(), f"{what} refused with {outcome}")
    if who not in ("dev", "prod"):
        assert outcome.code is UNAUTHENTICATED, str(outcome)
    elif bad:
        assert_refused(outcome, bad, what)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        releases = who == "dev" and (task, key) == (KEYED_TASK, KEY) and not w.key_released
        assert outcome.responses[0].released == int(releases), str(outcome.responses[0])
        after = w.state()
        assert {k: v for k, v in after.items() if k != "run_rows"} == {
            k: v for k, v in before.items() if k != "run_rows"
        }
        if releases:
            w.key_released = True
        else:
            assert after == before, f"{what} released nothing, yet changed rows"


@given(
    task=st.one_of(
        st.just(""),
        st.just("a" * 129),
        st.just("nosuch-task-#!"),
        st.just("t\n"),
        texts.filter(lambda t: not TASK_ID.fullmatch(t)),
    ),
    key=st.one_of(
        st.just(""),
        st.sampled_from(["\x00", "a\x00b"]),
        st.integers(LIMITS.idempotency_key_length + 1, LIMITS.idempotency_key_length + 100).map(
            lambda n: "k" * n
        ),
    ),
    good_task=task_id_ok,
    good_key=texts.filter(lambda t: t and "\x00" not in t),
    which=st.sampled_from(["task_id", "idempotency_key"]),
)
@FUZZ
def test_reset_idempotency_key_with_one_bad_field_is_refused_naming_it(
    run_world: RunWorld, task: str, key: str, good_task: str, good_key: str, which: str
) -> None:
    w = run_world
    if which == "task_id":
        request = rpb.ResetIdempotencyKeyRequest(task_id=task, idempotency_key=good_key)
    else:
        request = rpb.ResetIdempotencyKeyRequest(task_id=good_task, idempotency_key=key)
    before = w.state()
    outcome = w.call(RUN + "ResetIdempotencyKey", request, "dev")
    assert_proper(outcome, f"ResetIdempotencyKey with a bad {which}")
    assert_refused(outcome, {which}, f"ResetIdempotencyKey({request!r})")
    assert_unchanged(before, w.state(), f"ResetIdempotencyKey with a bad {which}")


def test_a_reset_key_is_released_for_the_next_trigger_only_in_its_environment(
    run_world: RunWorld,
) -> None:
    w = run_world
    again = w.trigger("dev", idempotency_key=KEY)
    assert again.is_cached and again.run.id == w.runs["dev-keyed"]
    request = rpb.ResetIdempotencyKeyRequest(task_id=KEYED_TASK, idempotency_key=KEY)
    theirs = w.ok(RUN + "ResetIdempotencyKey", request, "prod", rpb.ResetIdempotencyKeyResponse)
    assert theirs.released == 0
    assert w.trigger("dev", idempotency_key=KEY).is_cached
    mine = w.ok(RUN + "ResetIdempotencyKey", request, "dev", rpb.ResetIdempotencyKeyResponse)
    assert mine.released == 1
    fresh = w.trigger("dev", idempotency_key=KEY)
    assert not fresh.is_cached and fresh.run.id != w.runs["dev-keyed"]


# -- TriggerRun's debounce option ------------------------------------------------------------------


@st.composite
def valid_debounced_triggers(draw: st.DrawFn) -> rpb.TriggerRunRequest:
    request = rpb.TriggerRunRequest()
    request.CopyFrom(draw(valid_trigger_requests()))
    request.options.idempotency_key = ""
    delay = draw(st.integers(1000, 10**9))
    request.options.debounce.CopyFrom(
        rpb.Debounce(
            key=draw(
                st.text(
                    st.characters(codec="utf-8", exclude_characters="\x00"),
                    min_size=1,
                    max_size=512,
                )
            ),
            delay=millis(delay),
            mode=draw(st.sampled_from([0, 1, 2])),
        )
    )
    if draw(st.booleans()):
        request.options.debounce.max_delay.CopyFrom(millis(delay + draw(st.integers(1, 10**9))))
    return request


@given(base=valid_debounced_triggers(), data=st.data())
@FUZZ
def test_trigger_with_a_bad_debounce_is_refused_naming_the_field(
    run_world: RunWorld, base: rpb.TriggerRunRequest, data: st.DataObject
) -> None:
    w = run_world
    name = data.draw(st.sampled_from(sorted(DEBOUNCE_BREAKERS)), label="field")
    strategy, apply = DEBOUNCE_BREAKERS[name]
    value = data.draw(strategy, label="value")
    request = rpb.TriggerRunRequest()
    request.CopyFrom(base)
    apply(request, value)
    before = w.state()
    outcome = w.call(RUN + "TriggerRun", request, "dev")
    assert_proper(outcome, f"TriggerRun with bad {name}")
    assert outcome.code is INVALID, f"bad {name}={value!r}: {outcome}"
    named = outcome.violations[0][0]
    assert named == name or named.startswith(name + "."), f"bad {name}, but it named {outcome}"
    if name != "options.debounce":
        assert named == name, f"bad {name}, but it named {outcome}"
    assert_unchanged(before, w.state(), f"TriggerRun with bad {name}")


@given(request=valid_debounced_triggers())
@settings(FUZZ, max_examples=30)
def test_a_valid_debounced_trigger_makes_one_delayed_run_that_a_second_trigger_pushes_back(
    run_world: RunWorld, request: rpb.TriggerRunRequest
) -> None:
    w = run_world
    request.options.debounce.key = uuid.uuid4().hex + request.options.debounce.key[:400]
    before = w.state()
    first = w.ok(RUN + "TriggerRun", request, "dev", rpb.TriggerRunResponse)
    assert not first.is_cached and first.run.status == run_pb2.RUN_STATUS_DELAYED, first
    assert w.state()["runs"] == before["runs"] + 1
    d = request.options.debounce
    if d.HasField("max_delay") and duration_ms(d.max_delay) - duration_ms(d.delay) < 60_000:  # type: ignore[operator]
        return  # a second trigger may be past max_delay already
    second = w.ok(RUN + "TriggerRun", request, "dev", rpb.TriggerRunResponse)
    assert second.is_cached and second.run.id == first.run.id, second
    assert second.run.delay_until.ToMilliseconds() >= first.run.delay_until.ToMilliseconds()
    assert w.state()["runs"] == before["runs"] + 1
    # The key is the caller's: the other environment gets a run of its own.
    theirs = w.ok(RUN + "TriggerRun", request, "prod", rpb.TriggerRunResponse)
    assert not theirs.is_cached and theirs.run.id != first.run.id


# -- RunService.UpdateRunMetadata ------------------------------------------------------------------

metadata_texts = st.one_of(
    st.just(""),
    st.dictionaries(st.text(max_size=10), json_values, max_size=4).map(json.dumps),
    json_texts,
    texts,
    st.sampled_from(["{", "[]", "null", '{"a": 1e400}', '{"a": NaN}', '{"a":"\\u0000"}']),
    st.just(json.dumps({"m": "x" * LIMITS.metadata_bytes})),
)


def _metadata_ok(value: str) -> bool:
    if len(value.encode()) > LIMITS.metadata_bytes:
        return False
    try:
        parsed = json.loads(value or "{}", parse_constant=lambda c: 1 / 0)
    except (ValueError, ZeroDivisionError):
        return False
    if not isinstance(parsed, dict):
        return False
    return all_finite(parsed)


def _run_row(w: ScheduleWorld, run_id: str) -> Any:
    """The run's row as stored, by column (None if there is none)."""
    assert w.stack.scheduler is not None
    engine = w.stack.scheduler.engine_db

    async def read() -> Any:
        async with engine.connect() as conn:
            stmt = select(db.runs).where(db.runs.c.id == run_id)
            return (await conn.execute(stmt)).mappings().first()

    return w.stack.run(read())


@given(run_ref=run_ids, metadata=metadata_texts, who=auths)
@FUZZ
def test_update_run_metadata_with_random_fields_answers_properly(
    schedule_world: ScheduleWorld, run_ref: str, metadata: str, who: str
) -> None:
    w = schedule_world
    run_id = w.resolve(run_ref)
    request = rpb.UpdateRunMetadataRequest(run_id=run_id, metadata=metadata)
    what = f"UpdateRunMetadata({run_id!r}, {metadata[:80]!r}) as {who!r}"
    before = w.rows(db.runs, db.outbox)
    outcome = w.call(RUN + "UpdateRunMetadata", request, who, rpb.UpdateRunMetadataResponse)
    assert_proper(outcome, what)
    bad = set()
    if not RUN_ID.fullmatch(run_id):
        bad.add("run_id")
    elif not _metadata_ok(metadata):
        bad.add("metadata")
    if outcome.code is not OK:
        assert w.rows(db.runs, db.outbox) == before, f"{what} refused, yet rows changed"
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif bad:
        assert_refused(outcome, bad, what)
    elif w.run_env.get(run_id) != who:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        run = outcome.responses[0].run
        assert json.loads(run.metadata) == json.loads(metadata or "{}")
        stored = _run_row(w, run_id)
        assert stored is not None
        assert json.loads(stored["metadata"]) == json.loads(metadata or "{}")


# -- RunService.AddRunTags -------------------------------------------------------------------------


@given(
    run_ref=run_ids,
    tags=st.one_of(
        st.lists(task_id_ok, max_size=3),
        st.lists(st.one_of(task_id_ok, texts), max_size=12),
        st.just(["t" * (LIMITS.tag_length + 1)]),
    ),
    who=auths,
)
@FUZZ
def test_add_run_tags_with_random_fields_answers_properly(
    schedule_world: ScheduleWorld, run_ref: str, tags: list[str], who: str
) -> None:
    w = schedule_world
    run_id = w.resolve(run_ref)
    request = rpb.AddRunTagsRequest(run_id=run_id, tags=tags)
    what = f"AddRunTags({run_id!r}, {tags!r}) as {who!r}"
    tables = (db.runs, db.run_tags, db.outbox)
    before = w.rows(*tables)
    current: list[str] = []
    if w.run_env.get(run_id) == who:
        current = list(
            w.ok(RUN + "GetRun", rpb.GetRunRequest(run_id=run_id), who, rpb.GetRunResponse).run.tags
        )
    outcome = w.call(RUN + "AddRunTags", request, who, rpb.AddRunTagsResponse)
    assert_proper(outcome, what)
    bad = set()
    if not RUN_ID.fullmatch(run_id):
        bad.add("run_id")
    elif (
        not tags
        or len(tags) > LIMITS.tags
        or any(not t or len(t) > LIMITS.tag_length or "\x00" in t for t in tags)
    ):
        bad.add("tags")
    if outcome.code is not OK:
        assert w.rows(*tables) == before, f"{what} refused, yet rows changed"
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif bad:
        assert_refused(outcome, bad, what)
    elif w.run_env.get(run_id) != who:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
    else:
        wanted = current + [t for t in dict.fromkeys(tags) if t not in current]
        if len(wanted) > LIMITS.tags:
            assert_refused(outcome, {"tags"}, what)
            assert str(LIMITS.tags) in outcome.details, str(outcome)
        else:
            assert outcome.code is OK, f"{what}: {outcome}"
            assert list(outcome.responses[0].run.tags) == wanted


# -- RunService.ListRunLogs ------------------------------------------------------------------------


@given(
    run_ref=run_ids,
    page_size=st.one_of(st.integers(0, 1000), int32),
    page_token=page_tokens("log_"),
    who=auths,
)
@FUZZ
def test_list_run_logs_with_random_fields_answers_properly(
    schedule_world: ScheduleWorld, run_ref: str, page_size: int, page_token: str, who: str
) -> None:
    w = schedule_world
    run_id = w.resolve(run_ref)
    request = rpb.ListRunLogsRequest(run_id=run_id, page_size=page_size, page_token=page_token)
    what = f"ListRunLogs({request!r}) as {who!r}"
    outcome = w.call(RUN + "ListRunLogs", request, who, rpb.ListRunLogsResponse)
    assert_proper(outcome, what)
    token_ok = page_token == "" or decoded(page_token).startswith("log_")
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not RUN_ID.fullmatch(run_id):
        assert_refused(outcome, {"run_id"}, what)
    elif not 0 <= page_size <= 1000:
        assert_refused(outcome, {"page_size"}, what)
    elif not token_ok or outcome.code is INVALID:
        assert_refused(outcome, {"page_token"}, what)
    elif w.run_env.get(run_id) != who:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
        assert run_id in outcome.details, str(outcome)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        assert not outcome.responses[0].entries  # no executor ran anything


def test_list_run_logs_of_another_environments_run_is_not_found(
    schedule_world: ScheduleWorld,
) -> None:
    w = schedule_world
    for who, run in (("dev", w.runs["prod"]), ("prod", w.runs["dev"])):
        outcome = w.call(RUN + "ListRunLogs", rpb.ListRunLogsRequest(run_id=run), who)
        assert outcome.code is NOT_FOUND, f"ListRunLogs({run}) as {who}: {outcome}"
        get = w.call(RUN + "GetRun", rpb.GetRunRequest(run_id=run), who)
        assert get.code is NOT_FOUND, str(get)
    mine = w.call(RUN + "ListRunLogs", rpb.ListRunLogsRequest(run_id=w.runs["dev"]), "dev")
    assert mine.code is OK, str(mine)


# -- RunService.GetRunTimeline ---------------------------------------------------------------------


@given(run_ref=run_ids, who=auths)
@FUZZ
def test_get_run_timeline_with_random_ids_answers_properly(
    schedule_world: ScheduleWorld, run_ref: str, who: str
) -> None:
    w = schedule_world
    run_id = w.resolve(run_ref)
    request = rpb.GetRunTimelineRequest(run_id=run_id)
    what = f"GetRunTimeline({request!r}) as {who!r}"
    outcome = w.call(RUN + "GetRunTimeline", request, who, rpb.GetRunTimelineResponse)
    assert_proper(outcome, what)
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not RUN_ID.fullmatch(run_id):
        assert_refused(outcome, {"run_id"}, what)
    elif w.run_env.get(run_id) != who:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
        assert run_id in outcome.details, str(outcome)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        timeline = outcome.responses[0]
        assert timeline.run.id == run_id
        assert not timeline.attempts and not timeline.logs  # no executor ran anything


def test_get_run_timeline_of_another_environments_run_is_not_found(
    schedule_world: ScheduleWorld,
) -> None:
    w = schedule_world
    for who, run in (("dev", w.runs["prod"]), ("prod", w.runs["dev"])):
        outcome = w.call(RUN + "GetRunTimeline", rpb.GetRunTimelineRequest(run_id=run), who)
        assert outcome.code is NOT_FOUND, f"GetRunTimeline({run}) as {who}: {outcome}"
        assert run in outcome.details, str(outcome)
    mine = w.call(
        RUN + "GetRunTimeline",
        rpb.GetRunTimelineRequest(run_id=w.runs["dev"]),
        "dev",
        rpb.GetRunTimelineResponse,
    )
    assert mine.code is OK, str(mine)
    timeline = mine.responses[0]
    assert timeline.run.id == w.runs["dev"]
    # Never dequeued: one open QUEUED interval from the run's queueing.
    assert [i.kind for i in timeline.queue_intervals] == ["QUEUED"]
    assert not timeline.queue_intervals[0].HasField("finished_at")


# -- metadata updates from an attempt --------------------------------------------------------------


class FakeExecutor:
    """A worker stream driven from the test thread: what it sends goes through a queue."""

    def __init__(self, stack: Stack, tasks: list[str]) -> None:
        self._sending: queue.Queue[wpb.ConnectRequest | None] = queue.Queue()
        manifest = wpb.Manifest(tasks=[wpb.TaskDefinition(id=t) for t in tasks])
        self.send(wpb.ConnectRequest(register=wpb.Register(manifest=manifest, capacity=4)))
        call = stack.channel().stream_stream(
            CONNECT,
            request_serializer=wpb.ConnectRequest.SerializeToString,
            response_deserializer=wpb.ConnectResponse.FromString,
        )
        self._call = call(iter(self._sending.get, None), metadata=stack.auth("dev"), timeout=120)
        first = next(self._call)
        assert first.WhichOneof("message") == "registered", first

    def send(self, message: wpb.ConnectRequest) -> None:
        self._sending.put(message)

    def start_next(self) -> wpb.Assignment:
        """The next assignment, acknowledged and started."""
        for response in self._call:
            if response.WhichOneof("message") == "assignment":
                attempt = response.assignment.attempt_id
                self.send(wpb.ConnectRequest(ack=wpb.AssignmentAck(attempt_id=attempt)))
                self.send(wpb.ConnectRequest(started=wpb.AttemptStarted(attempt_id=attempt)))
                assignment: wpb.Assignment = response.assignment
                return assignment
        raise AssertionError("the worker stream ended")

    def set_metadata(self, attempt: str, run_id: str, key: str, value: Any) -> None:
        operation = wpb.MetadataOperation(type="set", key=key, value=json.dumps(value))
        update = wpb.MetadataUpdate(run_id=run_id, attempt_id=attempt, operations=[operation])
        self.send(wpb.ConnectRequest(metadata=update))

    def close(self) -> None:
        self._sending.put(None)
        self._call.cancel()


def _metadata_of(w: ScheduleWorld, run_id: str) -> dict[str, Any]:
    got = w.ok(RUN + "GetRun", rpb.GetRunRequest(run_id=run_id), "dev", rpb.GetRunResponse)
    metadata: dict[str, Any] = json.loads(got.run.metadata)
    return metadata


def test_an_attempt_changes_only_its_own_its_parents_and_its_roots_metadata(
    schedule_world: ScheduleWorld,
) -> None:
    w = schedule_world
    executor = FakeExecutor(w.stack, ["meta-task"])
    try:
        root = w.ok(
            RUN + "TriggerRun",
            rpb.TriggerRunRequest(task_id="meta-task"),
            "dev",
            rpb.TriggerRunResponse,
        ).run.id
        root_attempt = executor.start_next()
        assert root_attempt.run.id == root
        child_request = rpb.TriggerRunRequest(
            task_id="meta-task", options=rpb.TriggerOptions(parent_run_id=root)
        )
        child = w.ok(RUN + "TriggerRun", child_request, "dev", rpb.TriggerRunResponse).run.id
        child_attempt = executor.start_next()
        assert child_attempt.run.id == child
        stranger = w.runs["dev"]
        before = _metadata_of(w, stranger)
        # Refused: a run that is neither the attempt's own, nor its parent or root.
        executor.set_metadata(root_attempt.attempt_id, stranger, "hijacked", True)
        executor.set_metadata(child_attempt.attempt_id, stranger, "hijacked", True)
        # Allowed: the child's parent (also its root), and each attempt's own run.
        executor.set_metadata(child_attempt.attempt_id, root, "from-child", 1)
        executor.set_metadata(child_attempt.attempt_id, child, "own", 2)
        executor.set_metadata(root_attempt.attempt_id, root, "own", 3)
        # Updates are applied in order: once the last is in, the earlier ones were decided.
        asyncio.run(
            eventually(lambda: _metadata_of(w, root).get("own") == 3, 30, description="own update")
        )
        assert _metadata_of(w, root) == {"from-child": 1, "own": 3}
        assert _metadata_of(w, child) == {"own": 2}
        assert _metadata_of(w, stranger) == before
    finally:
        executor.close()
