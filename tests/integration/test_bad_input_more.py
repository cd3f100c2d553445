"""Bad input, over real gRPC and HTTP, for the scheduler's RPCs the other bad-input modules leave
out: UpdateRunMetadata, AddRunTags, ListRunLogs, AuthService, ScheduleService, WaitpointService
and the HTTP endpoint that completes wait tokens by URL.

Same harness as ``test_bad_input``: a real scheduler on a loop of its own, plain synchronous gRPC
from hypothesis examples, one server for every example of a test. Every answer must be proper
(never UNKNOWN, INTERNAL or a hang), a refusal must name the field at fault, a refused request
must leave the rows it could touch exactly as they were, and a valid request must be accepted.
The schedule clock is all but frozen, so no schedule fires while a test runs and schedule rows
compare exactly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import queue
import re
import socket
import time
import uuid
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Table, select

from runplane.v1 import auth_service_pb2 as apb
from runplane.v1 import meta_service_pb2 as mpb
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import schedule_service_pb2 as spb
from runplane.v1 import waitpoint_service_pb2 as wspb
from runplane.v1 import worker_service_pb2 as wpb
from runplane_scheduler.store import tables as db
from tests.helpers.ports import free_port
from tests.helpers.wait import eventually
from tests.integration.test_bad_input import (
    CONNECT,
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
    int32,
    json_texts,
    json_values,
    run_ids,
    streaming,
    task_id_ok,
    texts,
    unary,
)
from tests.integration.test_bad_input_engine import (
    FAILED_PRECONDITION,
    INVALID,
    NOT_FOUND,
    RUN_ID,
    TASK_ID,
    UNAUTHENTICATED,
    Calls,
    _duration_ms,
    _id_like,
    _other,
    _refused,
    _timestamp_ok,
    _token,
    any_durations,
    any_timestamps,
    page_tokens,
)

pytestmark = pytest.mark.timeout(600)

PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
AUTH = "/runplane.v1.AuthService/"
SCHED = "/runplane.v1.ScheduleService/"
WAIT = "/runplane.v1.WaitpointService/"
KEYS = ("dev", "prod")
THIRTY_DAYS_MS = 30 * 86_400_000
SCHEDULE_ID = re.compile(r"sched_[0-9a-z]{1,36}")
TOKEN_ID = re.compile(r"waitpoint_[0-9a-z]{1,36}")

# Tasks the executors register: one each, and in dev one with a declarative schedule.
TASKS = {"dev": "sched-task", "prod": "sched-ptask"}
DECLARED = "declared-task"


def _key_or_field(outcome: Outcome, who: str, fields: set[str], what: str) -> None:
    """A request with bad fields: refused naming one, or (a bad key) UNAUTHENTICATED."""
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    else:
        _refused(outcome, fields, what)


# -- the world -------------------------------------------------------------------------------------


@dataclass(repr=False)
class World(Calls):
    stack: Stack
    runs: dict[str, str] = field(default_factory=dict)  # name -> id ("dev", "dev-canceled", ...)
    run_env: dict[str, str] = field(default_factory=dict)  # id -> environment
    schedules: dict[str, str] = field(default_factory=dict)  # name -> id
    schedule_env: dict[str, str] = field(default_factory=dict)  # id -> environment
    tokens: dict[str, str] = field(default_factory=dict)  # name -> id
    token_env: dict[str, str] = field(default_factory=dict)  # id -> environment
    secrets: dict[str, str] = field(default_factory=dict)  # token id -> the secret of its URL

    def __repr__(self) -> str:
        return f"World({self.runs}, {self.schedules}, {self.tokens})"

    def resolve(self, value: str) -> str:
        """'@name' stands for a run, schedule or token of the world."""
        if not value.startswith("@"):
            return value
        name = value[1:]
        return self.runs.get(name) or self.schedules.get(name) or self.tokens.get(name) or value

    def rows(self, *tables: Table) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of ``tables``, in key order."""
        assert self.stack.scheduler is not None
        engine = self.stack.scheduler.engine_db

        async def read() -> dict[str, list[tuple[Any, ...]]]:
            out = {}
            async with engine.connect() as conn:
                for table in tables:
                    stmt = select(table).order_by(*table.primary_key.columns)
                    out[table.name] = [tuple(r) for r in (await conn.execute(stmt)).all()]
            return out

        return self.stack.run(read())


def _register(stack: Stack, who: str, tasks: list[wpb.TaskDefinition]) -> None:
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


@pytest.fixture
def stack(database_url: str) -> Iterator[Stack]:
    """A scheduler whose relay cannot reach NATS, on a schedule clock that all but stands still."""
    yield from _start(
        database_url,
        f"nats://127.0.0.1:{free_port()}",
        schedule_clock_speed=1e-6,
        schedule_clock_epoch_ms=int(time.time() * 1000),
    )


