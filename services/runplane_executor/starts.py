"""Held start reports: an attempt that ends at once is reported by its result alone.

After an assignment the executor would send three messages, each a database write at the
scheduler: the acknowledgement, "started" and the result. Most attempts of short tasks end
within milliseconds, so the first two are held for a moment (:data:`HOLD`). An attempt that
ends within it is reported by its result alone, carrying its start time, and the scheduler
records start and end in one write (the run's events are the same). One still running when
the moment passes is reported as before: "started" with its start time, or the acknowledgement
if it has not started yet. Any other report of the attempt (metadata, logs, a wait) releases
its held report first, so the scheduler always sees the start before what follows it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from runplane.v1 import worker_service_pb2 as wpb

# Long enough for a short task to finish, short against the scheduler's acknowledgement timeout.
HOLD = 0.02

Send = Callable[[wpb.ConnectRequest], None]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Held:
    __slots__ = ("handle", "started_at")

    def __init__(self, handle: asyncio.TimerHandle) -> None:
        self.handle = handle
        self.started_at: int | None = None


class HeldStarts:
    def __init__(self, send: Send, hold: float = HOLD) -> None:
        self._send = send
        self._hold = hold
        self._held: dict[str, _Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def assigned(self, attempt_id: str) -> None:
        if self._hold <= 0:
            self._send(wpb.ConnectRequest(ack=wpb.AssignmentAck(attempt_id=attempt_id)))
            return
        handle = asyncio.get_running_loop().call_later(self._hold, self.release, attempt_id)
        self._held[attempt_id] = _Held(handle)

    def started(self, attempt_id: str) -> None:
        held = self._held.get(attempt_id)
        if held is not None:
            held.started_at = now_ms()
        else:
            self._send(_started(attempt_id, now_ms()))

    def release(self, attempt_id: str) -> None:
        """Send what is held for the attempt now (nothing if nothing is)."""
        held = self._held.pop(attempt_id, None)
        if held is None:
            return
        held.handle.cancel()
        if held.started_at is None:
            self._send(wpb.ConnectRequest(ack=wpb.AssignmentAck(attempt_id=attempt_id)))
        else:
            self._send(_started(attempt_id, held.started_at))

    def ended(self, attempt_id: str) -> int | None:
        """The attempt's result is going out: its start time if that was held back (the result
        carries it), else None (its start was reported, or it never started)."""
        held = self._held.pop(attempt_id, None)
        if held is None:
            return None
        held.handle.cancel()
        return held.started_at


def _started(attempt_id: str, at_ms: int) -> wpb.ConnectRequest:
    message = wpb.ConnectRequest(started=wpb.AttemptStarted(attempt_id=attempt_id))
    message.started.started_at.FromMilliseconds(at_ms)
    return message
