"""Bad input for the realtime service: the streaming RPCs ``test_bad_input`` leaves out
(SubscribeToRunsWithTag, SubscribeToBatch, ReadStream, AppendStream) and its HTTP endpoints (SSE
and trigger by URL).

Same harness as ``test_bad_input``: a scheduler and a realtime service on a real nats-server, on
an event loop of their own; plain synchronous gRPC and HTTP from hypothesis examples. Every
answer must come in time with a proper status and a message naming the problem, a refusal must
write nothing (no run, no stream chunk), and a valid request must be served. A valid subscription
may legitimately stay silent; only those get a short deadline that may pass.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from runplane.v1 import auth_service_pb2 as apb
from runplane.v1 import realtime_service_pb2 as rtpb
from runplane.v1 import run_service_pb2 as rpb
from runplane_common import subjects
from runplane_common.grpcserver import MAX_MESSAGE_BYTES
from tests.integration.test_bad_input import (
    DEADLINE,
    FUZZ,
    LIMITS,
    OK,
    RUN,
    Outcome,
    Stack,
    _some_runs,
    _start,
    assert_proper,
    auths,
    int64,
    json_texts,
    streaming,
    task_id_ok,
    texts,
    unary,
)
from tests.integration.test_bad_input_engine import (
    BATCH_ID,
    INVALID,
    NOT_FOUND,
    RUN_ID,
    UNAUTHENTICATED,
    _id_like,
    _refused,
    _timestamp_ok,
    any_timestamps,
)
from tests.integration.test_bad_input_more import _json_ok

pytestmark = pytest.mark.timeout(600)

RT = "/runplane.v1.RealtimeService/"
KEYS = ("dev", "prod")
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
SEVEN_DAYS_MS = 7 * 86_400_000
# A valid subscription that has nothing to send may stay silent this long.
QUIET = 0.5
STREAM_ID_OK = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")


@pytest.fixture
def live_stack(database_url: str, nats_server: Any) -> Iterator[Stack]:
    """A scheduler, and a realtime service with its HTTP port, on a real nats-server."""
    yield from _start(database_url, nats_server.url, with_realtime=True)


class World:
    """Runs (tag "x") and a batch in each environment."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.ids = dict(_some_runs(stack))
        self.env = {i: ("prod" if n == "prod" else "dev") for n, i in self.ids.items()}
        for who in KEYS:
            items = [rpb.BatchTriggerItem(task_id="t", payload=str(i)) for i in range(2)]
            out = unary(
                stack.channel(),
                RUN + "BatchTriggerRuns",
                rpb.BatchTriggerRunsRequest(items=items),
                stack.auth(who),
                rpb.BatchTriggerRunsResponse,
            )
            assert out.code is OK, str(out)
            self.ids[f"{who}-batch"] = out.responses[0].batch_id
            self.env[out.responses[0].batch_id] = who
            for run in out.responses[0].runs:
                self.env[run.id] = who

    def resolve(self, value: str) -> str:
        return self.ids.get(value[1:], value) if value.startswith("@") else value

    def chunks_stored(self) -> int:
        """Messages in the run streams' JetStream stream (0 before it exists)."""
        realtime = self.stack.realtime
        assert realtime is not None

        async def count() -> int:
            js = realtime.link.jetstream()
            try:
                info = await js.stream_info(subjects.RUN_STREAMS_STREAM)
            except Exception:  # not made yet
                return 0
            return int(info.state.messages)

        return self.stack.run(count())


@pytest.fixture
def world(live_stack: Stack) -> World:
    return World(live_stack)


def _subscribe(
    w: World, method: str, request: Any, who: str, response_type: Any, quiet: bool
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
    st.one_of(st.sampled_from(["@dev", "@prod"]), _id_like("run_"), texts),
    st.one_of(st.integers(-3, 5), int64),
    max_size=3,
)
cursors = st.one_of(st.just(0), st.integers(-5, 50), int64)


