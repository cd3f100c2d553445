"""QueueService's contract under bad input: ListQueues, GetQueue, PauseQueue, ResumeQueue and the
concurrency-limit override, with random references, limits and page tokens, on a ``RunWorld``
whose executors registered queues in both environments. A refusal names the field at fault and
changes no queue; another environment's queue is never found.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from runplane.v1 import queue_service_pb2 as qpb
from runplane_scheduler.store import tables as db
from tests.helpers.contract import (
    FUZZ,
    INVALID,
    LIMITS,
    NOT_FOUND,
    OK,
    QUEUE,
    TRIGGERABLE,
    UNAUTHENTICATED,
    assert_proper,
    assert_refused,
    assert_unchanged,
)
from tests.helpers.inputs import (
    TASK_ID,
    auths,
    id_like,
    int32,
    page_token_for,
    task_id_ok,
    texts,
)
from tests.helpers.worlds import (
    DEV_QUEUES,
    PROD_QUEUES,
    RunWorld,
)

pytestmark = pytest.mark.timeout(600)


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
    id_like("queue_"),
    st.sampled_from(["task/none", "engine-q1\n", "ENGINE-Q1", "engine-q1 ", "q" * 129, "queue_"]),
    texts,
)


def _queue_ref(w: RunWorld, ref: str) -> str:
    if ref.startswith("@id:"):
        return w.queue_ids[ref[4:]]
    return ref[1:] if ref.startswith("@") else ref


def _listed(who: str) -> list[str]:
    """The queues ``who``'s environment lists: the declared ones and the triggerable tasks'."""
    return sorted(
        [*(DEV_QUEUES if who == "dev" else PROD_QUEUES), *(f"task/{t}" for t in TRIGGERABLE)]
    )


def _queue_row(w: RunWorld, name: str) -> dict[str, Any]:
    assert w.stack.scheduler is not None

    async def read() -> dict[str, Any]:
        async with w.stack.scheduler.engine_db.connect() as conn:  # type: ignore[union-attr]
            stmt = select(db.queues).where(db.queues.c.name == name)
            row = (await conn.execute(stmt)).mappings().one()
        return dict(row)

    return w.stack.run(read())


@given(
    method=st.sampled_from(sorted(QUEUE_METHODS)),
    ref=queue_refs,
    limit=st.one_of(st.integers(0, 100_000), int32),
    who=auths,
)
@FUZZ
def test_queue_calls_with_random_refs_answer_properly(
    run_world: RunWorld, method: str, ref: str, limit: int, who: str
) -> None:
    w = run_world
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
        assert_refused(outcome, bad, what)
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


@given(
    page_size=st.one_of(st.integers(0, 5), st.integers(0, 120), int32),
    token=st.one_of(
        st.just(""),
        task_id_ok.map(lambda n: "@" + n),
        st.sampled_from(["@engine-q1", "@engine-q2", "@engine-pq", "@a", "@z"]),
        texts,
        st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()),
        texts.map(page_token_for),
    ),
    who=auths,
)
@FUZZ
def test_list_queues_with_random_pages_answers_properly(
    run_world: RunWorld, page_size: int, token: str, who: str
) -> None:
    w = run_world
    after_name = token[1:] if token.startswith("@") else None
    if after_name is not None:
        token = page_token_for(after_name)
    request = qpb.ListQueuesRequest(page_size=page_size, page_token=token)
    before = w.state()
    outcome = w.call(QUEUE + "ListQueues", request, who, qpb.ListQueuesResponse)
    what = f"ListQueues({request!r}) as {who!r}"
    assert_proper(outcome, what)
    assert_unchanged(before, w.state(), what)
    mine = _listed(who)
    if who not in ("dev", "prod"):
        assert outcome.code is UNAUTHENTICATED, str(outcome)
    elif not 0 <= page_size <= LIMITS.page_size:
        assert_refused(outcome, {"page_size"}, what)
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
        assert_refused(outcome, {"page_token"}, what)


@pytest.mark.parametrize("who", ["dev", "prod"])
def test_list_queues_pages_through_each_queue_once(run_world: RunWorld, who: str) -> None:
    w = run_world
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
    assert names == _listed(who)


@given(
    limit=st.one_of(st.integers(-(2**31), -1), st.integers(100_001, 2**31 - 1)),
    ref=st.sampled_from(["@engine-q1", "@id:engine-q2"]),
)
@FUZZ
def test_a_concurrency_override_out_of_range_is_refused_naming_it(
    run_world: RunWorld, limit: int, ref: str
) -> None:
    w = run_world
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


def test_another_environments_queue_cannot_be_changed(run_world: RunWorld) -> None:
    w = run_world
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
