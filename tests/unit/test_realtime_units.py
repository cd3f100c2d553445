"""Pure pieces of realtime and access: JWT signing, scope checks, scope flattening, token
lifetimes and stream write targets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from runplane._auth import _expiry, flatten_scopes
from runplane._context import (
    AttemptContext,
    Context,
    EnvironmentContext,
    MachineContext,
    QueueContext,
    RunContext,
    TaskContext,
    set_current_context,
)
from runplane._errors import ConfigurationError
from runplane._streams import _target_run
from runplane.v1 import auth_service_pb2
from runplane_common import auth
from runplane_common.errors import InvalidArgument, PermissionDenied, Unauthenticated

KEY = b"k" * 32
NOW = 1_800_000_000_000


def test_a_jwt_verifies_with_its_key_only_and_until_it_expires() -> None:
    token = auth.sign_jwt(KEY, {"sub": "env_1", "exp": NOW / 1000 + 60})
    assert auth.verify_jwt(KEY, token, NOW)["sub"] == "env_1"
    with pytest.raises(Unauthenticated, match="signature"):
        auth.verify_jwt(b"other", token, NOW)
    with pytest.raises(Unauthenticated, match="expired"):
        auth.verify_jwt(KEY, token, NOW + 60_000)
    with pytest.raises(Unauthenticated, match="malformed"):
        auth.verify_jwt(KEY, "a.b", NOW)
    assert auth.is_public_token(token) and not auth.is_public_token("rp_dev_abc")


def _token(*scopes: str) -> auth.Principal:
    return auth.Principal("env_1", "dev", scopes=frozenset(scopes))


def test_scopes_decide_what_a_public_token_reads_lists_and_triggers() -> None:
    key = auth.Principal("env_1", "dev")
    auth.authorize_read(key, "run_b", [], "")  # a secret key reads everything
    auth.authorize_read(_token("read:runs:run_a"), "run_a", [], "")
    auth.authorize_read(_token("read:tags:t"), "run_b", ["x", "t"], "")
    auth.authorize_read(_token("read:batch:batch_1"), "run_b", [], "batch_1")
    with pytest.raises(PermissionDenied):
        auth.authorize_read(_token("read:runs:run_a"), "run_b", ["t"], "batch_1")
    auth.authorize_list(_token("read:tags:t"), ["t", "other"], "")
    with pytest.raises(PermissionDenied):
        auth.authorize_list(_token("read:tags:t"), ["other"], "")
    with pytest.raises(PermissionDenied):
        auth.authorize_list(_token("read:runs:run_a"), [], "")
    auth.authorize_trigger(_token("trigger:tasks:hello"), "hello")
    with pytest.raises(PermissionDenied):
        auth.authorize_trigger(_token("trigger:tasks:hello"), "other")
    with pytest.raises(PermissionDenied):
        auth.authorize_method(_token("read:runs:run_a"), "/runplane.v1.RunService/CancelRun")
    auth.authorize_method(_token("read:runs:run_a"), "/runplane.v1.RunService/GetRun")


def test_scope_strings_are_validated_and_flattened() -> None:
    assert flatten_scopes({"read": {"runs": ["run_1", "run_2"], "tags": "t"}}) == [
        "read:runs:run_1",
        "read:runs:run_2",
        "read:tags:t",
    ]
    assert auth.validate_scopes(["read:runs:run_1", "read:runs:run_1"]) == ["read:runs:run_1"]
    with pytest.raises(InvalidArgument) as bad:
        auth.validate_scopes(["read:runs:run_1", "admin:all:x"])
    assert bad.value.field == "scopes[1]"


def test_expiration_times_are_spans_datetimes_or_unix_seconds() -> None:
    request = auth_service_pb2.CreatePublicTokenRequest()
    _expiry(request, "15m")
    assert request.expires_in.ToTimedelta() == timedelta(minutes=15)
    _expiry(request, timedelta(hours=2))
    assert request.expires_in.ToTimedelta() == timedelta(hours=2)
    when = datetime(2030, 1, 1, tzinfo=UTC)
    _expiry(request, when)
    assert request.expires_at.ToDatetime(tzinfo=UTC) == when
    _expiry(request, when.timestamp())
    assert request.expires_at.ToDatetime(tzinfo=UTC) == when
    with pytest.raises(ValueError, match="span"):
        _expiry(request, "soon")


def _context(parent: str | None, root: str | None) -> Context:
    now = datetime.now(UTC)
    return Context(
        run=RunContext("run_self", [], False, False, now, now, None, 1, 0, parent, root, None),
        attempt=AttemptContext("att_1", 1, now),
        task=TaskContext("t"),
        queue=QueueContext("q"),
        environment=EnvironmentContext("env_dev", "dev", "DEVELOPMENT"),
        machine=MachineContext("small-1x", 1, 1),
    )


def test_stream_writes_go_to_this_run_its_parent_its_root_or_a_run_id() -> None:
    with pytest.raises(ConfigurationError):
        _target_run("self")  # outside a task
    assert _target_run("run_other") == "run_other"
    set_current_context(_context("run_parent", "run_root"))
    try:
        assert _target_run("self") == "run_self"
        assert _target_run("parent") == "run_parent"
        assert _target_run("root") == "run_root"
    finally:
        set_current_context(None)
    set_current_context(_context(None, None))
    try:
        assert _target_run("root") == "run_self"  # a run without a parent is its own root
        with pytest.raises(ConfigurationError, match="no parent"):
            _target_run("parent")
    finally:
        set_current_context(None)
