"""What a running task knows about itself: ``ctx``."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Signal:
    """Tells a task it is being cancelled or has run out of time. Poll ``cancelled`` (also safe
    from a plain ``def`` task's thread, and set even while the event loop is blocked) or
    ``await signal.wait()``. ``reason`` is "cancelled" or "timeout"."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.reason = ""

    @property
    def cancelled(self) -> bool:
        return self._flag.is_set()

    def trigger(self, reason: str) -> None:
        self.reason = reason
        self._flag.set()
        for loop, event in self._waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait(self) -> str:
        if not self.cancelled:
            event = asyncio.Event()
            self._waiters.append((asyncio.get_running_loop(), event))
            if not self.cancelled:
                await event.wait()
        return self.reason


@dataclass(frozen=True)
class RunContext:
    id: str
    tags: list[str]
    is_test: bool
    is_replay: bool
    created_at: datetime | None
    started_at: datetime | None
    idempotency_key: str | None
    max_attempts: int
    priority: int
    parent_run_id: str | None
    root_run_id: str | None
    batch_id: str | None
    # Seconds of execution allowed per attempt; 0: no limit.
    max_duration: float = 0


@dataclass(frozen=True)
class AttemptContext:
    id: str
    number: int
    started_at: datetime


@dataclass(frozen=True)
class TaskContext:
    id: str


@dataclass(frozen=True)
class QueueContext:
    name: str


@dataclass(frozen=True)
class EnvironmentContext:
    id: str
    slug: str
    type: str


@dataclass(frozen=True)
class MachineContext:
    name: str
    cpu: float
    memory: float


@dataclass(frozen=True)
class DeploymentContext:
    """The worker version this attempt's code is (``runplane versions ls`` lists them)."""

    version: str


@dataclass(frozen=True)
class Context:
    """``ctx``: the run, attempt, task, queue, environment, machine and deployment (worker
    version) of this attempt."""

    run: RunContext
    attempt: AttemptContext
    task: TaskContext
    queue: QueueContext
    environment: EnvironmentContext
    machine: MachineContext
    deployment: DeploymentContext = field(default_factory=lambda: DeploymentContext(""))
    signal: Signal = field(default_factory=Signal, compare=False)
    # The attempt's runtime (metadata buffer, log sink, init value), set by the task process.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def version(self) -> str:
        """The worker version of the code running this attempt (the run is locked to it)."""
        return self.deployment.version

    @property
    def init(self) -> Any:
        """What the ``init`` hooks returned (the last one's value), or None."""
        return self.extra.get("init")


_current: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "runplane_context", default=None
)


def current_context() -> Context | None:
    """The ``ctx`` of the attempt this code runs in, or None outside a task."""
    return _current.get()


def set_current_context(ctx: Context | None) -> contextvars.Token[Context | None]:
    return _current.set(ctx)
