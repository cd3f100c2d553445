"""What the engine is asked to do, as plain dataclasses: task definitions, validated trigger
requests and their debounce, and the guard a trigger's write must pass.

No I/O and no engine logic: the API layer builds these (see :mod:`runplane_scheduler.validation`)
and the engine acts on them, so neither imports the other for its types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from runplane_scheduler.retry import RetryPolicy

if TYPE_CHECKING:
    from runplane_scheduler.store import Tx


class TxGuard(Protocol):
    """Something a write must pass in its own transaction: ``check`` before it writes (it may
    raise a domain error), ``record`` after it succeeded."""

    async def check(self, tx: Tx) -> None: ...

    async def record(self, tx: Tx) -> None: ...


@dataclass(frozen=True)
class TaskDef:
    task_id: str
    queue: str
    queue_concurrency_limit: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_duration: int = 0
    machine: str = "small-1x"
    ttl_ms: int = 0
    queue_rate_limit: int = 0
    queue_rate_period: float = 0.0
    queue_total_limit: int = 0
    payload_schema: str = ""


@dataclass(frozen=True)
class TriggerSpec:
    """A validated trigger request. Times are ms since the epoch; durations ms."""

    task_id: str
    payload: str = "null"
    queue: str = ""
    tags: tuple[str, ...] = ()
    metadata: str = "{}"
    max_attempts: int = 0
    idempotency_key: str = ""
    idempotency_key_ttl_ms: int = 0  # 0: 30 days
    concurrency_key: str = ""
    priority: int = 0
    delay_until: int = 0  # 0: not delayed
    ttl_ms: int | None = None  # None: the task's; 0: none
    max_duration_ms: int | None = None  # None: the task's
    machine: str = ""  # '': the task's
    parent_run_id: str = ""
    replayed_from_run_id: str = ""
    debounce: Debounce | None = None
    # The worker version to lock to ('': the parent's, else the task's current one).
    version: str = ""
    # A schedule's tick ("schedule id:tick"): at most one run is ever made for it.
    schedule_tick: str = ""


@dataclass(frozen=True)
class Debounce:
    key: str
    delay_ms: int
    trailing: bool = False
    max_delay_ms: int = 0  # 0: unbounded
