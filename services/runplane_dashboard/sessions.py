"""Dashboard sessions: a random id in an HttpOnly, SameSite=Strict cookie names a session held
here, server-side, with the SDK client of the key that logged in (so each session sees its key's
environment only) and the CSRF token every POST must carry."""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runplane import Client

COOKIE = "runplane_session"


@dataclass
class Session:
    """One logged-in browser: its client (the key's environment) and its CSRF token."""

    id: str
    client: Client
    environment: str
    environment_id: str
    # The realtime service's HTTP base URL, for the SSE feeds the dashboard relays.
    realtime_http_url: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    last_seen: float = 0.0

    def csrf_ok(self, token: str) -> bool:
        return hmac.compare_digest(self.csrf.encode(), token.encode())

    @property
    def secret_key(self) -> str:
        return self.client.secret_key


class Sessions:
    """The server-side session store, keyed by unguessable ids; a session idle for
    ``idle_timeout`` seconds is gone."""

    def __init__(self, idle_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def create(
        self, client: Client, environment: str, environment_id: str, realtime_http_url: str
    ) -> Session:
        session = Session(
            id=secrets.token_urlsafe(32),
            client=client,
            environment=environment,
            environment_id=environment_id,
            realtime_http_url=realtime_http_url,
            last_seen=self._clock(),
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of ``session_id``, touched; None if unknown or expired."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > self.idle_timeout:
            del self._sessions[session_id]
            return None
        session.last_seen = now
        return session

    def drop(self, session_id: str) -> Session | None:
        return self._sessions.pop(session_id, None)

    def expired(self) -> list[Session]:
        """Remove and return the sessions idle too long (their clients are the caller's to
        close)."""
        now = self._clock()
        gone = [s for s in self._sessions.values() if now - s.last_seen > self.idle_timeout]
        for session in gone:
            del self._sessions[session.id]
        return gone

    def all(self) -> list[Session]:
        return list(self._sessions.values())
