"""The dashboard's session store (idle expiry, unguessable ids, CSRF tokens) and its redirect
targets after login (paths on the site only)."""

from __future__ import annotations

import pytest

import runplane
from runplane_dashboard.app import _safe_next
from runplane_dashboard.sessions import Sessions


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _client() -> runplane.Client:
    return runplane.Client(api_url="127.0.0.1:1", secret_key="rp_dev_test")


def test_a_session_lives_while_used_and_ends_after_its_idle_timeout() -> None:
    clock = Clock()
    sessions = Sessions(idle_timeout=60, clock=clock)
    session = sessions.create(_client(), "dev", "env_dev", "http://127.0.0.1:2")
    other = sessions.create(_client(), "prod", "env_prod", "http://127.0.0.1:2")
    assert session.id != other.id and len(session.id) >= 40
    assert session.csrf != other.csrf
    clock.now = 50
    assert sessions.get(session.id) is session  # touched: idle from 50 on
    clock.now = 100
    assert sessions.get(session.id) is session
    assert sessions.expired() == [other]
    clock.now = 161
    assert sessions.get(session.id) is None
    assert sessions.get(None) is None and sessions.get("forged") is None


def test_the_csrf_token_must_match_exactly() -> None:
    session = Sessions(idle_timeout=60).create(_client(), "dev", "env_dev", "")
    assert session.csrf_ok(session.csrf)
    assert not session.csrf_ok("")
    assert not session.csrf_ok(session.csrf[:-1])


@pytest.mark.parametrize(
    ("wanted", "goes_to"),
    [
        ("/runs/run_1?x=1", "/runs/run_1?x=1"),
        ("/queues", "/queues"),
        ("https://evil.example/", "/runs"),
        ("//evil.example/", "/runs"),
        ("/\\evil.example", "/runs"),
        ("/logout", "/runs"),
        ("/runs/events?ids=a", "/runs"),
        ("", "/runs"),
    ],
)
def test_after_login_only_a_page_of_the_site_is_a_redirect_target(
    wanted: str, goes_to: str
) -> None:
    assert _safe_next(wanted) == goes_to
