"""AuthService's contract under bad input: CreatePublicToken with random scopes and expiries;
a refusal names the field at fault and a token it mints works for its own environment.
"""

from __future__ import annotations

import time

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from runplane.v1 import auth_service_pb2 as apb
from runplane.v1 import meta_service_pb2 as mpb
from runplane_scheduler.store import tables as db
from tests.helpers.contract import (
    AUTH,
    FUZZ,
    KEYS,
    OK,
    UNAUTHENTICATED,
    assert_proper,
    assert_refused,
    unary,
)
from tests.helpers.inputs import (
    any_durations,
    any_timestamps,
    auths,
    duration_ms,
    task_id_ok,
    texts,
    timestamp_ok,
)
from tests.helpers.worlds import (
    ScheduleWorld,
)

pytestmark = pytest.mark.timeout(600)

THIRTY_DAYS_MS = 30 * 86_400_000


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
    schedule_world: ScheduleWorld,
    scopes: list[str],
    expires_in: Duration | None,
    expires_at: Timestamp | None,
    single_use: bool,
    who: str,
) -> None:
    w = schedule_world
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
        if not timestamp_ok(expires_at) or not 0 < expires_at.ToMilliseconds() - now <= (
            THIRTY_DAYS_MS
        ):
            bad.add("expires_at")
    elif expires_in is not None:
        ms = duration_ms(expires_in)
        if ms is None or not 0 < ms <= THIRTY_DAYS_MS:
            bad.add("expires_in")
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
        return
    # Times a few ms either side of a bound may go either way.
    near = False
    if expires_at is not None and timestamp_ok(expires_at):
        left = expires_at.ToMilliseconds() - now
        near = min(abs(left - b) for b in (0, THIRTY_DAYS_MS)) < 5000
    if near and bad <= {"expires_at"}:
        if outcome.code is not OK:
            assert_refused(outcome, {"expires_at"}, what)
    elif bad:
        assert_refused(outcome, bad, what)
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
    schedule_world: ScheduleWorld, scopes: list[str], minutes: int
) -> None:
    request = apb.CreatePublicTokenRequest(scopes=scopes, expires_in=Duration(seconds=minutes * 60))
    got = schedule_world.ok(
        AUTH + "CreatePublicToken", request, "dev", apb.CreatePublicTokenResponse
    )
    assert got.token.count(".") == 2 and got.expires_at.seconds > time.time()
