"""Defining tasks: ``@task``, ``queue()`` and the registry executors build manifests from."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, overload

from runplane import _durations
from runplane._errors import ConfigurationError
from runplane._hooks import HOOK_NAMES, Hooks
from runplane._models import BatchHandle, BatchItem, RunHandle
from runplane._transport import default_transport
from runplane._trigger import batch_trigger, child_item, task_items, trigger
from runplane._wait import Result, wait_for_children

R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_MACHINE = "small-1x"

# (vcpu, memory in GB) of each machine preset (reference §1.6).
MACHINES: dict[str, tuple[float, float]] = {
    "micro": (0.25, 0.25),
    "small-1x": (0.5, 0.5),
    "small-2x": (1, 1),
    "medium-1x": (1, 2),
    "medium-2x": (2, 4),
    "large-1x": (4, 8),
    "large-2x": (8, 16),
}


@dataclass(frozen=True)
class Queue:
    """A named queue, shareable by several tasks; ``concurrency_limit`` None: the environment's.

    With a concurrency key each key gets its own copy of ``concurrency_limit``;
    ``total_concurrency_limit`` caps all keys together. ``rate_limit`` lets at most
    ``rate_limit[0]`` runs start per ``rate_limit[1]`` seconds; the rest wait queued."""

    name: str
    concurrency_limit: int | None = None
    rate_limit: tuple[int, float] | None = None
    total_concurrency_limit: int | None = None


def queue(
    name: str,
    concurrency_limit: int | None = None,
    *,
    rate_limit: dict[str, Any] | None = None,
    total_concurrency_limit: int | None = None,
) -> Queue:
    """Declare a queue: ``emails = queue(name="emails", concurrency_limit=5,
    rate_limit={"limit": 100, "period": "1m"})``."""
    if name.startswith("queue_"):
        raise ConfigurationError(
            f"queue {name!r}: names starting with 'queue_' are reserved for ids"
        )
    for option, value in (
        ("concurrency_limit", concurrency_limit),
        ("total_concurrency_limit", total_concurrency_limit),
    ):
        if value is not None and not 0 <= value <= 100_000:
            raise ConfigurationError(f"queue {name!r}: {option} must be 0..100000")
    rate = None
    if rate_limit is not None:
        if set(rate_limit) != {"limit", "period"} or not isinstance(rate_limit["limit"], int):
            raise ConfigurationError(
                f'queue {name!r}: rate_limit is {{"limit": N, "period": "1m"}}, got {rate_limit!r}'
            )
        period = _durations.seconds(rate_limit["period"], f"queue {name!r} rate_limit.period")
        if rate_limit["limit"] < 1 or period <= 0:
            raise ConfigurationError(f"queue {name!r}: rate_limit needs limit >= 1, period > 0")
        rate = (rate_limit["limit"], period)
    return Queue(
        name=name,
        concurrency_limit=concurrency_limit,
        rate_limit=rate,
        total_concurrency_limit=total_concurrency_limit,
    )


@dataclass(frozen=True)
class RetryOptions:
    max_attempts: int = 3
    factor: float = 2.0
    min_timeout: float = 1.0
    max_timeout: float = 60.0
    randomize: bool = True
    # Retry an attempt that ran out of memory on this machine (``{"out_of_memory": {"machine":
    # "large-1x"}}``); None: out-of-memory is never retried.
    out_of_memory_machine: str | None = None

    @classmethod
    def parse(cls, value: RetryOptions | dict[str, Any] | None) -> RetryOptions:
        if value is None:
            return cls()
        if isinstance(value, RetryOptions):
            return value
        fields = set(cls.__dataclass_fields__) - {"out_of_memory_machine"}
        unknown = set(value) - fields - {"out_of_memory"}
        if unknown:
            raise ConfigurationError(f"unknown retry option(s): {', '.join(sorted(unknown))}")
        oom = value.get("out_of_memory") or {}
        machine = oom.get("machine") if isinstance(oom, dict) else None
        if machine is not None and machine not in MACHINES:
            raise ConfigurationError(
                f"retry.out_of_memory.machine: unknown machine {machine!r}; "
                f"one of {', '.join(MACHINES)}"
            )
        options = cls(
            **{k: v for k, v in value.items() if k in fields}, out_of_memory_machine=machine
        )
        if not 1 <= options.max_attempts <= 250:
            raise ConfigurationError("retry.max_attempts must be 1..250")
        return options


@dataclass
class Task(Generic[R]):
    """A task: the decorated function and its options. Trigger it with :meth:`trigger`."""

    id: str
    fn: Callable[..., Awaitable[R] | R]
    queue: Queue
    retry: RetryOptions = field(default_factory=RetryOptions)
    # None: the default machine, run in the executor's shared warm pool; a name: each attempt
    # runs in a process of its own with that machine's memory limit.
    machine: str | None = None
    max_duration: float = 0
    description: str = ""
    ttl: float = 0  # seconds; 0: runs never expire
    hooks: Hooks = field(default_factory=Hooks)

    @property
    def machine_name(self) -> str:
        return self.machine or DEFAULT_MACHINE

    # Hooks as decorators on the task object: ``@my_task.on_success``. Signatures: see _hooks.
    def middleware(self, fn: F) -> F:
        return self.hooks.add("middleware", fn)

    def init(self, fn: F) -> F:
        return self.hooks.add("init", fn)

    def on_start(self, fn: F) -> F:
        return self.hooks.add("on_start", fn)

    def on_start_attempt(self, fn: F) -> F:
        return self.hooks.add("on_start_attempt", fn)

    def on_success(self, fn: F) -> F:
        return self.hooks.add("on_success", fn)

    def on_failure(self, fn: F) -> F:
        return self.hooks.add("on_failure", fn)

    def on_complete(self, fn: F) -> F:
        return self.hooks.add("on_complete", fn)

    def on_cancel(self, fn: F) -> F:
        return self.hooks.add("on_cancel", fn)

    def catch_error(self, fn: F) -> F:
        return self.hooks.add("catch_error", fn)

    def cleanup(self, fn: F) -> F:
        return self.hooks.add("cleanup", fn)

    def on_wait(self, fn: F) -> F:
        return self.hooks.add("on_wait", fn)

    def on_resume(self, fn: F) -> F:
        return self.hooks.add("on_resume", fn)

    # Read on every attempt: worked out once.
    @functools.cached_property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    @functools.cached_property
    def wants_context(self) -> bool:
        params = [
            p
            for p in inspect.signature(self.fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        return len(params) >= 2

    @functools.cached_property
    def payload_type(self) -> Any:
        params = list(inspect.signature(self.fn).parameters.values())
        if not params or params[0].annotation is inspect.Parameter.empty:
            return None
        try:
            hints = inspect.get_annotations(self.fn, eval_str=True)
        except Exception:
            return None
        return hints.get(params[0].name)

    async def trigger(self, payload: Any = None, **options: Any) -> RunHandle:
        """Trigger a run of this task; see :meth:`runplane.Client.tasks.trigger` for options."""
        return await trigger(default_transport(), self.id, payload, **options)

    def trigger_sync(self, payload: Any = None, **options: Any) -> RunHandle:
        return default_transport().run_sync(self.trigger(payload, **options))

    async def batch_trigger(
        self, items: Sequence[BatchItem], *, idempotency_key: str | None = None
    ) -> BatchHandle:
        """Trigger up to 1,000 runs at once, all or none, in item order; each item is
        ``{"payload": ..., "options": {...}}`` with :meth:`trigger`'s options."""
        return await batch_trigger(default_transport(), task_items(self.id, items), idempotency_key)

    def batch_trigger_sync(self, items: Sequence[BatchItem], **kwargs: Any) -> BatchHandle:
        return default_transport().run_sync(self.batch_trigger(items, **kwargs))

    async def trigger_and_wait(self, payload: Any = None, **options: Any) -> Result[R]:
        """Inside a run: trigger a child run and wait for it (the run is WAITING meanwhile).
        Returns a :class:`Result`; a failed child does not raise until ``unwrap()``."""
        [result] = await wait_for_children(
            "trigger_and_wait", [child_item(self.id, payload, options)]
        )
        return result

    async def batch_trigger_and_wait(self, items: Sequence[BatchItem]) -> list[Result[R]]:
        """Inside a run: trigger child runs and wait for all of them; results in item order."""
        return await wait_for_children(
            "batch_trigger_and_wait",
            [child_item(self.id, item.get("payload"), item.get("options") or {}) for item in items],
        )


