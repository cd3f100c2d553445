"""Bad input, over real gRPC, for the engine's newer RPCs: batches, replay, reschedule,
idempotency-key reset, debounce and the QueueService.

Same harness as ``test_bad_input``: a real scheduler on a loop of its own, plain synchronous gRPC
from hypothesis examples, one server for every example of a test. Every answer must be proper
(never UNKNOWN, INTERNAL or a hang), a refusal must name the field at fault, and a refused request
must leave the database exactly as it was: no run, batch, timer or event row, no changed queue.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from runplane.v1 import queue_service_pb2 as qpb
from runplane.v1 import run_pb2
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import worker_service_pb2 as wpb
from runplane_scheduler.store import tables as db
from tests.helpers.ports import free_port
from tests.integration.test_bad_input import (
    BREAKERS,
    CONNECT,
    FUZZ,
    LIMITS,
    OK,
    QUEUE,
    RUN,
    Outcome,
    Stack,
    _start,
    assert_proper,
    assert_unchanged,
    auths,
    int32,
    int64,
    streaming,
    task_id_ok,
    texts,
    trigger_requests,
    unary,
    valid_trigger_requests,
)

pytestmark = pytest.mark.timeout(600)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

# The documented shapes, matched over the whole string (a trailing newline is no id).
TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
RUN_ID = re.compile(r"run_[0-9a-z]{1,36}")
BATCH_ID = re.compile(r"batch_[0-9a-z]{1,36}")
TEN_YEARS_MS = 3650 * 86_400_000
MIN_TS, MAX_TS = -62135596800, 253402300799  # 0001-01-01 .. 9999-12-31
ID_CHARS = "0123456789abcdefghjkmnpqrstvwxyz"
MACHINES = ["micro", "small-1x", "small-2x", "medium-1x", "medium-2x", "large-1x", "large-2x"]
KEYED_TASK, KEY = "t", "engine-key"
# Queues the executors register: three in dev (to page through), one in prod.
DEV_QUEUES = {"engine-q1": 3, "engine-q2": 0, "engine-q3": 7}
PROD_QUEUES = {"engine-pq": 2}


# -- the world every test starts from ------------------------------------------------------------


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


def page_tokens(prefix: str) -> st.SearchStrategy[str]:
    """Page tokens: none, random text, well-formed ones naming an id like ``prefix``, or any
    base64."""
    return st.one_of(
        st.just(""),
        texts,
        _id_like(prefix).map(_token),
        st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    )


@dataclass(repr=False)
class World(Calls):
    """A scheduler with registered queues, some runs and batches in both environments."""

    def __repr__(self) -> str:
        return f"World(runs={self.runs}, batches={self.batches}, queues={self.queue_ids})"

    stack: Stack
    runs: dict[str, str] = field(default_factory=dict)  # name -> id
    run_env: dict[str, str] = field(default_factory=dict)  # id -> environment
    batches: dict[str, str] = field(default_factory=dict)  # name -> id
    batch_env: dict[str, str] = field(default_factory=dict)  # id -> environment
    batch_runs: dict[str, list[str]] = field(default_factory=dict)  # id -> its own new runs
    queue_ids: dict[str, str] = field(default_factory=dict)  # name -> id
    queue_env: dict[str, str] = field(default_factory=dict)  # name or id -> environment
    key_released: bool = False

    def resolve(self, value: str) -> str:
        """'@name' stands for a run, batch or queue of the world (a queue's id with '@id:')."""
        if not value.startswith("@"):
            return value
        name = value[1:]
        if name.startswith("id:"):
            return self.queue_ids.get(name[3:], value)
        return self.runs.get(name) or self.batches.get(name) or value

    def trigger(self, who: str, **options: Any) -> rpb.TriggerRunResponse:
        request = rpb.TriggerRunRequest(
            task_id="t", payload='{"n": 1}', options=rpb.TriggerOptions(tags=["x"], **options)
        )
        response: rpb.TriggerRunResponse = self.ok(
            RUN + "TriggerRun", request, who, rpb.TriggerRunResponse
        )
        self.run_env[response.run.id] = who
        return response

    def delayed_run(self, who: str) -> str:
        """A fresh run, DELAYED for an hour."""
        return self.trigger(who, delay=Duration(seconds=3600)).run.id

    def state(self) -> dict[str, Any]:
        """``Stack.state`` plus the batches, and every run's and queue's row as it is."""
        stack = self.stack
        assert stack.scheduler is not None
        engine = stack.scheduler.engine_db

        async def read() -> dict[str, Any]:
            async with engine.connect() as conn:
                batches = select(func.count()).select_from(db.batches)
                r = db.runs.c
                runs = select(
                    r.id, r.status, r.version, r.delay_until, r.idempotency_key_expires_at
                ).order_by(r.id)
                return {
                    "batches": int((await conn.execute(batches)).scalar_one()),
                    "run_rows": [tuple(row) for row in (await conn.execute(runs)).all()],
                    "queue_rows": [
                        tuple(row)
                        for row in (
                            await conn.execute(select(db.queues).order_by(db.queues.c.id))
                        ).all()
                    ],
                }

        return {**stack.state(), **stack.run(read())}


STABLE = ("runs", "batches", "run_tags", "attempts", "queue_rows")


def _stable(state: dict[str, Any], *run_ids: str) -> dict[str, Any]:
    """What no timer changes: the rows there are, and the rows of ``run_ids`` (for tests whose
    accepted requests leave runs due soon, which may fire while a later example runs)."""
    return {
        **{k: state[k] for k in STABLE},
        "run_ids": [r[0] for r in state["run_rows"]],
        "watched": [r for r in state["run_rows"] if r[0] in run_ids],
    }


def _register(stack: Stack, who: str, queues: dict[str, int]) -> None:
    """An executor connects with a manifest defining ``queues``, then goes away (they stay)."""
    tasks = [
        wpb.TaskDefinition(id=f"{name}-task", queue=name, queue_concurrency_limit=limit)
        for name, limit in queues.items()
    ]
    outcome = streaming(
        stack.channel(),
        CONNECT,
        [wpb.ConnectRequest(register=wpb.Register(manifest=wpb.Manifest(tasks=tasks), capacity=1))],
        stack.auth(who),
        response_type=wpb.ConnectResponse,
        client_streaming=True,
        first_only=True,
    )
    assert outcome.code is OK and outcome.responses, str(outcome)
    assert outcome.responses[0].WhichOneof("message") == "registered"


@pytest.fixture
def stack(database_url: str) -> Iterator[Stack]:
    """A scheduler whose relay cannot reach NATS (outbox rows stay: exact counts)."""
    yield from _start(database_url, f"nats://127.0.0.1:{free_port()}")


@pytest.fixture
def world(stack: Stack) -> World:
    w = World(stack)
    _register(stack, "dev", DEV_QUEUES)
    _register(stack, "prod", PROD_QUEUES)
    for env, queues in (("dev", DEV_QUEUES), ("prod", PROD_QUEUES)):
        for name in queues:
            got = w.ok(
                QUEUE + "GetQueue", qpb.GetQueueRequest(queue=name), env, qpb.GetQueueResponse
            )
            w.queue_ids[name] = got.queue.id
            w.queue_env[name] = w.queue_env[got.queue.id] = env
    for name, env in (("dev", "dev"), ("prod", "prod")):
        w.runs[name] = w.trigger(env).run.id
    w.runs["dev-canceled"] = w.trigger("dev").run.id
    w.ok(
        RUN + "CancelRun",
        rpb.CancelRunRequest(run_id=w.runs["dev-canceled"]),
        "dev",
        rpb.CancelRunResponse,
    )
    w.runs["dev-keyed"] = w.trigger("dev", idempotency_key=KEY).run.id
    for name, env in (("dev-batch", "dev"), ("prod-batch", "prod")):
        items = [rpb.BatchTriggerItem(task_id="t", payload=str(i)) for i in range(2)]
        got = w.ok(
            RUN + "BatchTriggerRuns",
            rpb.BatchTriggerRunsRequest(items=items),
            env,
            rpb.BatchTriggerRunsResponse,
        )
        w.batches[name] = got.batch_id
        w.batch_env[got.batch_id] = env
        w.batch_runs[got.batch_id] = [r.id for r in got.runs]
        for r in got.runs:
            w.run_env[r.id] = env
    return w


def _other(who: str) -> str:
    return "prod" if who == "dev" else "dev"


def _refused(outcome: Outcome, fields: set[str], what: str) -> None:
    """INVALID_ARGUMENT naming one of ``fields`` (a field, or a part of one)."""
    assert outcome.code is INVALID, f"{what}: expected INVALID_ARGUMENT, got {outcome}"
    named = outcome.violations[0][0]
    assert any(named == f or named.startswith((f + ".", f + "[")) for f in fields), (
        f"{what}: expected a violation of one of {sorted(fields)}, got {outcome}"
    )


# -- values --------------------------------------------------------------------------------------


def _duration_ms(d: Duration) -> int | None:
    """The server's reading of a Duration: ms, or None when it is no valid duration."""
    if d.seconds < 0 or d.nanos < 0 or d.nanos >= 1_000_000_000:
        return None
    ms = d.seconds * 1000 + d.nanos // 1_000_000
    return ms if ms <= TEN_YEARS_MS else None


def _timestamp_ok(t: Timestamp) -> bool:
    return MIN_TS <= t.seconds <= MAX_TS and 0 <= t.nanos < 1_000_000_000


def _ms(ms: int) -> Duration:
    d = Duration()
    d.FromMilliseconds(ms)
    return d


def _ts(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


any_durations = st.one_of(
    st.integers(0, TEN_YEARS_MS).map(_ms),
    st.integers(-(10**12), -1).map(_ms),
    st.builds(Duration, seconds=int64, nanos=int32),
    st.builds(Duration, seconds=st.integers(0, 100), nanos=st.sampled_from([-1, 10**9])),
)
any_timestamps = st.one_of(
    st.builds(_ts, st.integers(MIN_TS, MAX_TS), st.integers(0, 999_999_999)),
    st.builds(_ts, int64, int32),
    st.builds(_ts, st.integers(0, 10), st.sampled_from([-1, 10**9])),
)


def _id_like(prefix: str) -> st.SearchStrategy[str]:
    """Well-formed ids nobody has, and near misses."""
    well_formed = st.text(ID_CHARS, min_size=26, max_size=26).map(lambda s: prefix + s)
    return st.one_of(
        well_formed,
        well_formed.map(lambda s: s + "\n"),
        well_formed.map(str.upper),
        st.just(prefix),
        st.just(prefix + "x" * 37),
        st.just(prefix + "\x00"),
    )


# -- RunService.BatchTriggerRuns -----------------------------------------------------------------


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
        st.one_of(st.just(""), st.sampled_from(["@dev", "@prod"]), _id_like("run_"), texts)
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


def _resolve_parents(w: World, items: Any) -> None:
    for item in items:
        item.options.parent_run_id = w.resolve(item.options.parent_run_id)


@given(request=random_batches(), who=auths)
@FUZZ
def test_batch_trigger_with_random_items_answers_properly(
    world: World, request: rpb.BatchTriggerRunsRequest, who: str
) -> None:
    w = world
    _resolve_parents(w, request.items)
    before = w.state()
    outcome = w.call(RUN + "BatchTriggerRuns", request, who, rpb.BatchTriggerRunsResponse)
    assert_proper(outcome, f"BatchTriggerRuns({request!r})")
    after = w.state()
    if outcome.code is not OK:
        assert_unchanged(_stable(before), _stable(after), f"BatchTriggerRuns refused: {outcome}")
        if who not in ("dev", "prod"):
            assert outcome.code is UNAUTHENTICATED, str(outcome)
        elif outcome.code is INVALID:
            _refused(outcome, {"items", "idempotency_key"}, "BatchTriggerRuns")
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
    theirs = w.call(RUN + "GetBatch", rpb.GetBatchRequest(batch_id=response.batch_id), _other(who))
    assert theirs.code is NOT_FOUND, str(theirs)


def _set_debounce(r: Any, **fields: Any) -> None:
    r.options.debounce.CopyFrom(rpb.Debounce(**{"key": "k", "delay": _ms(5000), **fields}))


def _debounce_with_delay(r: Any, v: tuple[str, int]) -> None:
    _set_debounce(r)
    kind, n = v
    if kind == "delay":
        r.options.delay.CopyFrom(_ms(n))
    else:
        r.options.delay_until.CopyFrom(_ts(n))


def _set_max_delay(r: Any, v: tuple[int, int]) -> None:
    delay, max_delay = v
    _set_debounce(r, delay=_ms(delay), max_delay=_ms(max_delay))


def _set_delay_until(r: Any, v: Timestamp | int) -> None:
    if isinstance(v, int):  # delay and delay_until both
        r.options.delay.CopyFrom(_ms(v))
        r.options.delay_until.CopyFrom(_ts(2_000_000_000))
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
            st.integers(0, 999).map(_ms),
            st.integers(-(10**12), -1).map(_ms),
            st.integers(TEN_YEARS_MS + 1000, 10**15).map(_ms),
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
                _ts,
                st.one_of(st.integers(-(2**63), MIN_TS - 1), st.integers(MAX_TS + 1, 2**63 - 1)),
            ),
            st.builds(
                _ts, st.integers(0, 10**10), st.sampled_from([-1, -(10**9), 10**9, 2**31 - 1])
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
        o.delay.CopyFrom(_ms(draw(st.integers(0, 86_400_000))))
    elif when == "delay_until":
        o.delay_until.CopyFrom(_ts(draw(st.integers(1, MAX_TS)), draw(st.integers(0, 999_999_999))))
    elif when == "debounce":
        delay = draw(st.integers(1000, 10**8))
        o.debounce.CopyFrom(
            rpb.Debounce(
                key=uuid.uuid4().hex
                + draw(
                    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
                ),
                delay=_ms(delay),
                mode=draw(st.sampled_from([0, 1, 2])),
            )
        )
        if draw(st.booleans()):
            o.debounce.max_delay.CopyFrom(_ms(delay + draw(st.integers(1, 10**8))))
    if draw(st.booleans()):
        o.ttl.CopyFrom(_ms(draw(st.one_of(st.just(0), st.integers(1000, 10**9)))))
    if draw(st.booleans()):
        o.idempotency_key_ttl.CopyFrom(_ms(draw(st.integers(1000, 10**9))))
    if draw(st.booleans()):
        o.max_duration.CopyFrom(_ms(draw(st.integers(1000, 10**9))))
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
    world: World, items: list[rpb.BatchTriggerItem], keyed: bool, data: st.DataObject
) -> None:
    w = world
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
    world: World, items: list[rpb.BatchTriggerItem], keyed: bool
) -> None:
    """The other side of the property above: the 'valid' items really are valid."""
    w = world
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
        assert _stable(w.state()) == _stable(after), "a repeated batch key wrote rows"


