"""Bad input, over real gRPC: random and malformed values for every field of every public RPC.

The scheduler (and, for SubscribeToRun, the realtime service) runs in this process on an event
loop of its own thread; the tests call it with plain synchronous gRPC from hypothesis examples, so
one server serves every example of a test. Every answer must come within a deadline, with a
proper status (never UNKNOWN or INTERNAL) and a message naming the problem, and a refused request
must leave the database as it was.

Unless a test needs JetStream, the scheduler's NATS URL points at a port nobody listens on: its
relay then never deletes outbox rows, so "no new outbox row" is an exact count.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from runplane.v1 import (
    meta_service_pb2,
    queue_service_pb2,
    realtime_service_pb2,
    run_pb2,
    worker_service_pb2_grpc,
)
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import worker_service_pb2 as wpb
from runplane_common.config import Limits, RealtimeSettings, SchedulerSettings
from runplane_common.grpcserver import MAX_MESSAGE_BYTES
from runplane_realtime.server import RealtimeService, serve
from runplane_scheduler.app import Scheduler, start_scheduler
from runplane_scheduler.keys import create_key
from runplane_scheduler.store import tables as db
from tests.helpers.ports import free_port

pytestmark = pytest.mark.timeout(300)

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 10.0  # every call answers within this
LIMITS = Limits()

OK = grpc.StatusCode.OK
# A refusal the caller can act on; UNKNOWN, INTERNAL, UNAVAILABLE or a missed deadline is a bug.
PROPER = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

FUZZ = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

RUN = "/runplane.v1.RunService/"
QUEUE = "/runplane.v1.QueueService/"
UNARY_METHODS: dict[str, type[Message]] = {
    RUN + "TriggerRun": rpb.TriggerRunRequest,
    RUN + "GetRun": rpb.GetRunRequest,
    RUN + "ListRuns": rpb.ListRunsRequest,
    RUN + "CancelRun": rpb.CancelRunRequest,
    RUN + "BatchTriggerRuns": rpb.BatchTriggerRunsRequest,
    RUN + "GetBatch": rpb.GetBatchRequest,
    RUN + "ReplayRun": rpb.ReplayRunRequest,
    RUN + "RescheduleRun": rpb.RescheduleRunRequest,
    RUN + "ResetIdempotencyKey": rpb.ResetIdempotencyKeyRequest,
    QUEUE + "ListQueues": queue_service_pb2.ListQueuesRequest,
    QUEUE + "GetQueue": queue_service_pb2.GetQueueRequest,
    QUEUE + "PauseQueue": queue_service_pb2.PauseQueueRequest,
    QUEUE + "ResumeQueue": queue_service_pb2.ResumeQueueRequest,
    QUEUE + "OverrideQueueConcurrencyLimit": queue_service_pb2.OverrideQueueConcurrencyLimitRequest,
    QUEUE + "ResetQueueConcurrencyLimit": queue_service_pb2.ResetQueueConcurrencyLimitRequest,
    "/runplane.v1.MetaService/GetServerInfo": meta_service_pb2.GetServerInfoRequest,
}
SUBSCRIBE = "/runplane.v1.RealtimeService/SubscribeToRun"
CONNECT = "/runplane.v1.WorkerService/Connect"


# -- the servers, on a loop of their own ---------------------------------------------------------


@dataclass
class Stack:
    """A scheduler (and optionally a realtime service) on an event loop in a background thread,
    with synchronous channels to them for the test thread."""

    database_url: str
    nats_url: str
    with_realtime: bool = False
    # More SchedulerSettings fields (a frozen schedule clock, say).
    options: dict[str, Any] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    scheduler: Scheduler | None = None
    realtime: RealtimeService | None = None
    keys: dict[str, str] = field(default_factory=dict)
    # Runs made by _some_runs, by name: "dev", "dev-canceled", "prod".
    ids: dict[str, str] = field(default_factory=dict)
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        threading.Thread(target=self.loop.run_forever, name="servers", daemon=True).start()
        self.scheduler = self.run(
            start_scheduler(
                SchedulerSettings(
                    database_url=self.database_url,
                    nats_url=self.nats_url,
                    listen="127.0.0.1:0",
                    **self.options,
                )
            )
        )
        for env in ("dev", "prod"):
            # Secret keys that may also execute: the tests play executors with them.
            self.keys[env] = self.run(create_key(self.scheduler.engine_db, env, execute=True))
        if self.with_realtime:
            self.realtime = self.run(
                serve(
                    RealtimeSettings(
                        nats_url=self.nats_url,
                        api_url=f"127.0.0.1:{self.scheduler.port}",
                        listen="127.0.0.1:0",
                        http_listen="127.0.0.1:0",
                    )
                )
            )

    def stop(self) -> None:
        for channel in self._channels.values():
            channel.close()
        if self.realtime is not None:
            self.run(self.realtime.stop())
        if self.scheduler is not None:
            self.run(self.scheduler.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)

    @property
    def api_url(self) -> str:
        assert self.scheduler is not None
        return f"127.0.0.1:{self.scheduler.port}"

    def channel(self, target: str | None = None) -> grpc.Channel:
        """One channel per target, for every call of the test."""
        target = target or self.api_url
        if target in self._channels:
            return self._channels[target]
        channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self._channels[target] = channel
        return channel

    def realtime_channel(self) -> grpc.Channel:
        assert self.realtime is not None
        return self.channel(f"127.0.0.1:{self.realtime.port}")

    def auth(self, who: str) -> tuple[tuple[str, str], ...]:
        """Metadata for a named key ('dev', 'prod'), none ('none'), or any other text as key."""
        if who == "none":
            return ()
        return (("authorization", f"Bearer {self.keys.get(who, who)}"),)

    def state(self) -> dict[str, int]:
        """Row counts of every table a request could change, and the runs' total version."""
        assert self.scheduler is not None
        engine = self.scheduler.engine_db

        async def count() -> dict[str, int]:
            out = {}
            async with engine.connect() as conn:
                for table in (db.runs, db.run_tags, db.attempts, db.outbox, db.timers):
                    stmt = select(func.count()).select_from(table)
                    out[table.name] = int((await conn.execute(stmt)).scalar_one())
                total = select(func.coalesce(func.sum(db.runs.c.version), 0))
                out["versions"] = int((await conn.execute(total)).scalar_one())
            return out

        return self.run(count())


