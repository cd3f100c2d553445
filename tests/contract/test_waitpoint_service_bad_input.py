"""WaitpointService's contract under bad input: CreateToken, GetToken, CompleteToken and
ListTokens with random fields; a refusal names the field at fault and writes no waitpoint or
timer row.
"""

from __future__ import annotations

import re

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from runplane.v1 import waitpoint_service_pb2 as wspb
from tests.helpers.contract import (
    FUZZ,
    KEYS,
    LIMITS,
    NOT_FOUND,
    OK,
    UNAUTHENTICATED,
    WAIT,
    assert_proper,
    assert_refused,
    other_env,
)
from tests.helpers.inputs import (
    any_durations,
    auths,
    duration_ms,
    id_like,
    int32,
    json_ok,
    page_token_for,
    task_id_ok,
    texts,
    token_data,
    token_refs,
)
from tests.helpers.worlds import (
    ScheduleWorld,
    token_rows,
)

pytestmark = pytest.mark.timeout(600)

TOKEN_ID = re.compile(r"waitpoint_[0-9a-z]{1,36}")


# -- WaitpointService ------------------------------------------------------------------------------


token_durations = st.one_of(
    st.integers(3600_000, 30 * 86_400_000).map(lambda ms: Duration(seconds=ms // 1000)),
    any_durations.filter(lambda d: (duration_ms(d) or 0) == 0 or (duration_ms(d) or 0) > 3600_000),
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
    schedule_world: ScheduleWorld,
    timeout: Duration | None,
    key: str,
    key_ttl: Duration | None,
    tags: list[str],
    who: str,
) -> None:
    w = schedule_world
    request = wspb.CreateTokenRequest(idempotency_key=key, tags=tags)
    if timeout is not None:
        request.timeout.CopyFrom(timeout)
    if key_ttl is not None:
        request.idempotency_key_ttl.CopyFrom(key_ttl)
    what = f"CreateToken({request!r}) as {who!r}"
    before = token_rows(w)
    outcome = w.call(WAIT + "CreateToken", request, who, wspb.CreateTokenResponse)
    assert_proper(outcome, what)
    if outcome.code is not OK:
        assert token_rows(w) == before, f"{what} refused, yet rows changed"
    bad = set()
    if len(tags) > LIMITS.tags or any(
        not t or len(t) > LIMITS.tag_length or "\x00" in t for t in tags
    ):
        bad.add("tags")
    elif len(key) > LIMITS.idempotency_key_length or "\x00" in key:
        bad.add("idempotency_key")
    elif timeout is not None and not (duration_ms(timeout) or 0) >= 1:
        bad.add("timeout")
    elif key_ttl is not None and (duration_ms(key_ttl) or 0) < 1000:
        bad.add("idempotency_key_ttl")
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif bad:
        assert_refused(outcome, bad, what)
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
        theirs = w.call(WAIT + "GetToken", wspb.GetTokenRequest(token_id=token.id), other_env(who))
        assert theirs.code is NOT_FOUND, str(theirs)


@given(
    method=st.sampled_from(["GetToken", "CompleteToken"]),
    ref=token_refs,
    data=token_data,
    who=auths,
)
@FUZZ
def test_get_and_complete_token_with_random_fields_answer_properly(
    schedule_world: ScheduleWorld, method: str, ref: str, data: str, who: str
) -> None:
    w = schedule_world
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
    before = token_rows(w)
    outcome = w.call(WAIT + method, request, who, response_type)
    assert_proper(outcome, what)
    if outcome.code is not OK or method == "GetToken":
        assert token_rows(w) == before, f"{what}: rows changed"
    well_formed = TOKEN_ID.fullmatch(token_id)
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not well_formed:
        assert_refused(outcome, {"token_id"}, what)
    elif method == "CompleteToken" and not json_ok(data, LIMITS.payload_bytes):
        assert_refused(outcome, {"data"}, what)
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
    token=st.one_of(st.just(""), texts, id_like("waitpoint_").map(page_token_for)),
    who=auths,
)
@FUZZ
def test_list_tokens_with_random_fields_answers_properly(
    schedule_world: ScheduleWorld,
    statuses: list[int],
    tags: list[str],
    key: str,
    page_size: int,
    token: str,
    who: str,
) -> None:
    w = schedule_world
    request = wspb.ListTokensRequest(
        tags=tags, idempotency_key=key, page_size=page_size, page_token=token
    )
    request.statuses.extend(statuses)  # type: ignore[arg-type]
    what = f"ListTokens({request!r}) as {who!r}"
    before = token_rows(w)
    outcome = w.call(WAIT + "ListTokens", request, who, wspb.ListTokensResponse)
    assert_proper(outcome, what)
    assert token_rows(w) == before
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not 0 <= page_size <= LIMITS.page_size:
        assert_refused(outcome, {"page_size"}, what)
    elif any(not 1 <= s <= 3 for s in statuses):
        assert_refused(outcome, {"statuses"}, what)
    elif outcome.code is not OK:
        assert_refused(outcome, {"tags", "idempotency_key", "page_token"}, what)
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