@pytest.mark.parametrize("count", [0, LIMITS.batch_items + 1, 3 * LIMITS.batch_items])
def test_a_batch_of_no_items_or_too_many_is_refused_naming_items(world: World, count: int) -> None:
    w = world
    items = [rpb.BatchTriggerItem(task_id="t") for _ in range(count)]
    before = w.state()
    outcome = w.call(RUN + "BatchTriggerRuns", rpb.BatchTriggerRunsRequest(items=items), "dev")
    assert_proper(outcome, f"BatchTriggerRuns with {count} items")
    assert outcome.code is INVALID, str(outcome)
    assert outcome.violations[0][0] == "items", str(outcome)
    if count:
        assert str(LIMITS.batch_items) in outcome.details, str(outcome)
    assert_unchanged(before, w.state(), f"a batch of {count} items")


def test_a_batch_at_the_item_limit_is_accepted(world: World) -> None:
    w = world
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
def test_a_batch_with_a_bad_idempotency_key_is_refused_naming_it(world: World, key: str) -> None:
    w = world
    request = rpb.BatchTriggerRunsRequest(
        items=[rpb.BatchTriggerItem(task_id="t")], idempotency_key=key
    )
    before = w.state()
    outcome = w.call(RUN + "BatchTriggerRuns", request, "dev")
    assert_proper(outcome, "BatchTriggerRuns with a bad idempotency_key")
    assert outcome.code is INVALID, str(outcome)
    assert outcome.violations[0][0] == "idempotency_key", str(outcome)
    assert_unchanged(before, w.state(), "a batch with a bad idempotency_key")