@pytest.fixture
def world(stack: Stack) -> World:
    w = World(stack)
    for name, run_id in _some_runs(stack).items():
        w.runs[name] = run_id
        w.run_env[run_id] = "prod" if name == "prod" else "dev"
    declared = wpb.TaskDefinition(
        id=DECLARED, schedule=wpb.DeclarativeSchedule(cron="0 9 * * 1-5", timezone="Europe/London")
    )
    _register(stack, "dev", [wpb.TaskDefinition(id=TASKS["dev"]), declared])
    _register(stack, "prod", [wpb.TaskDefinition(id=TASKS["prod"])])
    for who in KEYS:
        request = spb.CreateScheduleRequest(
            task_id=TASKS[who], cron="0 * * * *", deduplication_key="dedup-1"
        )
        got = w.ok(SCHED + "CreateSchedule", request, who, spb.CreateScheduleResponse)
        w.schedules[who] = got.schedule.id
        w.schedule_env[got.schedule.id] = who
    listed = w.ok(
        SCHED + "ListSchedules", spb.ListSchedulesRequest(), "dev", spb.ListSchedulesResponse
    )
    [decl] = [s for s in listed.schedules if s.task_id == DECLARED]
    w.schedules["declared"] = decl.id
    w.schedule_env[decl.id] = "dev"
    for who in KEYS:
        token_request = wspb.CreateTokenRequest(idempotency_key="tok-1", tags=["x"])
        got = w.ok(WAIT + "CreateToken", token_request, who, wspb.CreateTokenResponse)
        w.tokens[who] = got.token.id
        w.token_env[got.token.id] = who
        w.secrets[got.token.id] = got.token.url.rsplit("secret=", 1)[1]
    return w


def _run_row(w: World, run_id: str) -> Any:
    """The run's row as stored (None if there is none)."""
    assert w.stack.scheduler is not None
    engine = w.stack.scheduler.engine_db

    async def read() -> Any:
        async with engine.connect() as conn:
            stmt = select(db.runs).where(db.runs.c.id == run_id)
            return (await conn.execute(stmt)).first()

    return w.stack.run(read())


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
    # Python reads 1e400 as inf; the server refuses it (no JSON number is infinite).
    return "Infinity" not in json.dumps(parsed)


@given(run_ref=run_ids, metadata=metadata_texts, who=auths)
@FUZZ
def test_update_run_metadata_with_random_fields_answers_properly(
    world: World, run_ref: str, metadata: str, who: str
) -> None:
    w = world
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
        _refused(outcome, bad, what)
    elif w.run_env.get(run_id) != who:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        run = outcome.responses[0].run
        assert json.loads(run.metadata) == json.loads(metadata or "{}")
        stored = _run_row(w, run_id)
        assert stored is not None
        assert json.loads(stored._mapping["metadata"]) == json.loads(metadata or "{}")


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
    world: World, run_ref: str, tags: list[str], who: str
) -> None:
    w = world
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
        _refused(outcome, bad, what)
    elif w.run_env.get(run_id) != who:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
    else:
        wanted = current + [t for t in dict.fromkeys(tags) if t not in current]
        if len(wanted) > LIMITS.tags:
            _refused(outcome, {"tags"}, what)
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
    world: World, run_ref: str, page_size: int, page_token: str, who: str
) -> None:
    w = world
    run_id = w.resolve(run_ref)
    request = rpb.ListRunLogsRequest(run_id=run_id, page_size=page_size, page_token=page_token)
    what = f"ListRunLogs({request!r}) as {who!r}"
    outcome = w.call(RUN + "ListRunLogs", request, who, rpb.ListRunLogsResponse)
    assert_proper(outcome, what)
    token_ok = page_token == "" or _decoded(page_token).startswith("log_")
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not RUN_ID.fullmatch(run_id):
        _refused(outcome, {"run_id"}, what)
    elif not 0 <= page_size <= 1000:
        _refused(outcome, {"page_size"}, what)
    elif not token_ok or outcome.code is INVALID:
        _refused(outcome, {"page_token"}, what)
    elif w.run_env.get(run_id) != who:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
        assert run_id in outcome.details, str(outcome)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        assert not outcome.responses[0].entries  # no executor ran anything