def _versions_bad(after_versions: dict[str, int]) -> bool:
    return any(v < 0 for v in after_versions.values())


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
    world: World,
    tag: str,
    created_after: Timestamp | None,
    after_versions: dict[str, int],
    resume_cursor: int,
    who: str,
) -> None:
    w = world
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
        not _timestamp_ok(created_after) or created_after.ToMilliseconds() < now - SEVEN_DAYS_MS
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
    if created_after is not None and _timestamp_ok(created_after):
        near_window = abs(created_after.ToMilliseconds() - (now - SEVEN_DAYS_MS)) < 5000
    if near_window:
        return
    if bad:
        assert_proper(outcome, what)
        _refused(outcome, bad, what)
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
    batch=st.one_of(st.sampled_from(["@dev-batch", "@prod-batch", ""]), _id_like("batch_"), texts),
    after_versions=versions,
    resume_cursor=cursors,
    who=auths,
)
@FUZZ
def test_subscribe_to_batch_with_random_fields_answers_properly(
    world: World, batch: str, after_versions: dict[str, int], resume_cursor: int, who: str
) -> None:
    w = world
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
        _refused(outcome, bad, what)
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
    st.sampled_from(["@dev", "@dev-canceled", "@prod", ""]), _id_like("run_"), texts
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
    world: World, run: str, stream_id: str, after_index: int, who: str
) -> None:
    w = world
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
        _refused(outcome, bad, what)
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
    world: World,
    run: str,
    stream_id: str,
    chunks: list[str],
    close: bool,
    chunk_ids: list[str] | None,
    who: str,
) -> None:
    w = world
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
        _refused(outcome, bad, what)
        return
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
        return
    if not RUN_ID.fullmatch(run_id):
        _refused(outcome, {"run_id"}, what)
    elif w.env.get(run_id) != who:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
    elif chunk_ids and len(chunk_ids) != len(chunks):
        _refused(outcome, {"chunk_ids"}, what)
    elif not all(_json_ok(c, LIMITS.payload_bytes) for c in chunks):
        _refused(outcome, {"chunks"}, what)
    elif outcome.code is not OK:
        # An id a NATS header cannot carry, or a stream closed by an earlier example.
        assert outcome.code in (INVALID, FAILED_PRECONDITION), f"{what}: {outcome}"
        if outcome.code is INVALID:
            _refused(outcome, {"chunk_ids", "chunks"}, what)


@given(chunks=st.lists(json_texts, min_size=1, max_size=5), close=st.booleans())
@settings(FUZZ, max_examples=10)
def test_a_valid_append_is_read_back_in_order(world: World, chunks: list[str], close: bool) -> None:
    w = world
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


# -- the HTTP endpoints ----------------------------------------------------------------------------