def test_a_batch_whose_late_item_fails_in_the_engine_writes_nothing(world: World) -> None:
    """Items pass validation one by one; the last names another environment's parent run (found
    only inside the transaction) or an unknown queue: the earlier items must not be written."""
    w = world
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


# -- RunService.GetBatch -------------------------------------------------------------------------


@given(
    batch_id=st.one_of(st.sampled_from(["@dev-batch", "@prod-batch"]), _id_like("batch_"), texts),
    who=auths,
)
@FUZZ
def test_get_batch_with_random_ids_answers_properly(world: World, batch_id: str, who: str) -> None:
    w = world
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
        _refused(outcome, {"batch_id"}, f"GetBatch({batch_id!r})")
    elif w.batch_env.get(batch_id) != who:
        assert outcome.code is NOT_FOUND, f"GetBatch({batch_id!r}) as {who}: {outcome}"
        assert batch_id in outcome.details
    else:
        assert outcome.code is OK, str(outcome)
        batch = outcome.responses[0].batch
        assert batch.id == batch_id
        assert list(batch.run_ids) == w.batch_runs[batch_id]
        assert batch.status == rpb.BATCH_STATUS_PROCESSING


# -- RunService.ReplayRun ------------------------------------------------------------------------

run_refs = st.one_of(
    st.sampled_from(["@dev", "@prod", "@dev-canceled", "@dev-keyed"]), _id_like("run_"), texts
)


