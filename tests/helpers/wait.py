"""``eventually``: poll for a condition instead of sleeping."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    *,
    description: str | None = None,
    interval: float = 0.01,
) -> T:
    """Call ``predicate`` (sync or async) until it returns a truthy value, and return that value.

    A predicate may also assert: an ``AssertionError`` counts as "not yet". On timeout this raises
    ``AssertionError`` naming ``description`` (or the predicate) with the last value or assertion.
    The delay between calls starts at ``interval`` and doubles up to 0.1 s.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result  # type: ignore[return-value]  # awaited above when awaitable
            last = f"last value: {result!r}"
        except AssertionError as error:
            last = f"last assertion: {error}"
        if time.monotonic() >= deadline:
            what = description or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"not true within {timeout:g}s: {what} ({last})")
        await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
        delay = min(delay * 2, 0.1)
