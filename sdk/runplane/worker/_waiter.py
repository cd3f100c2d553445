"""The waits of an attempt in a task process (the executor side of ``runplane.wait``).

Each attempt gets an :class:`AttemptWaiter` in ``ctx.extra``: a wait takes the attempt's next
sequence number, goes to the executor as a :class:`Wait` message and awaits a future that a
:class:`Resume` message resolves. Sequence numbers follow call order, which is what lets a replay
of the run find its journaled results.

Each wait is a ``wait <type>`` span under the attempt's, from suspend to resume; its trace context
goes with the request, so the child runs of ``trigger_and_wait`` sit under it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from runplane import telemetry
from runplane.worker._messages import Kind, Wait, WaitOutcome, WaitRequest, WaitResult

# Called with (hook name, the wait described for the user): the on_wait/on_resume hooks.
WaitHooks = Callable[[str, dict[str, Any]], Awaitable[None]]


class AttemptWaiter:
    def __init__(
        self, attempt_id: str, send: Callable[[Wait], None], hooks: WaitHooks | None = None
    ) -> None:
        self.attempt_id = attempt_id
        self._send = send
        self._hooks = hooks
        self._seq = itertools.count(1)
        self._pending: dict[int, asyncio.Future[WaitOutcome]] = {}
        # Set when the executor evicts the attempt: it may not wait again (user code that
        # swallowed the CancelledError must not journal waits out of order).
        self.evicted = False

    async def wait(self, request: WaitRequest) -> WaitOutcome:
        if self.evicted:
            raise asyncio.CancelledError("the attempt was evicted while it waited")
        seq = next(self._seq)
        future: asyncio.Future[WaitOutcome] = asyncio.get_running_loop().create_future()
        self._pending[seq] = future
        described = describe(request)
        if self._hooks is not None:
            await self._hooks("on_wait", described)
        with telemetry.tracer().start_as_current_span(
            f"wait {described['type']}",
            attributes={
                "runplane.attempt_id": self.attempt_id,
                "runplane.wait.seq": seq,
                **{f"runplane.wait.{k}": v for k, v in described.items() if k != "type"},
            },
            # Ending in a cancel is the attempt's eviction or cancellation, marked below.
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            traced = {**request, "traceparent": telemetry.current_traceparent()}
            self._send(Wait(Kind.WAIT, self.attempt_id, seq, traced))
            try:
                outcome = await future
            except asyncio.CancelledError:
                # An evicted attempt's replay gets this wait's result from the journal, under
                # a wait span of its own.
                span.set_attribute("runplane.wait.evicted", self.evicted)
                raise
            finally:
                self._pending.pop(seq, None)
            span.set_attribute("runplane.wait.ok", outcome.ok)
        if self._hooks is not None:
            await self._hooks("on_resume", described)
        return outcome

    def resume(self, results: list[WaitResult]) -> None:
        """Resolve the waits these results are for; results of earlier waits are ignored."""
        for seq, ok, output, error in results:
            future = self._pending.get(seq)
            if future is not None and not future.done():
                future.set_result(WaitOutcome(ok, output, error))


def describe(request: WaitRequest) -> dict[str, Any]:
    """A wait as the on_wait/on_resume hooks see it."""
    if "duration_ms" in request:
        return {"type": "duration", "seconds": request["duration_ms"] / 1000}
    if "until_ms" in request:
        return {"type": "until", "until_ms": request["until_ms"]}
    if "token_id" in request:
        return {"type": "token", "token_id": request["token_id"]}
    return {"type": "children", "count": len(request.get("children", []))}