@given(run_id=run_refs, who=auths)
@FUZZ
def test_replay_run_with_random_ids_answers_properly(world: World, run_id: str, who: str) -> None:
    w = world
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
        _refused(outcome, {"run_id"}, f"ReplayRun({run_id!r})")
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


# -- RunService.RescheduleRun --------------------------------------------------------------------


@given(
    run_id=st.one_of(st.just("@delayed"), st.just("@prod-delayed"), run_refs),
    delay=st.one_of(st.none(), any_durations),
    delay_until=st.one_of(st.none(), any_timestamps),
    who=auths,
)
@FUZZ
def test_reschedule_run_with_random_fields_answers_properly(
    world: World, run_id: str, delay: Duration | None, delay_until: Timestamp | None, who: str
) -> None:
    w = world
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
            _stable(before, run_id), _stable(w.state(), run_id), f"{what} refused: {outcome}"
        )
    bad = set()
    if not RUN_ID.fullmatch(run_id):
        bad.add("run_id")
    if (delay is None) == (delay_until is None):
        bad |= {"delay", "delay_until"}
    if delay is not None and _duration_ms(delay) is None:
        bad.add("delay")
    if delay_until is not None and not _timestamp_ok(delay_until):
        bad.add("delay_until")
    if who not in ("dev", "prod"):
        assert outcome.code is UNAUTHENTICATED, str(outcome)
    elif bad:
        _refused(outcome, bad, what)
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
            assert run.delay_until.ToMilliseconds() >= called_ms + (_duration_ms(delay) or 0)
        assert w.state()["runs"] == before["runs"]