def _start(
    database_url: str, nats_url: str, with_realtime: bool = False, **options: Any
) -> Iterator[Stack]:
    stack = Stack(database_url, nats_url, with_realtime, options)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def stack(database_url: str) -> Iterator[Stack]:
    """A scheduler whose relay cannot reach NATS (outbox rows stay: exact counts)."""
    yield from _start(database_url, f"nats://127.0.0.1:{free_port()}")


@pytest.fixture
def live_stack(database_url: str, nats_server: Any) -> Iterator[Stack]:
    """A scheduler and a realtime service on a real nats-server."""
    yield from _start(database_url, nats_server.url, with_realtime=True)


# -- outcomes ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[Any]
    violations: list[tuple[str, str]]

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details!r} {self.violations}"


def _failure(error: grpc.RpcError, responses: list[Any] | None = None) -> Outcome:
    violations = []
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError as mismatch:  # the details disagree with the status: report it
        raise AssertionError(f"grpc-status-details-bin does not match: {mismatch}") from None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [(v.field, v.description) for v in bad.field_violations]
    return Outcome(error.code(), error.details() or "", responses or [], violations)


def unary(
    channel: grpc.Channel,
    method: str,
    request: Any,
    metadata: tuple[tuple[str, str], ...] = (),
    response_type: type[Message] | None = None,
) -> Outcome:
    """Call a unary method; ``request`` is a message, or raw bytes sent as the body."""
    raw = isinstance(request, bytes)
    call = channel.unary_unary(
        method,
        request_serializer=None if raw else type(request).SerializeToString,
        response_deserializer=None if response_type is None else response_type.FromString,
    )
    try:
        response = call(request, metadata=metadata, timeout=DEADLINE)
    except grpc.RpcError as error:
        return _failure(error)
    return Outcome(OK, "", [response], [])


