"""RealtimeService's contract under bad input: SubscribeToRun, SubscribeToRunsWithTag,
SubscribeToBatch, ReadStream and AppendStream with random fields and raw bytes.

A scheduler and a realtime service run on a real nats-server (``live_stack``). Every answer must
come in time with a proper status and a message naming the problem, a refusal must write nothing
(no run, no stream chunk), and a valid request must be served. A valid subscription may
legitimately stay silent; only those get a short deadline that may pass.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from runplane.v1 import auth_service_pb2 as apb
from runplane.v1 import realtime_service_pb2
from runplane.v1 import realtime_service_pb2 as rtpb
from runplane_common.grpcserver import MAX_MESSAGE_BYTES
from tests.helpers.contract import (
    DEADLINE,
    FAILED_PRECONDITION,
    FUZZ,
    INVALID,
    KEYS,
    LIMITS,
    NOT_FOUND,
    OK,
    PERMISSION_DENIED,
    RT,
    SUBSCRIBE,
    UNAUTHENTICATED,
    Outcome,
    Stack,
    assert_proper,
    assert_refused,
    decodes,
    some_runs,
    streaming,
    unary,
)
from tests.helpers.inputs import (
    BATCH_ID,
    RUN_ID,
    any_timestamps,
    auths,
    id_like,
    int64,
    json_ok,
    json_texts,
    resolve_run,
    run_ids,
    task_id_ok,
    texts,
    timestamp_ok,
)
from tests.helpers.worlds import (
    RealtimeWorld,
)

pytestmark = pytest.mark.timeout(600)

SEVEN_DAYS_MS = 7 * 86_400_000
# A valid subscription that has nothing to send may stay silent this long.
QUIET = 0.5
STREAM_ID_OK = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")


def _subscribe(
    w: RealtimeWorld, method: str, request: Any, who: str, response_type: Any, quiet: bool
) -> Outcome:
    return streaming(
        w.stack.realtime_channel(),
        RT + method,
        [request],
        w.stack.auth(who),
        response_type=response_type,
        first_only=True,
        timeout=QUIET if quiet else DEADLINE,
    )


def _silent(outcome: Outcome) -> bool:
    return outcome.code is grpc.StatusCode.DEADLINE_EXCEEDED


versions = st.dictionaries(
    st.one_of(st.sampled_from(["@dev", "@prod"]), id_like("run_"), texts),
    st.one_of(st.integers(-3, 5), int64),
    max_size=3,
)
cursors = st.one_of(st.just(0), st.integers(-5, 50), int64)


def _versions_bad(after_versions: dict[str, int]) -> bool:
    return any(v < 0 for v in after_versions.values())


# -- RealtimeService.SubscribeToRun ----------------------------------------------------------------


@given(
    run_id=run_ids,
    after_version=st.one_of(st.integers(-3, 5), int64),
    keep_open=st.booleans(),
    who=auths,
)
@FUZZ
def test_subscribe_to_run_with_random_requests_answers_properly(
    live_stack: Stack, run_id: str, after_version: int, keep_open: bool, who: str
) -> None:
    stack = live_stack
    ids = some_runs(stack)
    run_id = resolve_run(run_id, ids)
    versions = {ids["dev"]: (1, False), ids["dev-canceled"]: (2, True), ids["prod"]: (1, False)}
    owner_env = {ids["dev"]: "dev", ids["dev-canceled"]: "dev", ids["prod"]: "prod"}
    request = realtime_service_pb2.SubscribeToRunRequest(
        run_id=run_id, after_version=after_version, keep_open=keep_open
    )
    visible = run_id in owner_env and owner_env[run_id] == who and after_version >= 0
    current, final = versions.get(run_id, (0, False))
    # A subscriber that has every version there is may legitimately hear nothing for a while.
    may_wait = visible and after_version >= current and (keep_open or not final)
    outcome = streaming(
        stack.realtime_channel(),
        SUBSCRIBE,
        [request],
        stack.auth(who),
        response_type=realtime_service_pb2.SubscribeToRunResponse,
        first_only=True,
        timeout=0.5 if may_wait else DEADLINE,
    )
    if may_wait and outcome.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return
    assert_proper(outcome, f"SubscribeToRun({request!r}) as {who!r}")
    if visible:
        assert outcome.code is OK, str(outcome)
        if after_version < current:
            assert outcome.responses, "no version sent"
            first = outcome.responses[0].run
            assert first.id == run_id and first.version > after_version
        else:
            assert not outcome.responses
    else:
        assert outcome.code is not OK, f"{request!r} as {who!r} was served: {outcome}"
    if run_id in owner_env and who in ("dev", "prod") and owner_env[run_id] != who:
        assert outcome.code in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.INVALID_ARGUMENT,
        ), str(outcome)


@given(body=st.binary(max_size=300))
@FUZZ
def test_random_bytes_as_a_subscription_request_do_not_hurt_the_realtime_service(
    live_stack: Stack, body: bytes
) -> None:
    outcome = streaming(
        live_stack.realtime_channel(), SUBSCRIBE, [body], live_stack.auth("dev"), first_only=True
    )
    assert_proper(outcome, f"SubscribeToRun with raw body {body!r}")
    if not decodes(realtime_service_pb2.SubscribeToRunRequest, body):
        assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, str(outcome)
    # Still serving.
    alive = streaming(
        live_stack.realtime_channel(),
        SUBSCRIBE,
        [realtime_service_pb2.SubscribeToRunRequest(run_id="run_nope")],
        live_stack.auth("dev"),
    )
    assert alive.code is grpc.StatusCode.NOT_FOUND, str(alive)


def test_an_oversized_subscription_request_is_refused(live_stack: Stack) -> None:
    request = realtime_service_pb2.SubscribeToRunRequest(run_id="run_" + "x" * (MAX_MESSAGE_BYTES))
    outcome = streaming(live_stack.realtime_channel(), SUBSCRIBE, [request], live_stack.auth("dev"))
    assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED, str(outcome)


# -- SubscribeToRunsWithTag ------------------------------------------------------------------------


@given(
    tag=st.one_of(st.just("x"), st.just(""), task_id_ok, texts, st.just("t" * 129)),
    created_after=st.one_of(
        st.none(),
        any_timestamps,
        st.integers(-8 * 86400, 3600).map(lambda s: Timestamp(seconds=int(time.time()) + s)),
    ),
    after_versions=versions,
    resume_cursor=cursors,
    who=auths,
)
@FUZZ
def test_subscribe_to_runs_with_tag_with_random_fields_answers_properly(
    realtime_world: RealtimeWorld,
    tag: str,
    created_after: Timestamp | None,
    after_versions: dict[str, int],
    resume_cursor: int,
    who: str,
) -> None:
    w = realtime_world
    request = rtpb.SubscribeToRunsWithTagRequest(tag=tag, resume_cursor=resume_cursor)
    for key, version in after_versions.items():
        request.after_versions[w.resolve(key)] = version
    if created_after is not None:
        request.created_after.CopyFrom(created_after)
    now = int(time.time() * 1000)
    # Checked before the key, in any order; then the tag as the scheduler's filter.
    bad = set()
    if not tag:
        bad.add("tag")
    if created_after is not None and (
        not timestamp_ok(created_after) or created_after.ToMilliseconds() < now - SEVEN_DAYS_MS
    ):
        bad.add("created_after")
    if resume_cursor < 0:
        bad.add("resume_cursor")
    if _versions_bad(dict(request.after_versions)):
        bad.add("after_versions")
    if not bad and who in KEYS and (len(tag) > LIMITS.tag_length or "\x00" in tag):
        bad.add("tag")
    outcome = _subscribe(
        w,
        "SubscribeToRunsWithTag",
        request,
        who,
        rtpb.SubscribeToRunsWithTagResponse,
        quiet=not bad and who in KEYS,
    )
    what = f"SubscribeToRunsWithTag({request!r}) as {who!r}"
    near_window = False  # the 7-day bound, give or take: either answer is right
    if created_after is not None and timestamp_ok(created_after):
        near_window = abs(created_after.ToMilliseconds() - (now - SEVEN_DAYS_MS)) < 5000
    if near_window:
        return
    if bad:
        assert_proper(outcome, what)
        assert_refused(outcome, bad, what)
    elif who not in KEYS:
        assert_proper(outcome, what)
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not _silent(outcome):
        assert_proper(outcome, what)
        assert outcome.code is OK, f"{what}: {outcome}"
        for response in outcome.responses:
            assert tag in response.run.tags and w.env.get(response.run.id) == who, str(response)
    if (tag, who, created_after, resume_cursor) == ("x", "dev", None, 0) and not after_versions:
        assert outcome.code is OK and outcome.responses, f"{what}: no run with tag x: {outcome}"


# -- SubscribeToBatch ------------------------------------------------------------------------------


@given(
    batch=st.one_of(st.sampled_from(["@dev-batch", "@prod-batch", ""]), id_like("batch_"), texts),
    after_versions=versions,
    resume_cursor=cursors,
    who=auths,
)
@FUZZ
def test_subscribe_to_batch_with_random_fields_answers_properly(
    realtime_world: RealtimeWorld,
    batch: str,
    after_versions: dict[str, int],
    resume_cursor: int,
    who: str,
) -> None:
    w = realtime_world
    batch_id = w.resolve(batch)
    request = rtpb.SubscribeToBatchRequest(batch_id=batch_id, resume_cursor=resume_cursor)
    for key, version in after_versions.items():
        request.after_versions[w.resolve(key)] = version
    bad = set()
    if not batch_id:
        bad.add("batch_id")
    if resume_cursor < 0:
        bad.add("resume_cursor")
    if _versions_bad(dict(request.after_versions)):
        bad.add("after_versions")
    if not bad and who in KEYS and not BATCH_ID.fullmatch(batch_id):
        bad.add("batch_id")
    mine = w.env.get(batch_id) == who
    outcome = _subscribe(
        w,
        "SubscribeToBatch",
        request,
        who,
        rtpb.SubscribeToBatchResponse,
        quiet=not bad and mine,
    )
    what = f"SubscribeToBatch({request!r}) as {who!r}"
    if bad:
        assert_proper(outcome, what)
        assert_refused(outcome, bad, what)
    elif who not in KEYS:
        assert_proper(outcome, what)
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not mine:
        assert_proper(outcome, what)
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
        assert batch_id in outcome.details, str(outcome)
    elif not _silent(outcome):
        assert_proper(outcome, what)
        assert outcome.code is OK, f"{what}: {outcome}"
        for response in outcome.responses:
            assert response.run.batch_id == batch_id, str(response)
        if not after_versions and resume_cursor == 0:
            assert outcome.responses, f"{what}: the batch's runs were not sent"


# -- ReadStream ------------------------------------------------------------------------------------

run_refs = st.one_of(
    st.sampled_from(["@dev", "@dev-canceled", "@prod", ""]), id_like("run_"), texts
)
stream_ids = st.one_of(
    STREAM_ID_OK, st.sampled_from(["", "a" * 65, "a.b", "a b", "*", ">", "a\n"]), texts
)


@given(
    run=run_refs,
    stream_id=stream_ids,
    after_index=st.one_of(st.integers(-3, 5), int64),
    who=auths,
)
@FUZZ
def test_read_stream_with_random_fields_answers_properly(
    realtime_world: RealtimeWorld, run: str, stream_id: str, after_index: int, who: str
) -> None:
    w = realtime_world
    run_id = w.resolve(run)
    request = rtpb.ReadStreamRequest(run_id=run_id, stream_id=stream_id, after_index=after_index)
    bad = set()
    if not run_id:
        bad.add("run_id")
    elif not _stream_id_ok(stream_id):
        bad.add("stream_id")
    elif after_index < 0:
        bad.add("after_index")
    elif who in KEYS and not RUN_ID.fullmatch(run_id):
        bad.add("run_id")
    mine = w.env.get(run_id) == who
    outcome = _subscribe(
        w, "ReadStream", request, who, rtpb.ReadStreamResponse, quiet=not bad and mine
    )
    what = f"ReadStream({request!r}) as {who!r}"
    if bad:
        assert_proper(outcome, what)
        assert_refused(outcome, bad, what)
    elif who not in KEYS:
        assert_proper(outcome, what)
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not mine:
        assert_proper(outcome, what)
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
    elif not _silent(outcome) or run_id == w.ids["dev-canceled"]:
        # A finished run's stream ends by itself.
        assert_proper(outcome, what)
        assert outcome.code is OK, f"{what}: {outcome}"


def _stream_id_ok(value: str) -> bool:
    return 1 <= len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in value)


# -- AppendStream ----------------------------------------------------------------------------------


@given(
    run=run_refs,
    stream_id=stream_ids,
    chunks=st.one_of(
        st.lists(json_texts, max_size=4),
        st.lists(st.one_of(json_texts, texts), max_size=4),
        st.just([json.dumps("x" * (1024 * 1024))]),
    ),
    close=st.booleans(),
    chunk_ids=st.one_of(
        st.none(),
        st.lists(
            st.one_of(task_id_ok, texts, st.sampled_from(["a\r\nX: y", "\x00", " "])), max_size=5
        ),
    ),
    who=auths,
)
@FUZZ
def test_append_stream_with_random_fields_answers_properly(
    realtime_world: RealtimeWorld,
    run: str,
    stream_id: str,
    chunks: list[str],
    close: bool,
    chunk_ids: list[str] | None,
    who: str,
) -> None:
    w = realtime_world
    run_id = w.resolve(run)
    request = rtpb.AppendStreamRequest(
        run_id=run_id, stream_id=stream_id, chunks=chunks, close=close, chunk_ids=chunk_ids or []
    )
    what = f"AppendStream({run_id!r}, {stream_id!r}, {[c[:40] for c in chunks]}) as {who!r}"
    before = w.chunks_stored()
    outcome = unary(
        w.stack.realtime_channel(),
        RT + "AppendStream",
        request,
        w.stack.auth(who),
        rtpb.AppendStreamResponse,
    )
    assert_proper(outcome, what)
    if outcome.code is not OK:
        assert w.chunks_stored() == before, f"{what} refused, yet chunks were stored"
    bad = set()
    if not run_id:
        bad.add("run_id")
    elif not _stream_id_ok(stream_id):
        bad.add("stream_id")
    if bad:
        assert_refused(outcome, bad, what)
        return
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
        return
    if not RUN_ID.fullmatch(run_id):
        assert_refused(outcome, {"run_id"}, what)
    elif w.env.get(run_id) != who:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
    elif chunk_ids and len(chunk_ids) != len(chunks):
        assert_refused(outcome, {"chunk_ids"}, what)
    elif not all(json_ok(c, LIMITS.payload_bytes) for c in chunks):
        assert_refused(outcome, {"chunks"}, what)
    elif outcome.code is not OK:
        # An id a NATS header cannot carry, or a stream closed by an earlier example.
        assert outcome.code in (INVALID, FAILED_PRECONDITION), f"{what}: {outcome}"
        if outcome.code is INVALID:
            assert_refused(outcome, {"chunk_ids", "chunks"}, what)


@given(chunks=st.lists(json_texts, min_size=1, max_size=5), close=st.booleans())
@settings(FUZZ, max_examples=10)
def test_a_valid_append_is_read_back_in_order(
    realtime_world: RealtimeWorld, chunks: list[str], close: bool
) -> None:
    w = realtime_world
    run_id, stream_id = w.ids["dev-canceled"], uuid.uuid4().hex
    request = rtpb.AppendStreamRequest(
        run_id=run_id, stream_id=stream_id, chunks=chunks, close=close
    )
    outcome = unary(
        w.stack.realtime_channel(),
        RT + "AppendStream",
        request,
        w.stack.auth("dev"),
        rtpb.AppendStreamResponse,
    )
    assert outcome.code is OK, str(outcome)
    assert outcome.responses[0].last_index == len(chunks)
    read = streaming(
        w.stack.realtime_channel(),
        RT + "ReadStream",
        [rtpb.ReadStreamRequest(run_id=run_id, stream_id=stream_id)],
        w.stack.auth("dev"),
        response_type=rtpb.ReadStreamResponse,
    )
    assert read.code is OK, str(read)
    assert [(r.index, r.data) for r in read.responses] == list(enumerate(chunks, 1))


def test_a_stream_chunk_that_is_not_json_is_refused(realtime_world: RealtimeWorld) -> None:
    """Readers parse every chunk as JSON (the SDK and the SSE endpoint): a writer may not
    append anything else."""
    w = realtime_world
    request = rtpb.AppendStreamRequest(
        run_id=w.ids["dev"], stream_id="s", chunks=['"ok"', "not json"]
    )
    before = w.chunks_stored()
    outcome = unary(w.stack.realtime_channel(), RT + "AppendStream", request, w.stack.auth("dev"))
    assert_refused(outcome, {"chunks"}, "AppendStream with a chunk that is not JSON")
    assert outcome.violations[0][0] == "chunks[1]", str(outcome)
    assert w.chunks_stored() == before


def test_append_stream_with_an_odd_chunk_id_answers_properly(realtime_world: RealtimeWorld) -> None:
    """A chunk id travels in a NATS header: one it cannot carry is refused, not mangled; one it
    can makes a retry append nothing."""
    for chunk_id in ["a\r\nNats-Msg-Id: b", "\x00", "x" * 5000]:
        _append_with_id(realtime_world, chunk_id)


def _append_with_id(w: RealtimeWorld, chunk_id: str) -> None:
    stream_id = uuid.uuid4().hex
    request = rtpb.AppendStreamRequest(
        run_id=w.ids["dev-canceled"], stream_id=stream_id, chunks=['"a"'], chunk_ids=[chunk_id]
    )
    before = w.chunks_stored()
    outcome = unary(
        w.stack.realtime_channel(),
        RT + "AppendStream",
        request,
        w.stack.auth("dev"),
        rtpb.AppendStreamResponse,
    )
    assert_proper(outcome, f"AppendStream with chunk id {chunk_id[:40]!r}")
    if outcome.code is not OK:
        assert_refused(outcome, {"chunk_ids"}, f"chunk id {chunk_id[:40]!r}")
        assert w.chunks_stored() == before
        return
    assert outcome.responses[0].last_index == 1
    again = unary(
        w.stack.realtime_channel(),
        RT + "AppendStream",
        request,
        w.stack.auth("dev"),
        rtpb.AppendStreamResponse,
    )
    assert again.code is OK and again.responses[0].last_index == 1, str(again)  # a retry
    read = streaming(
        w.stack.realtime_channel(),
        RT + "ReadStream",
        [rtpb.ReadStreamRequest(run_id=w.ids["dev-canceled"], stream_id=stream_id)],
        w.stack.auth("dev"),
        response_type=rtpb.ReadStreamResponse,
    )
    assert [(r.index, r.data) for r in read.responses] == [(1, '"a"')], str(read)


def test_a_batch_subscription_with_a_public_token_needs_the_batch_in_its_scope(
    realtime_world: RealtimeWorld,
) -> None:
    w = realtime_world
    batch = w.ids["dev-batch"]

    def token(scope: str) -> tuple[tuple[str, str], ...]:
        minted = unary(
            w.stack.channel(),
            "/runplane.v1.AuthService/CreatePublicToken",
            apb.CreatePublicTokenRequest(scopes=[scope]),
            w.stack.auth("dev"),
            apb.CreatePublicTokenResponse,
        )
        assert minted.code is OK, str(minted)
        return (("authorization", f"Bearer {minted.responses[0].token}"),)

    request = rtpb.SubscribeToBatchRequest(batch_id=batch)
    for scope, wanted in (
        (f"read:batch:{batch}", OK),
        ("read:batch:batch_other", PERMISSION_DENIED),
    ):
        outcome = streaming(
            w.stack.realtime_channel(),
            RT + "SubscribeToBatch",
            [request],
            token(scope),
            response_type=rtpb.SubscribeToBatchResponse,
            first_only=True,
        )
        assert outcome.code is wanted, f"{scope}: {outcome}"
        if wanted is OK:
            assert outcome.responses[0].run.batch_id == batch