RESCHEDULE_BREAKERS: dict[
    str, tuple[st.SearchStrategy[Any], Callable[[rpb.RescheduleRunRequest, Any], None]]
] = {
    "run_id": (
        st.one_of(
            st.just(""),
            st.sampled_from(["run_", "run_ABC", "nope", "batch_123"]),
            _id_like("run_").filter(lambda s: not RUN_ID.fullmatch(s)),
        ),
        lambda r, v: setattr(r, "run_id", v),
    ),
    "delay": (
        st.one_of(
            st.integers(-(10**12), -1).map(_ms),
            st.integers(TEN_YEARS_MS + 1000, 10**15).map(_ms),
            st.builds(Duration, seconds=st.integers(0, 100), nanos=st.sampled_from([-1, 10**9])),
        ),
        lambda r, v: (r.ClearField("delay_until"), r.delay.CopyFrom(v)),
    ),
    "delay_until": (
        st.one_of(
            st.builds(
                _ts,
                st.one_of(st.integers(-(2**63), MIN_TS - 1), st.integers(MAX_TS + 1, 2**63 - 1)),
            ),
            st.builds(_ts, st.integers(0, 10**10), st.sampled_from([-1, 10**9])),
        ),
        lambda r, v: (r.ClearField("delay"), r.delay_until.CopyFrom(v)),
    ),
    # Exactly one of the two: both, or neither.
    "delay|delay_until": (
        st.booleans(),
        lambda r, both: (
            (r.delay.CopyFrom(_ms(60_000)), r.delay_until.CopyFrom(_ts(2_000_000_000)))
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
    world: World, use_delay: bool, ms: int, data: st.DataObject
) -> None:
    w = world
    run_id = w.delayed_run("dev")
    request = rpb.RescheduleRunRequest(run_id=run_id)
    if use_delay:
        request.delay.CopyFrom(_ms(ms))
    else:
        request.delay_until.CopyFrom(_ts(2_000_000_000 + ms))
    name = data.draw(st.sampled_from(sorted(RESCHEDULE_BREAKERS)), label="field")
    strategy, apply = RESCHEDULE_BREAKERS[name]
    value = data.draw(strategy, label="value")
    apply(request, value)
    before = w.state()
    outcome = w.call(RUN + "RescheduleRun", request, "dev")
    assert_proper(outcome, f"RescheduleRun with bad {name}")
    _refused(outcome, set(name.split("|")), f"RescheduleRun with bad {name}={value!r}")
    assert_unchanged(before, w.state(), f"RescheduleRun with bad {name}")


def test_reschedule_refuses_runs_that_are_not_delayed_or_not_the_callers(world: World) -> None:
    w = world
    later = rpb.RescheduleRunRequest(delay=_ms(60_000))
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
    request = rpb.RescheduleRunRequest(run_id=run_id, delay_until=_ts(4_000_000_000))
    run = w.ok(RUN + "RescheduleRun", request, "dev", rpb.RescheduleRunResponse).run
    assert run.status == run_pb2.RUN_STATUS_DELAYED and run.delay_until.seconds == 4_000_000_000


# -- RunService.ResetIdempotencyKey --------------------------------------------------------------


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
    world: World, task: str, key: str, who: str
) -> None:
    w = world
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
        _refused(outcome, bad, what)
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
    world: World, task: str, key: str, good_task: str, good_key: str, which: str
) -> None:
    w = world
    if which == "task_id":
        request = rpb.ResetIdempotencyKeyRequest(task_id=task, idempotency_key=good_key)
    else:
        request = rpb.ResetIdempotencyKeyRequest(task_id=good_task, idempotency_key=key)
    before = w.state()
    outcome = w.call(RUN + "ResetIdempotencyKey", request, "dev")
    assert_proper(outcome, f"ResetIdempotencyKey with a bad {which}")
    _refused(outcome, {which}, f"ResetIdempotencyKey({request!r})")
    assert_unchanged(before, w.state(), f"ResetIdempotencyKey with a bad {which}")