_REGISTRY: dict[str, Task[Any]] = {}


def registered_tasks() -> dict[str, Task[Any]]:
    """Every task defined so far in this process, by id."""
    return dict(_REGISTRY)


class TaskDecorator(Protocol):
    """What ``@task(id=...)`` returns: turns the function below it into a typed Task."""

    @overload
    def __call__(self, fn: Callable[..., Awaitable[R]], /) -> Task[R]: ...
    @overload
    def __call__(self, fn: Callable[..., R], /) -> Task[R]: ...


@overload
def task(fn: Callable[..., Awaitable[R]], /) -> Task[R]: ...
@overload
def task(
    *,
    id: str,
    queue: Queue | str | None = None,
    retry: RetryOptions | dict[str, Any] | None = None,
    machine: str | None = None,
    max_duration: float = 0,
    description: str = "",
    ttl: _durations.DurationLike = 0,
    middleware: Callable[..., Any] | None = None,
    init: Callable[..., Any] | None = None,
    on_start: Callable[..., Any] | None = None,
    on_start_attempt: Callable[..., Any] | None = None,
    on_success: Callable[..., Any] | None = None,
    on_failure: Callable[..., Any] | None = None,
    on_complete: Callable[..., Any] | None = None,
    on_cancel: Callable[..., Any] | None = None,
    catch_error: Callable[..., Any] | None = None,
    cleanup: Callable[..., Any] | None = None,
    on_wait: Callable[..., Any] | None = None,
    on_resume: Callable[..., Any] | None = None,
) -> TaskDecorator: ...


