"""What the executor and a task process send each other over their pipe: one NamedTuple per
message, its :class:`Kind` first, and the attempts and results they carry as TypedDicts (plain
dicts on the wire, so they pickle cheaply and compare equal to dicts).

executor -> process: Run | CancelHooks | Cancel | Timeout | Resume | Evict | Stop
process -> executor: Ready | Failed | Started | Metadata | Logs | Wait | Result
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal, NamedTuple, NotRequired, TypedDict


class Kind(StrEnum):
    # executor -> process
    RUN = "run"
    CANCEL_HOOKS = "cancel_hooks"
    CANCEL = "cancel"
    TIMEOUT = "timeout"
    RESUME = "resume"
    EVICT = "evict"
    STOP = "stop"
    # process -> executor
    READY = "ready"
    FAILED = "failed"
    STARTED = "started"
    METADATA = "metadata"
    LOGS = "logs"
    WAIT = "wait"
    RESULT = "result"


class AttemptRun(TypedDict):
    """The run of an attempt (times in epoch milliseconds, 0: unset)."""

    id: str
    task_id: str
    payload: str
    metadata: str
    tags: list[str]
    is_test: bool
    created_at: int
    started_at: int
    idempotency_key: str
    max_attempts: int
    priority: int
    parent_run_id: str
    root_run_id: str
    batch_id: str
    queue: str
    replayed_from_run_id: str


class Attempt(TypedDict):
    """An attempt as a task process runs it. ``attempt_id`` is '' and ``number`` 0 for the
    on_cancel hooks of a run cancelled without a running attempt."""

    attempt_id: str
    number: int
    run: AttemptRun
    traceparent: NotRequired[str]
    environment_slug: NotRequired[str]
    environment_id: NotRequired[str]
    machine: NotRequired[str]
    memory_limit: NotRequired[int]  # bytes; 0: runs in the warm pool
    max_duration: NotRequired[float]  # seconds; 0: none
    oom_retry_machine: NotRequired[str]  # retry an out-of-memory attempt on this machine
    version: NotRequired[str]  # the worker version of the code that runs it


class ErrorInfo(TypedDict):
    type: str
    message: str
    stack_trace: str


class AttemptResult(TypedDict, total=False):
    """How an attempt ended: ``output`` (JSON text), or ``error``; or canceled, lost (run it
    again without counting a retry; ``evicted`` when the executor dropped it at a wait) or
    timed out. ``retry_*`` carry a catch_error hook's decision."""

    output: str
    error: ErrorInfo
    skip_retrying: bool
    canceled: bool
    lost: bool
    evicted: bool
    timed_out: bool
    out_of_memory: bool
    retry_machine: str
    retry_delay_ms: int
    retry_at_ms: int


class MetadataUpdate(TypedDict):
    """One run's metadata operations, as (type, key, value as JSON text) in call order."""

    run_id: str
    operations: list[tuple[str, str, str]]


# A wait as the SDK asks for it: one of duration_ms, until_ms, token_id or children (serialized
# BatchTriggerItems), with an optional idempotency_key and idempotency_key_ttl_ms.
WaitRequest = dict[str, Any]


class WaitOutcome(NamedTuple):
    """How a wait ended: ``ok`` with ``output`` (JSON text), or an ``error`` dict."""

    ok: bool
    output: str
    error: dict[str, str] | None


class WaitResult(NamedTuple):
    """The outcome of wait ``seq`` of an attempt."""

    seq: int
    ok: bool
    output: str
    error: dict[str, str] | None


# -- executor -> process ------------------------------------------------------------------------


class Run(NamedTuple):
    kind: Literal[Kind.RUN]
    attempt: Attempt


class CancelHooks(NamedTuple):
    """Run the on_cancel hooks of a run cancelled with no attempt running."""

    kind: Literal[Kind.CANCEL_HOOKS]
    attempt: Attempt


class Cancel(NamedTuple):
    kind: Literal[Kind.CANCEL]
    attempt_id: str


class Timeout(NamedTuple):
    """The attempt ran past its max_duration."""

    kind: Literal[Kind.TIMEOUT]
    attempt_id: str


class Resume(NamedTuple):
    """Results of the attempt's completed waits (all of them, earlier ones too)."""

    kind: Literal[Kind.RESUME]
    attempt_id: str
    results: list[WaitResult]


class Evict(NamedTuple):
    """Drop the waiting attempt from memory: it is reported lost and replayed later."""

    kind: Literal[Kind.EVICT]
    attempt_id: str


class Stop(NamedTuple):
    kind: Literal[Kind.STOP]


# -- process -> executor ------------------------------------------------------------------------


class Ready(NamedTuple):
    """The task modules are imported; these tasks are defined."""

    kind: Literal[Kind.READY]
    task_ids: list[str]


class Failed(NamedTuple):
    """The task modules failed to import."""

    kind: Literal[Kind.FAILED]
    traceback: str


class Started(NamedTuple):
    kind: Literal[Kind.STARTED]
    attempt_id: str


class Metadata(NamedTuple):
    kind: Literal[Kind.METADATA]
    attempt_id: str
    update: MetadataUpdate


class Logs(NamedTuple):
    """Log entries of any attempts of the process (see ``runplane._logger``)."""

    kind: Literal[Kind.LOGS]
    entries: list[dict[str, Any]]


class Wait(NamedTuple):
    kind: Literal[Kind.WAIT]
    attempt_id: str
    seq: int
    request: WaitRequest


class Result(NamedTuple):
    kind: Literal[Kind.RESULT]
    attempt_id: str
    result: AttemptResult


ToProcess = Run | CancelHooks | Cancel | Timeout | Resume | Evict | Stop
FromProcess = Ready | Failed | Started | Metadata | Logs | Wait | Result
# What the executor hears about an attempt (the pool reports lost and killed attempts too).
Report = Started | Metadata | Logs | Wait | Result