def test_a_reset_key_is_released_for_the_next_trigger_only_in_its_environment(world: World) -> None:
    w = world
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


# -- TriggerRun's debounce option ----------------------------------------------------------------


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
            delay=_ms(delay),
            mode=draw(st.sampled_from([0, 1, 2])),
        )
    )
    if draw(st.booleans()):
        request.options.debounce.max_delay.CopyFrom(_ms(delay + draw(st.integers(1, 10**9))))
    return request


@given(base=valid_debounced_triggers(), data=st.data())
@FUZZ
def test_trigger_with_a_bad_debounce_is_refused_naming_the_field(
    world: World, base: rpb.TriggerRunRequest, data: st.DataObject
) -> None:
    w = world
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
    world: World, request: rpb.TriggerRunRequest
) -> None:
    w = world
    request.options.debounce.key = uuid.uuid4().hex + request.options.debounce.key[:400]
    before = w.state()
    first = w.ok(RUN + "TriggerRun", request, "dev", rpb.TriggerRunResponse)
    assert not first.is_cached and first.run.status == run_pb2.RUN_STATUS_DELAYED, first
    assert w.state()["runs"] == before["runs"] + 1
    d = request.options.debounce
    if d.HasField("max_delay") and _duration_ms(d.max_delay) - _duration_ms(d.delay) < 60_000:  # type: ignore[operator]
        return  # a second trigger may be past max_delay already
    second = w.ok(RUN + "TriggerRun", request, "dev", rpb.TriggerRunResponse)
    assert second.is_cached and second.run.id == first.run.id, second
    assert second.run.delay_until.ToMilliseconds() >= first.run.delay_until.ToMilliseconds()
    assert w.state()["runs"] == before["runs"] + 1
    # The key is the caller's: the other environment gets a run of its own.
    theirs = w.ok(RUN + "TriggerRun", request, "prod", rpb.TriggerRunResponse)
    assert not theirs.is_cached and theirs.run.id != first.run.id


