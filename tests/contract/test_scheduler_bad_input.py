"""Bad input that crosses the scheduler's gRPC services: random bytes as any unary request body,
bodies that do not decode, requests over the message limit, and a NUL in a text field of each
service (PostgreSQL text cannot hold one). Whatever comes, the scheduler answers properly and
keeps serving.
"""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from runplane.v1 import auth_service_pb2 as apb
from runplane.v1 import meta_service_pb2
from runplane.v1 import queue_service_pb2 as qpb
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import schedule_service_pb2 as spb
from runplane.v1 import waitpoint_service_pb2 as wspb
from runplane_common.grpcserver import MAX_MESSAGE_BYTES
from runplane_scheduler.store import tables as db
from tests.helpers.contract import (
    AUTH,
    FUZZ,
    OK,
    QUEUE,
    RUN,
    SCHED,
    WAIT,
    Stack,
    assert_alive,
    assert_proper,
    assert_refused,
    assert_unchanged,
    decodes,
    unary,
)
from tests.helpers.worlds import (
    TASKS,
    ScheduleWorld,
)

pytestmark = pytest.mark.timeout(600)

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
    QUEUE + "ListQueues": qpb.ListQueuesRequest,
    QUEUE + "GetQueue": qpb.GetQueueRequest,
    QUEUE + "PauseQueue": qpb.PauseQueueRequest,
    QUEUE + "ResumeQueue": qpb.ResumeQueueRequest,
    QUEUE + "OverrideQueueConcurrencyLimit": qpb.OverrideQueueConcurrencyLimitRequest,
    QUEUE + "ResetQueueConcurrencyLimit": qpb.ResetQueueConcurrencyLimitRequest,
    "/runplane.v1.MetaService/GetServerInfo": meta_service_pb2.GetServerInfoRequest,
}


# -- raw bytes -------------------------------------------------------------------------------------


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
    if not decodes(UNARY_METHODS[method], body):
        assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, str(outcome)
    if outcome.code is not OK:
        assert_unchanged(before, stack.state(), f"{method} refused with {outcome}")
    assert_alive(stack)


UNDECODABLE = [b"\x00", b"\xff" * 8, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05abc"]


@pytest.mark.parametrize("method", sorted(UNARY_METHODS))
def test_an_undecodable_request_body_is_an_invalid_argument(stack: Stack, method: str) -> None:
    for body in UNDECODABLE:
        assert not decodes(UNARY_METHODS[method], body)
        outcome = unary(stack.channel(), method, body, stack.auth("dev"))
        assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, f"{method} {body!r}: {outcome}"
        assert "parse" in outcome.details or "decode" in outcome.details.lower(), str(outcome)


# -- oversized messages ----------------------------------------------------------------------------


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
    assert_alive(stack)


# -- a NUL character in any service's text field: a bug these tests found --------------------------


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


def test_a_nul_character_is_refused_naming_the_field(schedule_world: ScheduleWorld) -> None:
    """PostgreSQL text cannot hold NUL; both databases refuse it alike, before any SQL."""
    before = schedule_world.rows(db.runs, db.waitpoints, db.schedules)
    for case, (method, request, name) in _nul_cases().items():
        if isinstance(request, rpb.AddRunTagsRequest):
            request.run_id = schedule_world.resolve(request.run_id)
        outcome = schedule_world.call(method, request, "dev")
        assert_proper(outcome, f"{method} with a NUL ({case})")
        assert_refused(outcome, {name}, case)
    assert schedule_world.rows(db.runs, db.waitpoints, db.schedules) == before