def streaming(
    channel: grpc.Channel,
    method: str,
    requests: list[Any],
    metadata: tuple[tuple[str, str], ...] = (),
    *,
    response_type: type[Message] | None = None,
    client_streaming: bool = False,
    first_only: bool = False,
    timeout: float = DEADLINE,
) -> Outcome:
    """Call a server-streaming (or bidi, with ``client_streaming``) method; collect the responses
    until the stream ends, or only the first with ``first_only``."""
    serializer = None
    if requests and not isinstance(requests[0], bytes):
        serializer = type(requests[0]).SerializeToString
    deserializer = None if response_type is None else response_type.FromString
    if client_streaming:
        call = channel.stream_stream(
            method, request_serializer=serializer, response_deserializer=deserializer
        )(iter(requests), metadata=metadata, timeout=timeout)
    else:
        call = channel.unary_stream(
            method, request_serializer=serializer, response_deserializer=deserializer
        )(requests[0], metadata=metadata, timeout=timeout)
    responses: list[Any] = []
    try:
        for response in call:
            responses.append(response)
            if first_only:
                call.cancel()
                return Outcome(OK, "", responses, [])
    except grpc.RpcError as error:
        return _failure(error, responses)
    return Outcome(OK, "", responses, [])


def assert_proper(outcome: Outcome, what: str) -> None:
    """The server answered in time with a status a caller can act on, explaining any refusal."""
    assert outcome.code is not grpc.StatusCode.DEADLINE_EXCEEDED, (
        f"{what}: no answer within {DEADLINE:g}s"
    )
    assert outcome.code in PROPER, f"{what}: improper status {outcome}"
    if outcome.code is OK:
        return
    assert len(outcome.details.strip()) >= 5, f"{what}: a refusal without a message: {outcome}"
    if outcome.code is grpc.StatusCode.INVALID_ARGUMENT:
        assert outcome.violations, f"{what}: INVALID_ARGUMENT names no field: {outcome}"
        name, description = outcome.violations[0]
        assert name and description, f"{what}: an empty field violation: {outcome}"
        assert name in outcome.details, f"{what}: the message does not name {name}: {outcome}"


def assert_unchanged(before: dict[str, int], after: dict[str, int], what: str) -> None:
    assert after == before, f"{what}: a refused request changed the database"


# -- strategies ----------------------------------------------------------------------------------