# -- QueueService ----------------------------------------------------------------------------------

QUEUE_METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "GetQueue": (qpb.GetQueueRequest, qpb.GetQueueResponse),
    "PauseQueue": (qpb.PauseQueueRequest, qpb.PauseQueueResponse),
    "ResumeQueue": (qpb.ResumeQueueRequest, qpb.ResumeQueueResponse),
    "OverrideQueueConcurrencyLimit": (
        qpb.OverrideQueueConcurrencyLimitRequest,
        qpb.OverrideQueueConcurrencyLimitResponse,
    ),
    "ResetQueueConcurrencyLimit": (
        qpb.ResetQueueConcurrencyLimitRequest,
        qpb.ResetQueueConcurrencyLimitResponse,
    ),
}
queue_refs = st.one_of(
    st.sampled_from([f"@{n}" for n in [*DEV_QUEUES, *PROD_QUEUES]]),
    st.sampled_from([f"@id:{n}" for n in [*DEV_QUEUES, *PROD_QUEUES]]),
    st.just(""),
    task_id_ok,
    _id_like("queue_"),
    st.sampled_from(["task/t", "engine-q1\n", "ENGINE-Q1", "engine-q1 ", "q" * 129, "queue_"]),
    texts,
)


def _queue_ref(w: World, ref: str) -> str:
    if ref.startswith("@id:"):
        return w.queue_ids[ref[4:]]
    return ref[1:] if ref.startswith("@") else ref


def _queue_row(w: World, name: str) -> dict[str, Any]:
    assert w.stack.scheduler is not None

    async def read() -> dict[str, Any]:
        async with w.stack.scheduler.engine_db.connect() as conn:  # type: ignore[union-attr]
            row = (await conn.execute(select(db.queues).where(db.queues.c.name == name))).one()
        return dict(row._mapping)

    return w.stack.run(read())


@given(
    method=st.sampled_from(sorted(QUEUE_METHODS)),
    ref=queue_refs,
    limit=st.one_of(st.integers(0, 100_000), int32),
    who=auths,
)
@FUZZ
def test_queue_calls_with_random_refs_answer_properly(
    world: World, method: str, ref: str, limit: int, who: str
) -> None:
    w = world
    request_type, response_type = QUEUE_METHODS[method]
    queue = _queue_ref(w, ref)
    request = request_type(queue=queue)
    if method == "OverrideQueueConcurrencyLimit":
        request.concurrency_limit = limit  # type: ignore[attr-defined]
    before = w.state()
    outcome = w.call(QUEUE + method, request, who, response_type)
    what = f"{method}({request!r}) as {who!r}"
    assert_proper(outcome, what)
    if outcome.code is not OK:
        assert_unchanged(before, w.state(), f"{what} refused with {outcome}")
    bad = set()
    if not TASK_ID.fullmatch(queue):
        bad.add("queue")
    if method == "OverrideQueueConcurrencyLimit" and not 0 <= limit <= 100_000:
        bad.add("concurrency_limit")
    if who not in ("dev", "prod"):
        assert outcome.code is UNAUTHENTICATED, str(outcome)
    elif bad:
        _refused(outcome, bad, what)
    elif w.queue_env.get(queue) != who:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
        assert "queue" in outcome.details, str(outcome)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        got: qpb.Queue = outcome.responses[0].queue
        assert queue in (got.id, got.name)
        declared = {**DEV_QUEUES, **PROD_QUEUES}[got.name]
        assert got.base_concurrency_limit == declared
        row = _queue_row(w, got.name)
        assert (row["paused"], row["limit_override"]) == (
            got.paused,
            got.override_concurrency_limit if got.HasField("override_concurrency_limit") else None,
        )
        if method == "PauseQueue":
            assert got.paused
        elif method == "ResumeQueue":
            assert not got.paused
        elif method == "OverrideQueueConcurrencyLimit":
            assert got.HasField("override_concurrency_limit")
            assert got.override_concurrency_limit == got.concurrency_limit == limit
            assert got.HasField("overridden_at")
        elif method == "ResetQueueConcurrencyLimit":
            assert not got.HasField("override_concurrency_limit")
            assert got.concurrency_limit == declared
        else:
            assert_unchanged(before, w.state(), what)
        assert w.state()["runs"] == before["runs"]


def _token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


