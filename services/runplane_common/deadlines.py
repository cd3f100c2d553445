"""The caller's deadline, carried to the calls a service makes on its behalf.

The server interceptor (``grpcserver``) notes when each call's caller stops waiting; a service
calling another for that caller (realtime asking the scheduler for a snapshot, say) gives the
inner call no more time than is left, so work nobody waits for any more is not started.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

# When (time.monotonic()) the caller of the call being served stops waiting; None: it waits.
_caller_deadline: ContextVar[float | None] = ContextVar("runplane_caller_deadline", default=None)

# An inner call is never given less than this: a deadline that has just passed still gets one
# quick try, which answers DEADLINE_EXCEEDED like the caller's own would.
MINIMUM_SECONDS = 0.001


def set_caller_deadline(time_remaining: float | None) -> None:
    """The call being served must answer within ``time_remaining`` seconds (None: no deadline)."""
    _caller_deadline.set(None if time_remaining is None else time.monotonic() + time_remaining)


def inner_timeout(default: float) -> float:
    """The timeout of a call made for the current caller: ``default``, or less when the caller's
    deadline comes sooner."""
    deadline = _caller_deadline.get()
    if deadline is None:
        return default
    return max(MINIMUM_SECONDS, min(default, deadline - time.monotonic()))
