"""Lifecycle hooks of tasks (SPEC §2.2, reference §1.8): per task and global.

Per task, as keyword arguments of ``@task(...)`` or as decorators on the task object::

    @task(id="charge", on_success=notify)
    async def charge(payload: dict, ctx: Context) -> dict: ...

    @charge.on_failure
    async def page_someone(payload, error, ctx): ...

Globally, for every task of the process, on the ``tasks`` namespace: ``tasks.on_success(fn)``
(also usable as ``@tasks.on_success``).

Signatures (each hook may be ``async def`` or a plain ``def``; a plain one runs in a thread):

==================  ===============================================  =============================
hook                called with                                      when
==================  ===============================================  =============================
middleware          ``(payload, ctx, next)``; ``await next()``        around init, on_start*, run
                    returns the output; must be ``async def``
init                ``(payload, ctx)``; its value is ``ctx.init``     every attempt, before run
on_start            ``(payload, ctx)``                               first attempt only
on_start_attempt    ``(payload, ctx)``                               every attempt
on_success          ``(payload, output, ctx)``                       the attempt succeeded
on_failure          ``(payload, error, ctx)``                        the run fails for good
on_complete         ``(payload, outcome, ctx)``: :class:`Outcome`    after on_success/on_failure
on_cancel           ``(payload, ctx)``                               an executing attempt is
                                                                     cancelled
catch_error         ``(payload, error, ctx)`` -> CatchErrorResult,   run (or middleware, init,
                    a dict of its fields, or None                    on_start*) raised
cleanup             ``(payload, ctx)``                               after every attempt
on_wait             ``(payload, wait, ctx)``: the wait as a dict     a wait or child run starts
                    (``{"type": "duration"|"until"|"token"|
                    "children", ...}``)
on_resume           ``(payload, wait, ctx)``                         that wait has ended
==================  ===============================================  =============================

Order per attempt: global middlewares, task middleware, [init, on_start, on_start_attempt, run];
then on success on_success, on_complete; on error catch_error (the task's, then the global ones;
the first that returns something decides), and when the run will not be retried on_failure,
on_complete; last cleanup. For each lifecycle hook the global ones run before the task's.
Errors in middleware, init, on_start and on_start_attempt fail the attempt like an error in
``run``; errors in on_success, on_failure, on_complete, on_cancel, catch_error and cleanup are
logged to the run's logs and change nothing. An attempt stopped by its max_duration calls no
hooks (reference §1.7). on_wait and on_resume errors are logged too; they run in the attempt
around each wait (with parallel waits, around each of them).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

HOOK_NAMES = (
    "middleware",
    "init",
    "on_start",
    "on_start_attempt",
    "on_success",
    "on_failure",
    "on_complete",
    "on_cancel",
    "catch_error",
    "cleanup",
    "on_wait",
    "on_resume",
)


@dataclass(frozen=True)
class Outcome:
    """What ``on_complete`` gets: ``ok`` and the ``output``, or the ``error``."""

    ok: bool
    output: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class CatchErrorResult:
    """What ``catch_error`` may return (a dict with these keys works too).

    ``skip_retrying``: fail the run now. ``retry_at`` / ``retry_delay`` (seconds): retry then
    instead of after the retry policy's back-off. ``error``: record this error instead."""

    skip_retrying: bool = False
    retry_at: datetime | None = None
    retry_delay: float | None = None
    error: BaseException | None = None

    @classmethod
    def parse(cls, value: Any) -> CatchErrorResult:
        if isinstance(value, CatchErrorResult):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise TypeError(
                    f"catch_error returned unknown key(s): {', '.join(sorted(unknown))}"
                )
            return cls(**value)
        raise TypeError(f"catch_error must return CatchErrorResult, a dict or None, not {value!r}")


@dataclass
class Hooks:
    """Hook functions by name, in registration order."""

    by_name: dict[str, list[Callable[..., Any]]] = field(
        default_factory=lambda: {name: [] for name in HOOK_NAMES}
    )

    def add(self, name: str, fn: F) -> F:
        if name not in self.by_name:
            raise ValueError(f"unknown hook {name!r}; one of {', '.join(HOOK_NAMES)}")
        if name == "middleware" and not inspect.iscoroutinefunction(fn):
            raise TypeError("a middleware must be an async def taking (payload, ctx, next)")
        self.by_name[name].append(fn)
        return fn

    def __getitem__(self, name: str) -> list[Callable[..., Any]]:
        return self.by_name[name]


GLOBAL_HOOKS = Hooks()


async def call_hook(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a hook, async or plain (in a thread, with this attempt's context variables)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    if inspect.isawaitable(result):
        return await result
    return result


class GlobalHooks:
    """``tasks.on_success(fn)`` and friends: hooks for every task of the process."""

    def middleware(self, fn: F) -> F:
        """Register ``async def fn(payload, ctx, next)`` around every attempt of every task."""
        return GLOBAL_HOOKS.add("middleware", fn)

    def init(self, fn: F) -> F:
        return GLOBAL_HOOKS.add("init", fn)

    def on_start(self, fn: F) -> F:
        return GLOBAL_HOOKS.add("on_start", fn)

    def on_start_attempt(self, fn: F) -> F:
        return GLOBAL_HOOKS.add("on_start_attempt", fn)

    def on_success(self, fn: F) -> F:
        return GLOBAL_HOOKS.add("on_success", fn)

    def on_failure(self, fn: F) -> F:
        return GLOBAL_HOOKS.add("on_failure", fn)

    def on_complete(self, fn: F) -> F:
        return GLOBAL_HOOKS.add("on_complete", fn)

    def on_cancel(self, fn: F) -> F:
        return GLOBAL_HOOKS.add("on_cancel", fn)

    def catch_error(self, fn: F) -> F:
        return GLOBAL_HOOKS.add("catch_error", fn)

    def cleanup(self, fn: F) -> F:
        return GLOBAL_HOOKS.add("cleanup", fn)

    def on_wait(self, fn: F) -> F:
        return GLOBAL_HOOKS.add("on_wait", fn)

    def on_resume(self, fn: F) -> F:
        return GLOBAL_HOOKS.add("on_resume", fn)