@given(
    page_size=st.one_of(st.integers(0, 5), st.integers(0, 120), int32),
    token=st.one_of(
        st.just(""),
        task_id_ok.map(lambda n: "@" + n),
        st.sampled_from(["@engine-q1", "@engine-q2", "@engine-pq", "@a", "@z"]),
        texts,
        st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()),
        texts.map(_token),
    ),
    who=auths,
)
@FUZZ
def test_list_queues_with_random_pages_answers_properly(
    world: World, page_size: int, token: str, who: str
) -> None:
    w = world
    after_name = token[1:] if token.startswith("@") else None
    if after_name is not None:
        token = _token(after_name)
    request = qpb.ListQueuesRequest(page_size=page_size, page_token=token)
    before = w.state()
    outcome = w.call(QUEUE + "ListQueues", request, who, qpb.ListQueuesResponse)
    what = f"ListQueues({request!r}) as {who!r}"
    assert_proper(outcome, what)
    assert_unchanged(before, w.state(), what)
    mine = sorted(DEV_QUEUES if who == "dev" else PROD_QUEUES)
    if who not in ("dev", "prod"):
        assert outcome.code is UNAUTHENTICATED, str(outcome)
    elif not 0 <= page_size <= LIMITS.page_size:
        _refused(outcome, {"page_size"}, what)
    elif token == "" or after_name is not None:
        assert outcome.code is OK, f"{what}: {outcome}"
        size = page_size or 25
        left = [n for n in mine if after_name is None or n > after_name]
        response = outcome.responses[0]
        assert [q.name for q in response.queues] == left[:size], str(response)
        assert bool(response.next_page_token) == (len(left) > size)
    elif outcome.code is OK:
        names = [q.name for q in outcome.responses[0].queues]
        assert names == sorted(names) and set(names) <= set(mine), names
    else:
        _refused(outcome, {"page_token"}, what)


@pytest.mark.parametrize("who", ["dev", "prod"])
def test_list_queues_pages_through_each_queue_once(world: World, who: str) -> None:
    w = world
    names, token = [], ""
    for _ in range(10):
        page = w.ok(
            QUEUE + "ListQueues",
            qpb.ListQueuesRequest(page_size=1, page_token=token),
            who,
            qpb.ListQueuesResponse,
        )
        names += [q.name for q in page.queues]
        token = page.next_page_token
        if not token:
            break
    assert names == sorted(DEV_QUEUES if who == "dev" else PROD_QUEUES)


@given(
    limit=st.one_of(st.integers(-(2**31), -1), st.integers(100_001, 2**31 - 1)),
    ref=st.sampled_from(["@engine-q1", "@id:engine-q2"]),
)
@FUZZ
def test_a_concurrency_override_out_of_range_is_refused_naming_it(
    world: World, limit: int, ref: str
) -> None:
    w = world
    request = qpb.OverrideQueueConcurrencyLimitRequest(
        queue=_queue_ref(w, ref), concurrency_limit=limit
    )
    before = w.state()
    outcome = w.call(QUEUE + "OverrideQueueConcurrencyLimit", request, "dev")
    assert_proper(outcome, f"OverrideQueueConcurrencyLimit({limit})")
    assert outcome.code is INVALID, str(outcome)
    assert outcome.violations[0][0] == "concurrency_limit", str(outcome)
    assert str(limit) in outcome.details, str(outcome)
    assert_unchanged(before, w.state(), f"OverrideQueueConcurrencyLimit({limit})")


def test_another_environments_queue_cannot_be_changed(world: World) -> None:
    w = world
    for ref in ("engine-pq", w.queue_ids["engine-pq"]):
        for method, (request_type, _) in QUEUE_METHODS.items():
            request = request_type(queue=ref)
            before = w.state()
            outcome = w.call(QUEUE + method, request, "dev")
            assert outcome.code is NOT_FOUND, f"{method}({ref}) as dev: {outcome}"
            assert ref in outcome.details, str(outcome)
            assert_unchanged(before, w.state(), f"{method}({ref}) as dev")
    mine = w.ok(
        QUEUE + "PauseQueue",
        qpb.PauseQueueRequest(queue="engine-pq"),
        "prod",
        qpb.PauseQueueResponse,
    )
    assert mine.queue.paused and mine.queue.id == w.queue_ids["engine-pq"]