def _http(
    w: World, method: str, target: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and (for a refusal) the body; an SSE stream is left after its headers."""
    realtime = w.stack.realtime
    assert realtime is not None
    connection = http.client.HTTPConnection("127.0.0.1", realtime.http_port, timeout=DEADLINE)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        got = dict(response.getheaders())
        data = (
            b""
            if response.status == 200 and "event-stream" in got.get("Content-Type", "")
            else response.read()
        )
        return response.status, got, data
    finally:
        connection.close()


def _error_of(status: int, data: bytes, what: str) -> dict[str, Any]:
    body = json.loads(data)
    error: dict[str, Any] = body["error"]
    assert len(error["message"]) >= 5, f"{what}: {status} {body}"
    return error


HTTP_OK = {200, 400, 401, 403, 404, 405, 409, 413}


def _header_safe(value: str) -> str:
    return value.encode("latin-1", "replace").decode("latin-1").replace("\r", "").replace("\n", "")


@given(
    kind=st.sampled_from(["run", "tag", "batch", "stream"]),
    ref=st.one_of(st.sampled_from(["@dev", "@prod", "@dev-canceled", "@dev-batch"]), texts),
    query=st.dictionaries(
        st.sampled_from(
            [
                "after_version",
                "resume_cursor",
                "after_index",
                "created_after",
                "tag",
                "keep_open",
                "token",
            ]
        ),
        st.one_of(st.integers(-5, 10).map(str), st.just("9" * 30), st.just("x"), texts),
        max_size=3,
    ),
    last_event_id=st.one_of(st.none(), st.sampled_from(["1", "\u00b2", "-1", "9" * 30, "x"])),
    who=auths,
)
@FUZZ
def test_sse_endpoints_with_random_requests_answer_properly(
    world: World,
    kind: str,
    ref: str,
    query: dict[str, str],
    last_event_id: str | None,
    who: str,
) -> None:
    w = world
    value = quote(w.resolve(ref), safe="")
    path = {
        "run": f"/realtime/v1/runs/{value}",
        "tag": "/realtime/v1/runs",
        "batch": f"/realtime/v1/batches/{value}",
        "stream": f"/realtime/v1/streams/{quote(w.ids['dev-canceled'])}/{value}",
    }[kind]
    if kind == "tag":
        query = {"tag": w.resolve(ref), **query}
    target = path + ("?" + urlencode(query) if query else "")
    headers = {}
    if who != "none":
        headers["Authorization"] = "Bearer " + _header_safe(w.stack.keys.get(who, who))
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    what = f"GET {target[:200]} as {who!r} (Last-Event-ID {last_event_id!r})"
    status, _, data = _http(w, "GET", target, headers)
    assert status in HTTP_OK, f"{what}: {status} {data[:300]!r}"
    if status == 200:
        return
    if status == 404 and not data.startswith(b"{"):
        return  # no such route (aiohttp's own answer)
    error = _error_of(status, data, what)
    if status == 400:
        assert error.get("field"), f"{what}: a 400 that names no field: {error}"


TRIGGER_BODIES = st.one_of(
    st.builds(
        lambda payload, options: json.dumps({"payload": payload, "options": options}).encode(),
        st.one_of(st.none(), json_texts.map(json.loads)),
        st.one_of(
            st.just({}),
            st.dictionaries(
                st.sampled_from(
                    [
                        "tags",
                        "delay",
                        "ttl",
                        "priority",
                        "maxAttempts",
                        "metadata",
                        "queue",
                        "nope",
                        "idempotencyKey",
                        "debounce",
                    ]
                ),
                st.one_of(
                    st.integers(-(2**40), 2**40),
                    st.text(max_size=20),
                    st.lists(st.text(max_size=5), max_size=3),
                    st.none(),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
                ),
                max_size=3,
            ),
            st.sampled_from(["x", 1, [], None]),
        ),
    ),
    st.binary(max_size=200),
    st.sampled_from([b"", b"[]", b"null", b'{"options": 5}', b"{", b'{"payload": 1e400}']),
)


@given(task=st.one_of(task_id_ok, texts), body=TRIGGER_BODIES, who=auths)
@FUZZ
def test_trigger_by_url_with_random_requests_answers_properly(
    world: World, task: str, body: bytes, who: str
) -> None:
    w = world
    headers = {"Content-Type": "application/json"}
    if who != "none":
        headers["Authorization"] = "Bearer " + _header_safe(w.stack.keys.get(who, who))
    target = f"/api/v1/tasks/{quote(task, safe='')}/trigger"
    what = f"POST {target} {body[:200]!r} as {who!r}"
    before = _rows(w)
    status, _, data = _http(w, "POST", target, headers, body)
    assert status in HTTP_OK, f"{what}: {status} {data[:300]!r}"
    if status == 200:
        answer = json.loads(data)
        assert RUN_ID.fullmatch(answer["id"]) and answer["run"]["task_id"] == task
        assert who in KEYS
        return
    assert _rows(w) == before, f"{what} refused, yet rows changed"
    if status == 404 and not data.startswith(b"{"):
        return  # a task id that is no path
    error = _error_of(status, data, what)
    if who not in KEYS:  # the body's shape is checked first, then the key
        assert status in (400, 401), f"{what}: {status} {error}"
    if status == 400:
        assert error.get("field"), f"{what}: a 400 that names no field: {error}"


def _rows(w: World) -> dict[str, int]:
    """Row counts a trigger changes (the relay drains the outbox meanwhile: not counted)."""
    state = w.stack.state()
    return {k: state[k] for k in ("runs", "run_tags", "attempts", "versions")}


def test_a_stream_chunk_that_is_not_json_is_refused(world: World) -> None:
    """Readers parse every chunk as JSON (the SDK and the SSE endpoint): a writer may not
    append anything else."""
    w = world
    request = rtpb.AppendStreamRequest(
        run_id=w.ids["dev"], stream_id="s", chunks=['"ok"', "not json"]
    )
    before = w.chunks_stored()
    outcome = unary(w.stack.realtime_channel(), RT + "AppendStream", request, w.stack.auth("dev"))
    _refused(outcome, {"chunks"}, "AppendStream with a chunk that is not JSON")
    assert outcome.violations[0][0] == "chunks[1]", str(outcome)
    assert w.chunks_stored() == before


def test_append_stream_with_an_odd_chunk_id_answers_properly(world: World) -> None:
    """A chunk id travels in a NATS header: one it cannot carry is refused, not mangled; one it
    can makes a retry append nothing."""
    for chunk_id in ["a\r\nNats-Msg-Id: b", "\x00", "x" * 5000]:
        _append_with_id(world, chunk_id)


def _append_with_id(w: World, chunk_id: str) -> None:
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
        _refused(outcome, {"chunk_ids"}, f"chunk id {chunk_id[:40]!r}")
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
    world: World,
) -> None:
    w = world
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


def test_oversized_requests_are_refused_by_their_size(world: World) -> None:
    w = world
    before, chunks = _rows(w), w.chunks_stored()
    big = json.dumps("x" * MAX_MESSAGE_BYTES)
    request = rtpb.AppendStreamRequest(run_id=w.ids["dev"], stream_id="big", chunks=[big])
    outcome = unary(w.stack.realtime_channel(), RT + "AppendStream", request, w.stack.auth("dev"))
    assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED, str(outcome)
    # HTTP: a trigger body over the payload limit and 1 MiB for options, whatever its content.
    headers = {"Authorization": f"Bearer {w.stack.keys['dev']}"}
    over = LIMITS.payload_bytes + (1 << 20) + 1
    for body in (json.dumps({"payload": "x" * over}).encode(), b"\xff" * over):
        status, _, _ = _http(w, "POST", "/api/v1/tasks/t/trigger", headers, body)
        assert status == 413, status
    assert (_rows(w), w.chunks_stored()) == (before, chunks)
    # A payload the API takes is taken by URL too (it is over aiohttp's default of 1 MiB).
    legal = json.dumps({"payload": "x" * (LIMITS.payload_bytes - 100)}).encode()
    status, _, data = _http(w, "POST", "/api/v1/tasks/t/trigger", headers, legal)
    assert status == 200, (status, data[:300])
