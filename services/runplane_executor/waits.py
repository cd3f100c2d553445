"""The waits of the attempts in a task process (the executor side of ``runplane.wait``).

Each attempt gets a :class:`AttemptWaiter` in ``ctx.extra``: a wait takes the attempt's next
sequence number, goes to the executor as ``("wait", attempt_id, seq, request)`` and awaits a
future that a ``("resume", attempt_id, results)`` message resolves. Sequence numbers follow call
order, which is what lets a replay of the run find its journaled results.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from runplane.v1 import worker_service_pb2 as wpb

Outcome = tuple[bool, str, dict[str, str] | None]
Send = Callable[[tuple[Any, ...]], None]
# Called with (hook name, the wait described for the user): the on_wait/on_resume hooks.
WaitHooks = Callable[[str, dict[str, Any]], Awaitable[None]]


class AttemptWaiter:
    def __init__(self, attempt_id: str, send: Send, hooks: WaitHooks | None = None) -> None:
        self.attempt_id = attempt_id
        self._send = send
        self._hooks = hooks
        self._seq = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Outcome]] = {}

    async def wait(self, request: dict[str, Any]) -> Outcome:
        seq = next(self._seq)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending[seq] = future
        described = describe(request)
        if self._hooks is not None:
            await self._hooks("on_wait", described)
        self._send(("wait", self.attempt_id, seq, request))
        try:
            outcome = await future
        finally:
            self._pending.pop(seq, None)
        if self._hooks is not None:
            await self._hooks("on_resume", described)
        return outcome

    def resume(self, results: list[tuple[int, bool, str, dict[str, str] | None]]) -> None:
        """Resolve the waits these results are for; results of earlier waits are ignored."""
        for seq, ok, output, error in results:
            future = self._pending.get(seq)
            if future is not None and not future.done():
                future.set_result((ok, output, error))


def describe(request: dict[str, Any]) -> dict[str, Any]:
    """A wait as the on_wait/on_resume hooks see it."""
    if "duration_ms" in request:
        return {"type": "duration", "seconds": request["duration_ms"] / 1000}
    if "until_ms" in request:
        return {"type": "until", "until_ms": request["until_ms"]}
    if "token_id" in request:
        return {"type": "token", "token_id": request["token_id"]}
    return {"type": "children", "count": len(request.get("children", []))}


def wait_request(attempt_id: str, seq: int, request: dict[str, Any]) -> wpb.WaitRequest:
    """The stream message of a task process's wait."""
    out = wpb.WaitRequest(
        attempt_id=attempt_id,
        seq=seq,
        idempotency_key=request.get("idempotency_key", ""),
        idempotency_key_ttl_ms=request.get("idempotency_key_ttl_ms", 0),
    )
    if "duration_ms" in request:
        out.duration_ms = request["duration_ms"]
    elif "until_ms" in request:
        out.until_ms = request["until_ms"]
    elif "token_id" in request:
        out.token_id = request["token_id"]
    else:
        for item in request["children"]:
            out.children.items.add().ParseFromString(item)
    return out


def resume_results(resume: wpb.Resume) -> list[tuple[int, bool, str, dict[str, str] | None]]:
    """A Resume's results as the pipe carries them."""
    return [
        (
            r.seq,
            r.ok,
            r.output,
            {"type": r.error.type, "message": r.error.message, "stack_trace": r.error.stack_trace}
            if r.HasField("error")
            else None,
        )
        for r in resume.results
    ]