def _decoded(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:
        return ""


def test_list_run_logs_of_another_environments_run_is_not_found(world: World) -> None:
    w = world
    for who, run in (("dev", w.runs["prod"]), ("prod", w.runs["dev"])):
        outcome = w.call(RUN + "ListRunLogs", rpb.ListRunLogsRequest(run_id=run), who)
        assert outcome.code is NOT_FOUND, f"ListRunLogs({run}) as {who}: {outcome}"
        get = w.call(RUN + "GetRun", rpb.GetRunRequest(run_id=run), who)
        assert get.code is NOT_FOUND, str(get)
    mine = w.call(RUN + "ListRunLogs", rpb.ListRunLogsRequest(run_id=w.runs["dev"]), "dev")
    assert mine.code is OK, str(mine)


# -- AuthService.CreatePublicToken -----------------------------------------------------------------

SCOPE_KINDS = ("read:runs", "read:tags", "read:batch", "trigger:tasks", "write:waitpoints")
good_scopes = st.builds(
    lambda kind, value: f"{kind}:{value}",
    st.sampled_from(SCOPE_KINDS),
    task_id_ok,
)
scope_lists = st.one_of(
    st.lists(good_scopes, min_size=1, max_size=4),
    st.lists(st.one_of(good_scopes, texts), max_size=4),
    st.lists(
        st.sampled_from(
            [
                "read:runs:",
                "read:runs:a b",
                "write:runs:x",
                "read:runs:\x00",
                "READ:runs:x",
                "read:runs:x\n",
            ]
        ),
        min_size=1,
        max_size=2,
    ),
)


def _scope_ok(scope: str) -> bool:
    """The documented shape: a kind, then a resource of 1..256 characters, none blank or a
    control character."""
    kind = next((k for k in SCOPE_KINDS if scope.startswith(k + ":")), None)
    if kind is None:
        return False
    value = scope[len(kind) + 1 :]
    return 1 <= len(value) <= 256 and not any(
        c.isspace() or ord(c) < 32 or c == "\x7f" for c in value
    )


@given(
    scopes=scope_lists,
    expires_in=st.one_of(st.none(), any_durations),
    expires_at=st.one_of(
        st.none(),
        any_timestamps,
        st.integers(-3600, 40 * 86400).map(lambda s: Timestamp(seconds=int(time.time()) + s)),
    ),
    single_use=st.booleans(),
    who=auths,
)
@FUZZ
def test_create_public_token_with_random_fields_answers_properly(
    world: World,
    scopes: list[str],
    expires_in: Duration | None,
    expires_at: Timestamp | None,
    single_use: bool,
    who: str,
) -> None:
    w = world
    request = apb.CreatePublicTokenRequest(scopes=scopes, single_use=single_use)
    if expires_in is not None:
        request.expires_in.CopyFrom(expires_in)
    if expires_at is not None:
        request.expires_at.CopyFrom(expires_at)
    what = f"CreatePublicToken({request!r}) as {who!r}"
    before = w.rows(db.used_public_tokens)
    now = int(time.time() * 1000)
    outcome = w.call(AUTH + "CreatePublicToken", request, who, apb.CreatePublicTokenResponse)
    assert_proper(outcome, what)
    assert w.rows(db.used_public_tokens) == before
    bad = set()
    if not scopes or not all(_scope_ok(s) for s in scopes):
        bad.add("scopes")
    elif expires_in is not None and expires_at is not None:
        bad.add("expires_at")
    elif expires_at is not None:
        if not _timestamp_ok(expires_at) or not 0 < expires_at.ToMilliseconds() - now <= (
            THIRTY_DAYS_MS
        ):
            bad.add("expires_at")
    elif expires_in is not None:
        ms = _duration_ms(expires_in)
        if ms is None or not 0 < ms <= THIRTY_DAYS_MS:
            bad.add("expires_in")
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
        return
    # Times a few ms either side of a bound may go either way.
    near = False
    if expires_at is not None and _timestamp_ok(expires_at):
        left = expires_at.ToMilliseconds() - now
        near = min(abs(left - b) for b in (0, THIRTY_DAYS_MS)) < 5000
    if near and bad <= {"expires_at"}:
        if outcome.code is not OK:
            _refused(outcome, {"expires_at"}, what)
    elif bad:
        _refused(outcome, bad, what)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        response: apb.CreatePublicTokenResponse = outcome.responses[0]
        token = response.token
        if response.expires_at.ToMilliseconds() - int(time.time() * 1000) < 60_000:
            return  # it may expire before it is used
        # The token works, for its own environment.
        info = unary(
            w.stack.channel(),
            "/runplane.v1.MetaService/GetServerInfo",
            mpb.GetServerInfoRequest(),
            (("authorization", f"Bearer {token}"),),
            mpb.GetServerInfoResponse,
        )
        assert info.code is OK and info.responses[0].environment == who, str(info)


@given(scopes=st.lists(good_scopes, min_size=1, max_size=3), minutes=st.integers(1, 60 * 24 * 30))
@settings(FUZZ, max_examples=20)
def test_a_valid_public_token_request_is_accepted(
    world: World, scopes: list[str], minutes: int
) -> None:
    request = apb.CreatePublicTokenRequest(scopes=scopes, expires_in=Duration(seconds=minutes * 60))
    got = world.ok(AUTH + "CreatePublicToken", request, "dev", apb.CreatePublicTokenResponse)
    assert got.token.count(".") == 2 and got.expires_at.seconds > time.time()


# -- ScheduleService -------------------------------------------------------------------------------

VALID_CRONS = [
    "* * * * *",
    "0 9 * * 1-5",
    "*/15 * * * *",
    "0 0 L * *",
    "0 0 * * 5L",
    "30 2 * * *",
    "0 0 29 2 *",
    "0 0 29 2 1",
    "5,10,15 1-3 */2 JAN-MAR MON,FRI",
    "0 0 ? * SUN",
]
BAD_CRONS = [
    "",
    "60 * * * *",
    "* 24 * * *",
    "* * * * * *",
    "* * * *",
    "L * * * *",
    "*/0 * * * *",
    "5-1 * * * *",
    "0 0 31 2 *",
    "0 0 30 2 *",
    "@daily",
    "\u0663 * * * *",
    "\u00b2 * * * *",
    "* * * * 8",
    "1,,2 * * * *",
    "0 0 * * L",
    "* * * * *\x00",
    "9" * 40 + " * * * *",
    " ".join(["*"] * 200),
]
TIMEZONES = ["UTC", "Europe/London", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
BAD_TIMEZONES = [
    "utc",
    "Europe/Nowhere",
    "../../etc/passwd",
    "Europe/London\x00",
    "+05:00",
    "GMT+25",
]
# Parsed or refused, either is right: a step longer than its range means its first value.
ODD_CRONS = ["*/" + "9" * 40 + " * * * *", "0/59 * * * *"]
cron_texts = st.one_of(
    st.sampled_from(VALID_CRONS), st.sampled_from(BAD_CRONS), st.sampled_from(ODD_CRONS), texts
)
timezone_texts = st.one_of(
    st.just(""), st.sampled_from(TIMEZONES), st.sampled_from(BAD_TIMEZONES), texts
)
short_texts = st.one_of(st.just(""), task_id_ok, texts, st.just("e" * 257), st.just("a\x00b"))
schedule_refs = st.one_of(
    st.sampled_from(["@dev", "@prod", "@declared"]), _id_like("sched_"), texts
)


def _tz_ok(value: str) -> bool:
    return (
        value == "" or value in TIMEZONES or (value not in BAD_TIMEZONES and _known_timezone(value))
    )


def _known_timezone(value: str) -> bool:
    return value in zoneinfo.available_timezones()


def _text_ok(value: str) -> bool:
    return len(value) <= 256 and "\x00" not in value


def _schedule_rows(w: World) -> dict[str, list[tuple[Any, ...]]]:
    return w.rows(db.schedules, db.runs)


@given(
    task=st.one_of(st.sampled_from(["@dev", "@prod", "@declared"]), task_id_ok, texts),
    cron=cron_texts,
    timezone=timezone_texts,
    external_id=short_texts,
    dedup=st.one_of(st.just("dedup-1"), short_texts),
    who=auths,
)
@FUZZ
def test_create_schedule_with_random_fields_answers_properly(
    world: World, task: str, cron: str, timezone: str, external_id: str, dedup: str, who: str
) -> None:
    w = world
    task = {"@dev": TASKS["dev"], "@prod": TASKS["prod"], "@declared": DECLARED}.get(task, task)
    request = spb.CreateScheduleRequest(
        task_id=task, cron=cron, timezone=timezone, external_id=external_id, deduplication_key=dedup
    )
    what = f"CreateSchedule({request!r}) as {who!r}"
    before = _schedule_rows(w)
    outcome = w.call(SCHED + "CreateSchedule", request, who, spb.CreateScheduleResponse)
    assert_proper(outcome, what)
    if outcome.code is not OK:
        assert _schedule_rows(w) == before, f"{what} refused, yet rows changed"
    mine = {"dev": {TASKS["dev"], DECLARED}, "prod": {TASKS["prod"]}}.get(who, set())
    bad = set()
    if task not in mine:
        bad.add("task_id")
    elif cron in BAD_CRONS:
        bad.add("cron")
    elif cron in VALID_CRONS and not _tz_ok(timezone):
        bad.add("timezone")
    elif cron in VALID_CRONS and not _text_ok(external_id):
        bad.add("external_id")
    elif cron in VALID_CRONS and not _text_ok(dedup):
        bad.add("deduplication_key")
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif bad:
        _refused(outcome, bad, what)
    elif cron not in VALID_CRONS:  # random text: parsed or refused, naming the cron
        if outcome.code is not OK:
            _refused(outcome, {"cron", "timezone", "external_id", "deduplication_key"}, what)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
    if outcome.code is OK:
        response: spb.CreateScheduleResponse = outcome.responses[0]
        got = response.schedule
        assert (got.task_id, got.timezone, got.external_id) == (
            task,
            timezone or "UTC",
            external_id,
        )
        assert got.active and got.type == spb.SCHEDULE_TYPE_IMPERATIVE
        assert response.created == (not dedup or got.id not in w.schedule_env), str(response)
        if dedup == "dedup-1":
            assert got.id == w.schedules[who]
        w.schedule_env[got.id] = who
        theirs = w.call(
            SCHED + "GetSchedule", spb.GetScheduleRequest(schedule_id=got.id), _other(who)
        )
        assert theirs.code is NOT_FOUND, str(theirs)
        assert _schedule_rows(w)["runs"] == before["runs"]  # nothing fires


SCHEDULE_ID_METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "GetSchedule": (spb.GetScheduleRequest, spb.GetScheduleResponse),
    "DeleteSchedule": (spb.DeleteScheduleRequest, spb.DeleteScheduleResponse),
    "ActivateSchedule": (spb.ActivateScheduleRequest, spb.ActivateScheduleResponse),
    "DeactivateSchedule": (spb.DeactivateScheduleRequest, spb.DeactivateScheduleResponse),
}


@given(method=st.sampled_from(sorted(SCHEDULE_ID_METHODS)), ref=schedule_refs, who=auths)
@FUZZ
def test_schedule_calls_with_random_ids_answer_properly(
    world: World, method: str, ref: str, who: str
) -> None:
    w = world
    schedule_id = w.resolve(ref)
    request_type, response_type = SCHEDULE_ID_METHODS[method]
    what = f"{method}({schedule_id!r}) as {who!r}"
    before = _schedule_rows(w)
    outcome = w.call(SCHED + method, request_type(schedule_id=schedule_id), who, response_type)
    assert_proper(outcome, what)
    if outcome.code is not OK or method == "GetSchedule":
        assert _schedule_rows(w) == before, f"{what}: rows changed"
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not SCHEDULE_ID.fullmatch(schedule_id):
        _refused(outcome, {"schedule_id"}, what)
    elif w.schedule_env.get(schedule_id) != who:
        assert outcome.code in (NOT_FOUND, INVALID), f"{what}: {outcome}"
        if outcome.code is INVALID:
            _refused(outcome, {"schedule_id"}, what)
    elif schedule_id == w.schedules["declared"] and method != "GetSchedule":
        assert outcome.code is FAILED_PRECONDITION, f"{what}: {outcome}"
        assert "declarative" in outcome.details, str(outcome)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        got = outcome.responses[0].schedule
        assert got.id == schedule_id
        if method == "DeleteSchedule":
            del w.schedule_env[schedule_id]
            assert not got.active
        elif method == "ActivateSchedule":
            assert got.active and got.HasField("next_run")
        elif method == "DeactivateSchedule":
            assert not got.active and not got.HasField("next_run")


@given(
    ref=schedule_refs,
    task=st.one_of(st.just(""), st.sampled_from(["@dev", "@prod"]), task_id_ok, texts),
    cron=st.one_of(st.just(""), cron_texts),
    timezone=timezone_texts,
    external_id=st.one_of(st.none(), short_texts),
    who=auths,
)
@FUZZ
def test_update_schedule_with_random_fields_answers_properly(
    world: World,
    ref: str,
    task: str,
    cron: str,
    timezone: str,
    external_id: str | None,
    who: str,
) -> None:
    w = world
    schedule_id = w.resolve(ref)
    task = {"@dev": TASKS["dev"], "@prod": TASKS["prod"]}.get(task, task)
    request = spb.UpdateScheduleRequest(
        schedule_id=schedule_id, task_id=task, cron=cron, timezone=timezone
    )
    if external_id is not None:
        request.external_id = external_id
    what = f"UpdateSchedule({request!r}) as {who!r}"
    before = _schedule_rows(w)
    outcome = w.call(SCHED + "UpdateSchedule", request, who, spb.UpdateScheduleResponse)
    assert_proper(outcome, what)
    if outcome.code is not OK:
        assert _schedule_rows(w) == before, f"{what} refused, yet rows changed"
    mine = {"dev": {TASKS["dev"], DECLARED}, "prod": {TASKS["prod"]}}.get(who, set())
    bad = set()
    if not SCHEDULE_ID.fullmatch(schedule_id):
        bad.add("schedule_id")
    elif task and task not in mine:
        bad.add("task_id")
    elif cron in BAD_CRONS and cron:
        bad.add("cron")
    elif cron in ("", *VALID_CRONS) and timezone and not _tz_ok(timezone):
        bad.add("timezone")
    elif cron in ("", *VALID_CRONS) and external_id is not None and not _text_ok(external_id):
        bad.add("external_id")
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif bad:
        _refused(outcome, bad, what)
    elif cron not in ("", *VALID_CRONS) and outcome.code is INVALID:
        _refused(outcome, {"cron", "timezone", "external_id", "schedule_id"}, what)
    elif w.schedule_env.get(schedule_id) != who:
        assert outcome.code in (NOT_FOUND, INVALID), f"{what}: {outcome}"
    elif schedule_id == w.schedules["declared"]:
        assert outcome.code is FAILED_PRECONDITION, f"{what}: {outcome}"
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        got = outcome.responses[0].schedule
        if task:
            assert got.task_id == task
        if timezone:
            assert got.timezone == timezone
        if external_id is not None:
            assert got.external_id == external_id


@given(
    task_ids=st.lists(
        st.one_of(st.sampled_from(list(TASKS.values())), task_id_ok, texts), max_size=3
    ),
    page_size=st.one_of(st.integers(0, 5), int32),
    token=page_tokens("sched_"),
    who=auths,
)
@FUZZ
def test_list_schedules_with_random_fields_answers_properly(
    world: World, task_ids: list[str], page_size: int, token: str, who: str
) -> None:
    w = world
    request = spb.ListSchedulesRequest(task_ids=task_ids, page_size=page_size, page_token=token)
    what = f"ListSchedules({request!r}) as {who!r}"
    before = _schedule_rows(w)
    outcome = w.call(SCHED + "ListSchedules", request, who, spb.ListSchedulesResponse)
    assert_proper(outcome, what)
    assert _schedule_rows(w) == before
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not 0 <= page_size <= LIMITS.page_size:
        _refused(outcome, {"page_size"}, what)
    elif not all(TASK_ID.fullmatch(t) for t in task_ids):
        _refused(outcome, {"task_ids"}, what)
    elif (token and not _decoded(token).startswith("sched_")) or outcome.code is not OK:
        _refused(outcome, {"page_token"}, what)
    else:
        got = outcome.responses[0].schedules
        assert all(w.schedule_env.get(s.id) == who for s in got), str(got)
        assert len(got) <= (page_size or 25)
        if task_ids:
            assert all(s.task_id in task_ids for s in got)


@given(exclude_utc=st.booleans(), who=auths)
@settings(FUZZ, max_examples=10)
def test_list_timezones_answers_properly(world: World, exclude_utc: bool, who: str) -> None:
    outcome = world.call(
        SCHED + "ListTimezones",
        spb.ListTimezonesRequest(exclude_utc=exclude_utc),
        who,
        spb.ListTimezonesResponse,
    )
    assert_proper(outcome, f"ListTimezones as {who!r}")
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, str(outcome)
        return
    assert outcome.code is OK, str(outcome)
    names = list(outcome.responses[0].timezones)
    assert names == sorted(names) and "Europe/London" in names
    assert ("UTC" in names) is not exclude_utc


@given(
    cron=st.sampled_from(VALID_CRONS),
    timezone=st.sampled_from(["", *TIMEZONES]),
    external_id=st.one_of(st.just(""), task_id_ok),
    keyed=st.booleans(),
)
@settings(FUZZ, max_examples=30)
def test_a_valid_schedule_is_accepted_and_found(
    world: World, cron: str, timezone: str, external_id: str, keyed: bool
) -> None:
    w = world
    dedup = uuid.uuid4().hex if keyed else ""
    request = spb.CreateScheduleRequest(
        task_id=TASKS["dev"],
        cron=cron,
        timezone=timezone,
        external_id=external_id,
        deduplication_key=dedup,
    )
    got = w.ok(SCHED + "CreateSchedule", request, "dev", spb.CreateScheduleResponse)
    assert got.created and got.schedule.cron == cron
    assert got.schedule.next_run.seconds > 0
    found = w.ok(
        SCHED + "GetSchedule",
        spb.GetScheduleRequest(schedule_id=got.schedule.id),
        "dev",
        spb.GetScheduleResponse,
    )
    assert found.schedule == got.schedule


# -- WaitpointService ------------------------------------------------------------------------------


def _token_rows(w: World) -> dict[str, list[tuple[Any, ...]]]:
    """The waitpoint rows and timers (no token here is due within the test)."""
    return w.rows(db.waitpoints, db.timers, db.runs)


token_durations = st.one_of(
    st.integers(3600_000, 30 * 86_400_000).map(lambda ms: Duration(seconds=ms // 1000)),
    any_durations.filter(
        lambda d: (_duration_ms(d) or 0) == 0 or (_duration_ms(d) or 0) > 3600_000
    ),
    st.builds(Duration, seconds=st.integers(-100, -1)),
    st.builds(Duration, nanos=st.integers(1, 999_999)),  # under the 1 ms minimum
)


@given(
    timeout=st.one_of(st.none(), token_durations),
    key=st.one_of(
        st.just(""), st.just("tok-1"), texts, st.just("k" * (LIMITS.idempotency_key_length + 1))
    ),
    key_ttl=st.one_of(st.none(), any_durations),
    tags=st.one_of(
        st.lists(task_id_ok, max_size=3),
        st.lists(st.one_of(task_id_ok, texts), max_size=12),
    ),
    who=auths,
)
@FUZZ
def test_create_token_with_random_fields_answers_properly(
    world: World,
    timeout: Duration | None,
    key: str,
    key_ttl: Duration | None,
    tags: list[str],
    who: str,
) -> None:
    w = world
    request = wspb.CreateTokenRequest(idempotency_key=key, tags=tags)
    if timeout is not None:
        request.timeout.CopyFrom(timeout)
    if key_ttl is not None:
        request.idempotency_key_ttl.CopyFrom(key_ttl)
    what = f"CreateToken({request!r}) as {who!r}"
    before = _token_rows(w)
    outcome = w.call(WAIT + "CreateToken", request, who, wspb.CreateTokenResponse)
    assert_proper(outcome, what)
    if outcome.code is not OK:
        assert _token_rows(w) == before, f"{what} refused, yet rows changed"
    bad = set()
    if len(tags) > LIMITS.tags or any(
        not t or len(t) > LIMITS.tag_length or "\x00" in t for t in tags
    ):
        bad.add("tags")
    elif len(key) > LIMITS.idempotency_key_length or "\x00" in key:
        bad.add("idempotency_key")
    elif timeout is not None and not (_duration_ms(timeout) or 0) >= 1:
        bad.add("timeout")
    elif key_ttl is not None and (_duration_ms(key_ttl) or 0) < 1000:
        bad.add("idempotency_key_ttl")
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif bad:
        _refused(outcome, bad, what)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        response: wspb.CreateTokenResponse = outcome.responses[0]
        token = response.token
        if key == "tok-1":
            assert response.is_cached and token.id == w.tokens[who]
        elif not key:
            assert not response.is_cached
        assert response.is_cached or list(token.tags) == tags
        w.token_env[token.id] = who
        w.secrets[token.id] = token.url.rsplit("secret=", 1)[1]
        theirs = w.call(WAIT + "GetToken", wspb.GetTokenRequest(token_id=token.id), _other(who))
        assert theirs.code is NOT_FOUND, str(theirs)


token_refs = st.one_of(st.sampled_from(["@dev", "@prod"]), _id_like("waitpoint_"), texts)
token_data = st.one_of(
    st.just(""),
    json_texts,
    texts,
    st.sampled_from(["{", "[1,]", "NaN", "1e400", '"\\u0000"']),
    st.just(json.dumps("x" * LIMITS.payload_bytes)),
)


def _json_ok(value: str, limit: int) -> bool:
    if len(value.encode()) > limit:
        return False
    try:
        parsed = json.loads(value or "null", parse_constant=lambda c: 1 / 0)
    except (ValueError, ZeroDivisionError):
        return False
    return "Infinity" not in json.dumps(parsed)


@given(
    method=st.sampled_from(["GetToken", "CompleteToken"]),
    ref=token_refs,
    data=token_data,
    who=auths,
)
@FUZZ
def test_get_and_complete_token_with_random_fields_answer_properly(
    world: World, method: str, ref: str, data: str, who: str
) -> None:
    w = world
    token_id = w.resolve(ref)
    if method == "GetToken":
        request: Message = wspb.GetTokenRequest(token_id=token_id)
        response_type: type[Message] = wspb.GetTokenResponse
    else:
        request, response_type = (
            wspb.CompleteTokenRequest(token_id=token_id, data=data),
            wspb.CompleteTokenResponse,
        )
    what = f"{method}({token_id!r}, {data[:60]!r}) as {who!r}"
    before = _token_rows(w)
    outcome = w.call(WAIT + method, request, who, response_type)
    assert_proper(outcome, what)
    if outcome.code is not OK or method == "GetToken":
        assert _token_rows(w) == before, f"{what}: rows changed"
    well_formed = TOKEN_ID.fullmatch(token_id)
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not well_formed:
        _refused(outcome, {"token_id"}, what)
    elif method == "CompleteToken" and not _json_ok(data, LIMITS.payload_bytes):
        _refused(outcome, {"data"}, what)
    elif w.token_env.get(token_id) != who:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        token = outcome.responses[0].token
        assert token.id == token_id
        if method == "CompleteToken":
            assert token.status == wspb.WAITPOINT_STATUS_COMPLETED


@given(
    statuses=st.lists(st.one_of(st.integers(0, 3), int32), max_size=3),
    tags=st.lists(st.one_of(st.just("x"), task_id_ok, texts, st.just("a\x00")), max_size=12),
    key=st.one_of(
        st.just(""),
        st.just("tok-1"),
        texts,
        st.just("k" * (LIMITS.idempotency_key_length + 1)),
        st.just("a\x00"),
    ),
    page_size=st.one_of(st.integers(0, 5), int32),
    token=st.one_of(st.just(""), texts, _id_like("waitpoint_").map(_token)),
    who=auths,
)
@FUZZ
def test_list_tokens_with_random_fields_answers_properly(
    world: World,
    statuses: list[int],
    tags: list[str],
    key: str,
    page_size: int,
    token: str,
    who: str,
) -> None:
    w = world
    request = wspb.ListTokensRequest(
        tags=tags, idempotency_key=key, page_size=page_size, page_token=token
    )
    request.statuses.extend(statuses)  # type: ignore[arg-type]
    what = f"ListTokens({request!r}) as {who!r}"
    before = _token_rows(w)
    outcome = w.call(WAIT + "ListTokens", request, who, wspb.ListTokensResponse)
    assert_proper(outcome, what)
    assert _token_rows(w) == before
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not 0 <= page_size <= LIMITS.page_size:
        _refused(outcome, {"page_size"}, what)
    elif any(not 1 <= s <= 3 for s in statuses):
        _refused(outcome, {"statuses"}, what)
    elif outcome.code is not OK:
        _refused(outcome, {"tags", "idempotency_key", "page_token"}, what)
        if (
            token == ""
            and len(tags) <= LIMITS.tags
            and all(t and len(t) <= LIMITS.tag_length and "\x00" not in t for t in tags)
        ):
            assert len(key) > LIMITS.idempotency_key_length or "\x00" in key, what
    else:
        got = outcome.responses[0].tokens
        assert all(w.token_env.get(t.id) == who for t in got), str(got)
        if key == "tok-1":
            assert [t.id for t in got] in ([w.tokens[who]], []), str(got)


# -- the token completion endpoint (HTTP) ----------------------------------------------------------


def _http(w: World, raw: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``raw`` to the scheduler's HTTP port; the status and JSON body of its answer."""
    assert w.stack.scheduler is not None
    port = int(w.stack.scheduler.http_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode()
    assert status_line.startswith("HTTP/1.1 "), f"not an HTTP answer: {answer[:200]!r}"
    return int(status_line.split()[1]), json.loads(body)


def _post(
    path: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x"]
    all_headers = {"Content-Length": str(len(body)), **(headers or {})}
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def _completion_path(token_id: str, secret: str) -> str:
    return f"/api/v1/waitpoints/tokens/{token_id}/complete?secret={quote(secret)}"


@given(
    ref=token_refs,
    secret=st.one_of(st.just("@right"), texts, st.just("")),
    body=st.one_of(
        json_texts.map(str.encode),
        st.binary(max_size=300),
        st.sampled_from([b"", b"{", b"\xff\xfe", b"1e400", b"[" * 2000, b"9" * 400]),
    ),
    method=st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE", "post"]),
)
@FUZZ
def test_token_completion_by_url_with_random_requests_answers_properly(
    world: World, ref: str, secret: str, body: bytes, method: str
) -> None:
    w = world
    token_id = w.resolve(ref)
    if secret == "@right":
        secret = w.secrets.get(token_id, "nope")
    path = _completion_path(token_id, secret)
    before = _token_rows(w)
    status, answer = _http(w, _post(path, body, method=method))
    what = f"{method} {path[:120]} with {body[:60]!r}"
    assert status in (200, 400, 404, 405, 413), f"{what}: {status} {answer}"
    if status != 200:
        assert isinstance(answer.get("error"), str) and len(answer["error"]) >= 5, answer
        assert _token_rows(w) == before, f"{what} refused, yet rows changed"
    right = w.secrets.get(token_id) == secret and secret
    if (
        method == "POST"
        and right
        and _json_ok(body.decode("utf-8", "replace"), LIMITS.payload_bytes)
        and _utf8(body)
    ):
        assert status == 200, f"{what}: {status} {answer}"
        assert answer["id"] == token_id and answer["status"] == "COMPLETED"
    elif status == 200:
        assert method == "POST" and right, f"{what} was served: {answer}"


def _utf8(body: bytes) -> bool:
    try:
        body.decode()
    except UnicodeDecodeError:
        return False
    return True


COMPLETE = b"POST /api/v1/waitpoints/tokens/waitpoint_x/complete HTTP/1.1\r\n"
RAW_REQUESTS = [
    b"",
    b"\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"POST\r\n\r\n",
    b"POST /x\r\n\r\n",
    b"\xff\xfe\xfd /\xff HTTP/1.1\r\n\r\n",
    COMPLETE + b"Content-Length: -5\r\n\r\n",
    COMPLETE + b"Content-Length: abc\r\n\r\n",
    COMPLETE + b"Content-Length: \xb2\r\n\r\n",
    COMPLETE + b"Content-Length: 5_0\r\n\r\n",
    COMPLETE + b"Content-Length: 99999999999\r\n\r\n",
    COMPLETE + b"Content-Length: 10\r\n\r\n{}",
    b"POST /api/v1/waitpoints/tokens/waitpoint_x/complete?secret=%ZZ HTTP/1.1\r\n\r\n",
    b"POST /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + b"X: y\r\n" * 10_000 + b"\r\n",
]


def test_malformed_http_requests_get_a_clear_http_error(world: World) -> None:
    w = world
    before = _token_rows(w)
    for raw in RAW_REQUESTS:
        status, answer = _http(w, raw)
        assert status in (400, 404, 405, 413), f"{raw[:100]!r}: {status} {answer}"
        assert isinstance(answer.get("error"), str) and len(answer["error"]) >= 5, answer
    assert _token_rows(w) == before


def test_an_oversized_completion_body_is_refused_by_its_size(world: World) -> None:
    w = world
    token_id = w.tokens["dev"]
    path = _completion_path(token_id, w.secrets[token_id])
    before = _token_rows(w)
    # The declared length alone is refused, before any of the body is read.
    head = _post(path, b"", {"Content-Length": str(3 * 1024 * 1024 + 1)})
    status, answer = _http(w, head)
    assert status in (400, 413) and "bytes" in answer["error"], (status, answer)
    assert _token_rows(w) == before
    status, answer = _http(w, _post(path, b'{"approved": true}'))
    assert status == 200, answer
    got = w.ok(
        WAIT + "GetToken", wspb.GetTokenRequest(token_id=token_id), "dev", wspb.GetTokenResponse
    )
    assert got.token.status == wspb.WAITPOINT_STATUS_COMPLETED
    assert json.loads(got.token.output) == {"approved": True}


# -- bugs these tests found, one deterministic case each ------------------------------------------


def _nul_cases() -> dict[str, tuple[str, Message, str]]:
    return {
        "list-tokens-key": (
            WAIT + "ListTokens",
            wspb.ListTokensRequest(idempotency_key="a\x00"),
            "idempotency_key",
        ),
        "list-tokens-tag": (WAIT + "ListTokens", wspb.ListTokensRequest(tags=["\x00"]), "tags"),
        "create-token-key": (
            WAIT + "CreateToken",
            wspb.CreateTokenRequest(idempotency_key="\x00"),
            "idempotency_key",
        ),
        "schedule-external-id": (
            SCHED + "CreateSchedule",
            spb.CreateScheduleRequest(task_id=TASKS["dev"], cron="* * * * *", external_id="\x00"),
            "external_id",
        ),
        "public-token-scope": (
            AUTH + "CreatePublicToken",
            apb.CreatePublicTokenRequest(scopes=["read:runs:\x00"]),
            "scopes",
        ),
        "add-tags": (
            RUN + "AddRunTags",
            rpb.AddRunTagsRequest(run_id="@dev", tags=["\x00"]),
            "tags",
        ),
    }


def test_a_nul_character_is_refused_naming_the_field(world: World) -> None:
    """PostgreSQL text cannot hold NUL; both databases refuse it alike, before any SQL."""
    before = world.rows(db.runs, db.waitpoints, db.schedules)
    for case, (method, request, name) in _nul_cases().items():
        if isinstance(request, rpb.AddRunTagsRequest):
            request.run_id = world.resolve(request.run_id)
        outcome = world.call(method, request, "dev")
        assert_proper(outcome, f"{method} with a NUL ({case})")
        _refused(outcome, {name}, case)
    assert world.rows(db.runs, db.waitpoints, db.schedules) == before


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


def _metadata_of(w: World, run_id: str) -> dict[str, Any]:
    got = w.ok(RUN + "GetRun", rpb.GetRunRequest(run_id=run_id), "dev", rpb.GetRunResponse)
    metadata: dict[str, Any] = json.loads(got.run.metadata)
    return metadata


def test_an_attempt_changes_only_its_own_its_parents_and_its_roots_metadata(world: World) -> None:
    w = world
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