def task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    id: str | None = None,
    queue: Queue | str | None = None,
    retry: RetryOptions | dict[str, Any] | None = None,
    machine: str | None = None,
    max_duration: float = 0,
    description: str = "",
    ttl: _durations.DurationLike = 0,
    middleware: Callable[..., Any] | None = None,
    init: Callable[..., Any] | None = None,
    on_start: Callable[..., Any] | None = None,
    on_start_attempt: Callable[..., Any] | None = None,
    on_success: Callable[..., Any] | None = None,
    on_failure: Callable[..., Any] | None = None,
    on_complete: Callable[..., Any] | None = None,
    on_cancel: Callable[..., Any] | None = None,
    catch_error: Callable[..., Any] | None = None,
    cleanup: Callable[..., Any] | None = None,
    on_wait: Callable[..., Any] | None = None,
    on_resume: Callable[..., Any] | None = None,
) -> Any:
    """Turn an ``async def`` (or a plain ``def``, run off the event loop) into a :class:`Task`.

    The function takes the payload and, optionally, ``ctx``; its return value (JSON-serialisable)
    is the run's output. ``machine`` (a preset name) runs each attempt in a process of its own
    with that machine's memory limit; left out, attempts share the warm pool. ``max_duration``:
    seconds per attempt, 0 for none. The hook arguments are described in ``runplane._hooks``."""
    hooks = Hooks()
    given = {
        "middleware": middleware,
        "init": init,
        "on_start": on_start,
        "on_start_attempt": on_start_attempt,
        "on_success": on_success,
        "on_failure": on_failure,
        "on_complete": on_complete,
        "on_cancel": on_cancel,
        "catch_error": catch_error,
        "cleanup": cleanup,
        "on_wait": on_wait,
        "on_resume": on_resume,
    }
    assert set(given) == set(HOOK_NAMES)
    for name, hook in given.items():
        if hook is not None:
            hooks.add(name, hook)

    def make(f: Callable[..., Any]) -> Task[Any]:
        task_id = id or f.__name__.replace("_", "-")
        if machine is not None and machine not in MACHINES:
            raise ConfigurationError(
                f"task {task_id!r}: unknown machine {machine!r}; one of {', '.join(MACHINES)}"
            )
        q = queue if isinstance(queue, Queue) else Queue(name=queue or f"task/{task_id}")
        t: Task[Any] = Task(
            id=task_id,
            fn=f,
            queue=q,
            retry=RetryOptions.parse(retry),
            machine=machine,
            max_duration=max_duration,
            description=description or (inspect.getdoc(f) or "").split("\n")[0],
            ttl=_durations.seconds(ttl, f"task {task_id!r} ttl"),
            hooks=hooks,
        )
        existing = _REGISTRY.get(task_id)
        if existing is not None and existing.fn.__qualname__ != f.__qualname__:
            raise ConfigurationError(f"two tasks with id {task_id!r}")
        _REGISTRY[task_id] = t
        return t

    if fn is not None:
        return make(fn)
    return make
