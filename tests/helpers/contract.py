"""The contract tests' harness: real servers on a loop of their own, called with plain gRPC.

The scheduler (and, where a test needs it, the realtime service) runs in this process on an event
loop of its own thread; the tests call it with plain synchronous gRPC from hypothesis examples, so
one server serves every example of a test. This module owns that stack (``Stack``,
``start_stack``), the calls and what they came to (``unary``, ``streaming``, ``Outcome``), and the
checks every contract test makes: an answer within ``DEADLINE`` with a proper status
(``assert_proper``), a refusal naming the field at fault (``assert_refused``), and a database
left as it was (``assert_unchanged``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, settings
from sqlalchemy import func, select

from runplane.v1 import meta_service_pb2
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import worker_service_pb2 as wpb
from runplane_common.config import Limits, RealtimeSettings, SchedulerSettings
from runplane_realtime.server import RealtimeService, serve
from runplane_scheduler.app import Scheduler, start_scheduler
from runplane_scheduler.keys import create_key
from runplane_scheduler.store import tables as db

T = TypeVar("T")

DEADLINE = 10.0  # every call answers within this
LIMITS = Limits()
KEYS = ("dev", "prod")  # the two environments' secret keys every stack has

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
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

# Method paths, by service.
RUN = "/runplane.v1.RunService/"
QUEUE = "/runplane.v1.QueueService/"
AUTH = "/runplane.v1.AuthService/"
SCHED = "/runplane.v1.ScheduleService/"
WAIT = "/runplane.v1.WaitpointService/"
RT = "/runplane.v1.RealtimeService/"
SUBSCRIBE = RT + "SubscribeToRun"
CONNECT = "/runplane.v1.WorkerService/Connect"

# The tasks a stack's environments know (a trigger of any other task is INVALID_ARGUMENT).
TRIGGERABLE = ("t",)


# -- the servers, on a loop of their own -----------------------------------------------------------


@dataclass
class Stack:
    """A scheduler (and optionally a realtime service) on an event loop in a background thread,
    with synchronous channels to them for the test thread."""

    database_url: str
    nats_url: str
    with_realtime: bool = False
    # Tasks an executor registers in both environments at start, so runs of them are accepted.
    tasks: tuple[str, ...] = TRIGGERABLE
    # More SchedulerSettings fields (a frozen schedule clock, say).
    options: dict[str, Any] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    scheduler: Scheduler | None = None
    realtime: RealtimeService | None = None
    keys: dict[str, str] = field(default_factory=dict)
    # Runs made by some_runs, by name: "dev", "dev-canceled", "prod".
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

        if self.tasks:
            for env in ("dev", "prod"):
                register_tasks(self, env, [wpb.TaskDefinition(id=t) for t in self.tasks])

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


def register_tasks(stack: Stack, who: str, tasks: list[wpb.TaskDefinition]) -> None:
    """An executor connects with ``tasks``, then goes away (its task definitions stay)."""
    register = wpb.Register(manifest=wpb.Manifest(tasks=tasks), capacity=1)
    outcome = streaming(
        stack.channel(),
        CONNECT,
        [wpb.ConnectRequest(register=register)],
        stack.auth(who),
        response_type=wpb.ConnectResponse,
        client_streaming=True,
        first_only=True,
    )
    assert outcome.code is OK and outcome.responses, str(outcome)
    assert outcome.responses[0].WhichOneof("message") == "registered", str(outcome)


def start_stack(
    database_url: str,
    nats_url: str,
    with_realtime: bool = False,
    tasks: tuple[str, ...] = TRIGGERABLE,
    **options: Any,
) -> Iterator[Stack]:
    """A started ``Stack`` for the length of a fixture; ``options`` are more SchedulerSettings."""
    stack = Stack(database_url, nats_url, with_realtime, tasks, options)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


# -- outcomes --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[Any]
    violations: list[tuple[str, str]]

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details!r} {self.violations}"


def outcome_of(error: grpc.RpcError, responses: list[Any] | None = None) -> Outcome:
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
        return outcome_of(error)
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
        return outcome_of(error, responses)
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


def assert_refused(outcome: Outcome, fields: set[str], what: str) -> None:
    """INVALID_ARGUMENT naming one of ``fields`` (a field, or a part of one)."""
    assert outcome.code is INVALID, f"{what}: expected INVALID_ARGUMENT, got {outcome}"
    named = outcome.violations[0][0]
    assert any(named == f or named.startswith((f + ".", f + "[")) for f in fields), (
        f"{what}: expected a violation of one of {sorted(fields)}, got {outcome}"
    )


# -- the world's principals and runs ---------------------------------------------------------------


class Calls:
    """Unary calls on a stack, as any principal of the world."""

    stack: Stack

    def call(
        self, method: str, request: Message, who: str, response_type: type[Message] | None = None
    ) -> Outcome:
        return unary(self.stack.channel(), method, request, self.stack.auth(who), response_type)

    def ok(self, method: str, request: Message, who: str, response_type: type[Message]) -> Any:
        outcome = self.call(method, request, who, response_type)
        assert outcome.code is OK, f"{method}({request!r}) as {who}: {outcome}"
        return outcome.responses[0]


def other_env(who: str) -> str:
    """The other environment's key name."""
    return "prod" if who == "dev" else "dev"


def some_runs(stack: Stack) -> dict[str, str]:
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


def decodes(request_type: type[Message], body: bytes) -> bool:
    """Whether ``body`` parses as a ``request_type``."""
    try:
        request_type.FromString(body)
    except DecodeError:
        return False
    return True


def assert_alive(stack: Stack) -> None:
    """The scheduler still answers a plain request."""
    outcome = unary(
        stack.channel(),
        "/runplane.v1.MetaService/GetServerInfo",
        meta_service_pb2.GetServerInfoRequest(),
        stack.auth("dev"),
    )
    assert outcome.code is OK, f"the scheduler no longer answers: {outcome}"
