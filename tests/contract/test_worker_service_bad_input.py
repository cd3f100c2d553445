"""WorkerService's contract under bad input: the Connect stream must begin with a Register, a
random Register (manifest, capacity, running attempts) answers properly, a bad manifest is
refused naming it, and random bytes on the stream do not hurt the scheduler.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runplane.v1 import worker_service_pb2 as wpb
from runplane.v1 import worker_service_pb2_grpc
from runplane_common.protocol import SPOKEN_WORKER_PROTOCOL_VERSIONS
from tests.helpers.contract import (
    CONNECT,
    DEADLINE,
    FUZZ,
    OK,
    Outcome,
    Stack,
    assert_alive,
    assert_proper,
    assert_unchanged,
    decodes,
    outcome_of,
    streaming,
)
from tests.helpers.inputs import (
    auths,
    int32,
    task_id_ok,
    texts,
)

pytestmark = pytest.mark.timeout(300)


# -- WorkerService.Connect -------------------------------------------------------------------------


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
    first_ok = decodes(wpb.ConnectRequest, body)
    if not first_ok or wpb.ConnectRequest.FromString(body).WhichOneof("message") != "register":
        assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, str(outcome)
        assert_unchanged(before, stack.state(), "Connect without Register")
    assert_alive(stack)


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
        return outcome_of(error, responses)
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
    assert_alive(stack)


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


@given(
    version=st.one_of(
        st.integers(max(SPOKEN_WORKER_PROTOCOL_VERSIONS) + 1, 1000),
        st.integers(-(2**31), -1),
        int32,
    )
)
@FUZZ
def test_a_register_with_a_protocol_version_the_scheduler_does_not_speak_is_refused(
    stack: Stack, version: int
) -> None:
    before = stack.state()
    register = wpb.Register(
        manifest=wpb.Manifest(tasks=[wpb.TaskDefinition(id="t")]),
        capacity=1,
        protocol_version=version,
    )
    outcome = streaming(
        stack.channel(),
        CONNECT,
        [wpb.ConnectRequest(register=register)],
        stack.auth("dev"),
        response_type=wpb.ConnectResponse,
        client_streaming=True,
    )
    assert_proper(outcome, f"Connect with protocol_version={version}")
    if version in (0, *SPOKEN_WORKER_PROTOCOL_VERSIONS):
        return  # int32 may draw one of the spoken ones
    assert outcome.code is grpc.StatusCode.FAILED_PRECONDITION, str(outcome)
    assert f"worker protocol version {version} is not spoken" in outcome.details, str(outcome)
    spoken = ", ".join(map(str, SPOKEN_WORKER_PROTOCOL_VERSIONS))
    assert f"it speaks {spoken}" in outcome.details, str(outcome)
    assert_unchanged(before, stack.state(), "a refused registration")


@pytest.mark.parametrize("version", [0, 1])
def test_a_register_speaking_version_1_or_none_is_answered_with_version_1(
    stack: Stack, version: int
) -> None:
    register = wpb.Register(
        manifest=wpb.Manifest(tasks=[wpb.TaskDefinition(id="t")]),
        capacity=1,
        protocol_version=version,
    )
    call = worker_service_pb2_grpc.WorkerServiceStub(stack.channel()).Connect(
        iter([wpb.ConnectRequest(register=register)]), metadata=stack.auth("dev"), timeout=DEADLINE
    )
    first = next(iter(call))
    call.cancel()
    assert first.WhichOneof("message") == "registered"
    assert first.registered.protocol_version == 1