NASTY = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "run_\x00",
    "\n",
    "\x01\x7f",
    "run_",
    "run_" + "0" * 26,
    "run_" + "z" * 36,
    "run_" + "z" * 37,
    "run_é",
    "null",
    "{}",
    "[]",
    "'; DROP TABLE runs; --",
    "%s%s%n",
    "../../etc/passwd",
    "\u202egnp.exe",
    "😀" * 3,
    "\ufeff",
    "a" * 129,
    "é" * 200,
]
texts = st.one_of(st.text(st.characters(codec="utf-8"), max_size=200), st.sampled_from(NASTY))
task_id_ok = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:/-]{0,40}\Z")
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)
json_texts = json_values.map(lambda v: json.dumps(v, ensure_ascii=False))
# Any key: the two real ones, none at all, or printable text that is no key.
auths = st.one_of(
    st.sampled_from(["dev", "dev", "dev", "prod", "none"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60),
)


@st.composite
def trigger_requests(draw: st.DrawFn) -> rpb.TriggerRunRequest:
    """Any TriggerRunRequest: fields valid or not, independently."""
    options = rpb.TriggerOptions(
        queue=draw(st.one_of(st.just(""), task_id_ok, texts)),
        tags=draw(st.lists(st.one_of(task_id_ok, texts), max_size=12)),
        metadata=draw(st.one_of(st.just(""), json_texts, texts)),
        max_attempts=draw(st.one_of(st.integers(0, 300), int32)),
        idempotency_key=draw(st.one_of(st.just(""), texts, st.just("k" * 2049))),
        concurrency_key=draw(st.one_of(st.just(""), texts, st.just("c" * 257))),
        priority=draw(st.one_of(st.integers(0, 1000), int32)),
    )
    request = rpb.TriggerRunRequest(
        task_id=draw(st.one_of(task_id_ok, texts)),
        payload=draw(st.one_of(st.just(""), json_texts, texts)),
    )
    if draw(st.booleans()):
        request.options.CopyFrom(options)
    return request


@st.composite
def valid_trigger_requests(draw: st.DrawFn) -> rpb.TriggerRunRequest:
    """A TriggerRunRequest the API documents as valid."""
    return rpb.TriggerRunRequest(
        task_id=draw(task_id_ok),
        payload=draw(st.one_of(st.just(""), json_texts)),
        options=rpb.TriggerOptions(
            # A named queue must be defined by a registered task; none is here.
            queue="",
            tags=draw(st.lists(task_id_ok, max_size=LIMITS.tags)),
            metadata=draw(
                st.one_of(
                    st.just(""),
                    st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(json.dumps),
                )
            ),
            max_attempts=draw(st.integers(0, 250)),
            idempotency_key=draw(st.one_of(st.just(""), task_id_ok)),
            concurrency_key=draw(st.one_of(st.just(""), task_id_ok)),
            priority=draw(st.integers(0, 10_000)),
        ),
    )


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


# -- RunService.GetRun, CancelRun, ListRuns --------------------------------------------------------


def _some_runs(stack: Stack) -> dict[str, str]:
    """A pending and a cancelled run in dev, a pending one in prod: name -> run id. Made once
    per stack, so every example of a test sees the same runs."""
    if stack.ids:
        return stack.ids
    channel = stack.channel()
    ids = {}
    for name, env in (("dev", "dev"), ("dev-canceled", "dev"), ("prod", "prod")):
        out = unary(
            channel,
            RUN + "TriggerRun",
            rpb.TriggerRunRequest(
                task_id="t", payload='{"n": 1}', options=rpb.TriggerOptions(tags=["x"])
            ),
            stack.auth(env),
            rpb.TriggerRunResponse,
        )
        assert out.code is OK, str(out)
        ids[name] = out.responses[0].run.id
    out = unary(
        channel,
        RUN + "CancelRun",
        rpb.CancelRunRequest(run_id=ids["dev-canceled"]),
        stack.auth("dev"),
    )
    assert out.code is OK, str(out)
    stack.ids = ids
    return ids


run_ids = st.one_of(
    texts,
    st.sampled_from(["@dev", "@dev-canceled", "@prod"]),
    st.text("0123456789abcdefghjkmnpqrstvwxyz", min_size=26, max_size=26).map(lambda s: "run_" + s),
)


def _resolve(value: str, ids: dict[str, str]) -> str:
    return ids[value[1:]] if value.startswith("@") and value[1:] in ids else value


@given(data=st.data())
@FUZZ
def test_get_and_cancel_run_with_random_ids_answer_properly(
    stack: Stack, data: st.DataObject
) -> None:
    ids = _some_runs(stack)
    channel = stack.channel()
    method = data.draw(st.sampled_from(["GetRun", "CancelRun"]), label="method")
    run_id = _resolve(data.draw(run_ids, label="run_id"), ids)
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
    ids = _some_runs(stack)
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


# -- MetaService.GetServerInfo ---------------------------------------------------------------------


@given(who=auths)
@FUZZ
def test_get_server_info_answers_properly(stack: Stack, who: str) -> None:
    outcome = unary(
        stack.channel(),
        "/runplane.v1.MetaService/GetServerInfo",
        meta_service_pb2.GetServerInfoRequest(),
        stack.auth(who),
        meta_service_pb2.GetServerInfoResponse,
    )
    assert_proper(outcome, f"GetServerInfo as {who!r}")
    if who in ("dev", "prod"):
        assert outcome.code is OK, str(outcome)
        assert outcome.responses[0].environment == who
    else:
        assert outcome.code is grpc.StatusCode.UNAUTHENTICATED, str(outcome)


# -- raw bytes -------------------------------------------------------------------------------------


def _decodes(request_type: type[Message], body: bytes) -> bool:
    try:
        request_type.FromString(body)
    except DecodeError:
        return False
    return True


def _alive(stack: Stack) -> None:
    outcome = unary(
        stack.channel(),
        "/runplane.v1.MetaService/GetServerInfo",
        meta_service_pb2.GetServerInfoRequest(),
        stack.auth("dev"),
    )
    assert outcome.code is OK, f"the scheduler no longer answers: {outcome}"


@given(
    method=st.sampled_from(sorted(UNARY_METHODS)),
    body=st.one_of(
        st.binary(max_size=2000), st.binary(min_size=1, max_size=64).map(lambda b: b * 50)
    ),
    who=st.sampled_from(["dev", "none"]),
)
@FUZZ
def test_random_bytes_as_a_unary_request_body_do_not_hurt_the_scheduler(
    stack: Stack, method: str, body: bytes, who: str
) -> None:
    before = stack.state()
    outcome = unary(stack.channel(), method, body, stack.auth(who))
    assert_proper(outcome, f"{method} with raw body {body!r}")
    if not _decodes(UNARY_METHODS[method], body):
        assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, str(outcome)
    if outcome.code is not OK:
        assert_unchanged(before, stack.state(), f"{method} refused with {outcome}")
    _alive(stack)


UNDECODABLE = [b"\x00", b"\xff" * 8, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05abc"]


@pytest.mark.parametrize("method", sorted(UNARY_METHODS))
def test_an_undecodable_request_body_is_an_invalid_argument(stack: Stack, method: str) -> None:
    for body in UNDECODABLE:
        assert not _decodes(UNARY_METHODS[method], body)
        outcome = unary(stack.channel(), method, body, stack.auth("dev"))
        assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, f"{method} {body!r}: {outcome}"
        assert "parse" in outcome.details or "decode" in outcome.details.lower(), str(outcome)


@given(body=st.binary(max_size=500), more=st.lists(st.binary(max_size=200), max_size=3))
@FUZZ
def test_random_bytes_on_the_worker_stream_do_not_hurt_the_scheduler(
    stack: Stack, body: bytes, more: list[bytes]
) -> None:
    before = stack.state()
    outcome = streaming(
        stack.channel(), CONNECT, [body, *more], stack.auth("dev"), client_streaming=True
    )
    assert_proper(outcome, f"Connect with raw {body!r} then {more!r}")
    first_ok = _decodes(wpb.ConnectRequest, body)
    if not first_ok or wpb.ConnectRequest.FromString(body).WhichOneof("message") != "register":
        assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, str(outcome)
        assert_unchanged(before, stack.state(), "Connect without Register")
    _alive(stack)


# -- oversized messages and the payload limit -----------------------------------------------------


def test_a_request_over_the_message_limit_is_refused_before_parsing(stack: Stack) -> None:
    channel = stack.channel()
    before = stack.state()
    big = MAX_MESSAGE_BYTES + 1024
    # Valid protobuf, over the limit.
    request = rpb.TriggerRunRequest(task_id="t", payload=json.dumps("x" * big))
    outcome = unary(channel, RUN + "TriggerRun", request, stack.auth("dev"))
    assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED, str(outcome)
    assert "larger than max" in outcome.details.lower() or "exceed" in outcome.details.lower()
    # Bytes that would not even parse: refused for their size, so before parsing.
    junk = b"\xff" * big
    for method in UNARY_METHODS:
        outcome = unary(channel, method, junk, stack.auth("dev"))
        assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED, f"{method}: {outcome}"
    assert_unchanged(before, stack.state(), "oversized requests")
    _alive(stack)


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


# -- WorkerService.Connect -------------------------------------------------------------------------

not_register = st.one_of(
    st.just(wpb.ConnectRequest()),
    st.builds(lambda d: wpb.ConnectRequest(heartbeat=wpb.Heartbeat(draining=d)), st.booleans()),
    st.builds(lambda a: wpb.ConnectRequest(ack=wpb.AssignmentAck(attempt_id=a)), texts),
    st.builds(lambda a: wpb.ConnectRequest(started=wpb.AttemptStarted(attempt_id=a)), texts),
    st.builds(
        lambda a, o, lost: wpb.ConnectRequest(
            result=wpb.AttemptResult(attempt_id=a, output=o, lost=lost)
        ),
        texts,
        texts,
        st.booleans(),
    ),
)


@given(first=st.one_of(st.none(), not_register), who=st.sampled_from(["dev", "prod"]))
@FUZZ
def test_a_worker_stream_must_begin_with_register(
    stack: Stack, first: wpb.ConnectRequest | None, who: str
) -> None:
    before = stack.state()
    if first is None:
        outcome = _empty_connect(stack, who)
    else:
        outcome = streaming(
            stack.channel(),
            CONNECT,
            [first],
            stack.auth(who),
            response_type=wpb.ConnectResponse,
            client_streaming=True,
        )
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, str(outcome)
    assert_proper(outcome, "Connect without Register")
    assert "register" in outcome.details.lower(), str(outcome)
    assert not outcome.responses
    assert_unchanged(before, stack.state(), "Connect without Register")


def _empty_connect(stack: Stack, who: str) -> Outcome:
    """A worker stream whose client sends nothing and closes its side."""
    call = worker_service_pb2_grpc.WorkerServiceStub(stack.channel()).Connect(
        iter(()), metadata=stack.auth(who), timeout=DEADLINE
    )
    responses: list[Any] = []
    try:
        responses.extend(call)
    except grpc.RpcError as error:
        return _failure(error, responses)
    return Outcome(OK, "", responses, [])


# Manifests: sane values mostly, any value sometimes (NaN, infinities, duplicates, huge numbers).
floats = st.floats(allow_nan=True, allow_infinity=True)
retry_policies = st.builds(
    wpb.RetryPolicy,
    max_attempts=st.one_of(st.integers(0, 250), int32),
    factor=st.one_of(st.floats(0, 10), floats),
    min_timeout_seconds=st.one_of(st.floats(0, 100), floats),
    max_timeout_seconds=st.one_of(st.floats(0, 1000), floats),
    randomize=st.booleans(),
)
task_definitions = st.builds(
    wpb.TaskDefinition,
    queue=st.one_of(st.just(""), task_id_ok, texts),
    queue_concurrency_limit=st.one_of(st.integers(0, 1000), int32),
    retry=retry_policies,
    max_duration_seconds=st.one_of(st.floats(0, 1e6), floats),
    machine=st.one_of(st.sampled_from(["", "micro", "small-1x", "large-2x"]), texts),
    description=texts,
)
manifests = st.builds(
    lambda ids, defs, version: wpb.Manifest(
        tasks=[wpb.TaskDefinition(id=i, **_fields(d)) for i, d in zip(ids, defs, strict=False)],
        version=version,
    ),
    st.one_of(
        st.lists(task_id_ok, max_size=4, unique=True),
        st.lists(st.one_of(task_id_ok, texts), max_size=4),
    ),
    st.lists(task_definitions, min_size=4, max_size=4),
    texts,
)


def _fields(d: wpb.TaskDefinition) -> dict[str, Any]:
    return {f.name: v for f, v in d.ListFields()}


@given(
    register=st.builds(
        wpb.Register,
        executor_id=st.one_of(st.just(""), texts),
        manifest=manifests,
        capacity=int32,
        running_attempt_ids=st.lists(texts, max_size=3),
    ),
    then=st.lists(not_register, max_size=4),
    who=auths,
)
@FUZZ
def test_a_worker_stream_with_a_random_register_answers_properly(
    stack: Stack, register: wpb.Register, then: list[wpb.ConnectRequest], who: str
) -> None:
    before = stack.state()
    outcome = streaming(
        stack.channel(),
        CONNECT,
        [wpb.ConnectRequest(register=register), *then],
        stack.auth(who),
        response_type=wpb.ConnectResponse,
        client_streaming=True,
    )
    assert_proper(outcome, f"Connect with {register!r}")
    if who not in ("dev", "prod"):
        assert outcome.code is grpc.StatusCode.UNAUTHENTICATED, str(outcome)
    if outcome.code is OK:
        assert outcome.responses and outcome.responses[0].WhichOneof("message") == "registered"
    after = stack.state()
    # Registering changes task definitions only; no run, attempt or event comes of it.
    assert after == before, "a worker stream without runs changed runs"
    _alive(stack)


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
    ids = _some_runs(stack)
    run_id = _resolve(run_id, ids)
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
    if not _decodes(realtime_service_pb2.SubscribeToRunRequest, body):
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


# -- the CLI ---------------------------------------------------------------------------------------


def _cli(stack: Stack, *args: str, key: str = "dev") -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "sdk"), str(ROOT / "services"), str(ROOT)]),
        "RUNPLANE_API_URL": stack.api_url,
        "RUNPLANE_SECRET_KEY": stack.keys.get(key, key),
        "RUNPLANE_REALTIME_URL": "",
    }
    return subprocess.run(
        [sys.executable, "-m", "runplane", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _one_clear_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    assert result.stdout == "", f"nothing on stdout, got {result.stdout!r}"
    return lines[0]


@pytest.mark.parametrize("payload", ["{bad", "", "{'a': 1}", "[1,]"])
def test_cli_trigger_with_a_bad_payload_says_so_in_one_line(stack: Stack, payload: str) -> None:
    before = stack.state()
    line = _one_clear_line(_cli(stack, "trigger", "hello-world", "--payload", payload))
    assert "--payload" in line and "JSON" in line, line
    assert_unchanged(before, stack.state(), "runplane trigger with a bad payload")


def test_cli_trigger_of_a_bad_task_id_says_so_in_one_line(stack: Stack) -> None:
    before = stack.state()
    line = _one_clear_line(_cli(stack, "trigger", "nosuch-task-#!"))
    assert "task_id" in line and "nosuch-task-#!" in line, line
    assert_unchanged(before, stack.state(), "runplane trigger of a bad task id")


def test_cli_trigger_with_an_unknown_key_says_so_in_one_line(stack: Stack) -> None:
    line = _one_clear_line(_cli(stack, "trigger", "hello-world", key="rp_dev_nope"))
    assert "key" in line.lower(), line


# -- bugs these tests found, one deterministic case each ------------------------------------------


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


def _bad_manifests() -> dict[str, wpb.Manifest]:
    def one(**fields: Any) -> wpb.Manifest:
        return wpb.Manifest(tasks=[wpb.TaskDefinition(**{"id": "t", **fields})])

    return {
        "duplicate-task-ids": wpb.Manifest(
            tasks=[wpb.TaskDefinition(id="t"), wpb.TaskDefinition(id="t")]
        ),
        "empty-task-id": one(id=""),
        "task-id-not-a-task-id": one(id="no such #task"),
        "task-id-too-long": one(id="t" * 200),
        "huge-max-duration": one(max_duration_seconds=9.3e18),
        "nan-retry-factor": one(retry=wpb.RetryPolicy(max_attempts=3, factor=float("nan"))),
        "negative-max-attempts": one(retry=wpb.RetryPolicy(max_attempts=-5)),
        "machine-too-long": one(machine="m" * 100),
    }


@pytest.mark.parametrize("case", sorted(_bad_manifests()))
def test_a_register_with_a_bad_manifest_is_refused_as_invalid_argument(
    stack: Stack, case: str
) -> None:
    register = wpb.Register(manifest=_bad_manifests()[case], capacity=1)
    outcome = streaming(
        stack.channel(),
        CONNECT,
        [wpb.ConnectRequest(register=register)],
        stack.auth("dev"),
        response_type=wpb.ConnectResponse,
        client_streaming=True,
    )
    assert_proper(outcome, f"Connect with a bad manifest ({case})")
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, str(outcome)
    assert "manifest" in outcome.details, str(outcome)
