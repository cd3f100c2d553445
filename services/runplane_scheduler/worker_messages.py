"""The worker plane in the engine's terms: what an executor reports on its stream and what the
engine sends it back, as plain frozen dataclasses.

No protobuf and no I/O: the WorkerService servicer (:mod:`runplane_scheduler.api.worker`)
converts each ``ConnectRequest`` into one of these (checking it on the way) and each of these
the engine puts on an executor's outbox into a ``ConnectResponse``, so the engine never sees a
generated message. Times are ms since the epoch, 0 when unset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import orjson

from runplane_common.errors import ServiceError
from runplane_scheduler.retry import RetryPolicy
from runplane_scheduler.specs import TaskDef, TriggerSpec


@dataclass(frozen=True)
class RunError:
    """An error as a run or a wait reports it (an exception's type, message and stack)."""

    type: str = ""
    message: str = ""
    stack_trace: str = ""


# -- from the executor -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestTask:
    """A task of a registering executor's manifest: its definition and its declarative
    schedule (``cron`` empty: none)."""

    definition: TaskDef
    cron: str = ""
    timezone: str = ""


def manifest_to_json(tasks: Sequence[ManifestTask]) -> str:
    """A version's manifest as stored: its tasks by id, in id order."""
    return orjson.dumps(
        {t.definition.task_id: asdict(t) for t in sorted(tasks, key=lambda t: t.definition.task_id)}
    ).decode()


def definitions_version(tasks: Sequence[ManifestTask]) -> str:
    """The version of a manifest registered without one: a hash of its definitions."""
    return "defs-" + hashlib.sha256(manifest_to_json(tasks).encode()).hexdigest()[:16]


def manifest_from_json(text: str) -> tuple[ManifestTask, ...]:
    out = []
    for item in orjson.loads(text).values():
        d = dict(item["definition"])
        d["retry"] = RetryPolicy.from_dict(d["retry"])
        known = {k: v for k, v in d.items() if k in TaskDef.__dataclass_fields__}
        out.append(ManifestTask(TaskDef(**known), item["cron"], item["timezone"]))
    return tuple(out)


@dataclass(frozen=True)
class Registration:
    """An executor's registration, checked. ``executor_id`` empty: a new executor.
    ``version``: the worker version its manifest is (the executor's ``--version``, else a hash
    of its definitions and code)."""

    executor_id: str
    capacity: int
    manifest: tuple[ManifestTask, ...] = ()
    running_attempt_ids: tuple[str, ...] = ()
    session_token: str = ""
    version: str = ""


@dataclass(frozen=True)
class Heartbeat:
    draining: bool = False


@dataclass(frozen=True)
class Ack:
    """The executor has the assignment of the attempt."""

    kind: ClassVar[str] = "ack"
    attempt_id: str


@dataclass(frozen=True)
class Started:
    """The attempt began, at ``started_at`` by the executor's clock (0: when received)."""

    kind: ClassVar[str] = "started"
    attempt_id: str
    started_at: int = 0


@dataclass(frozen=True)
class AttemptResult:
    """The attempt's end. ``output`` (JSON text) is None unless it returned; ``error`` is what
    it raised (empty when it reported neither). ``retry_delay_ms`` and ``retry_at`` are None
    unless its catch_error asked for them."""

    kind: ClassVar[str] = "result"
    attempt_id: str
    output: str | None = None
    error: RunError = RunError()
    skip_retrying: bool = False
    canceled: bool = False
    lost: bool = False
    retry_delay_ms: int | None = None
    retry_at: int | None = None
    timed_out: bool = False
    out_of_memory: bool = False
    retry_machine: str = ""
    started_at: int = 0


@dataclass(frozen=True)
class MetadataOperation:
    """One change of a run's metadata; ``value`` is JSON text ("" for none)."""

    type: str
    key: str
    value: str = ""


@dataclass(frozen=True)
class MetadataUpdate:
    """One flush of an attempt's metadata operations on ``run_id`` (its run, parent or root)."""

    kind: ClassVar[str] = "metadata"
    run_id: str
    attempt_id: str
    operations: tuple[MetadataOperation, ...] = ()


@dataclass(frozen=True)
class LogEntry:
    run_id: str
    attempt_id: str
    attempt_number: int
    level: str
    message: str
    attributes: str
    time: int
    trace_id: str
    span_id: str


@dataclass(frozen=True)
class LogBatch:
    entries: tuple[LogEntry, ...] = ()


@dataclass(frozen=True)
class ChildRuns:
    """A wait's child runs to trigger, checked: their specs in item order, or the error the
    first bad item was refused with (the wait then completes with that error)."""

    specs: tuple[TriggerSpec, ...] = ()
    invalid: ServiceError | None = None


@dataclass(frozen=True)
class WaitRequest:
    """Block the attempt's run on a duration, a date, a token or child runs (at most one of
    the four is set; a request with none is refused)."""

    kind: ClassVar[str] = "wait"
    attempt_id: str
    seq: int
    duration_ms: int | None = None
    until_ms: int | None = None
    token_id: str | None = None
    children: ChildRuns | None = None
    idempotency_key: str = ""
    idempotency_key_ttl_ms: int = 0
    # The wait span's W3C trace context: child runs start under it ('' : the caller's context).
    traceparent: str = ""


# Reports about one attempt: accepted only from the connection holding the attempt.
AttemptReport = Ack | Started | AttemptResult | MetadataUpdate | WaitRequest
# What the engine acts on from an executor's stream (after its registration).
WorkerReport = Heartbeat | LogBatch | AttemptReport


# -- to the executor -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """Run the attempt of ``run`` (the run's row as it was dequeued)."""

    run: Mapping[str, Any]
    attempt_id: str
    attempt_number: int
    traceparent: str
    environment_slug: str
    environment_id: str


@dataclass(frozen=True)
class CancelAttempt:
    attempt_id: str
    run_id: str = ""


@dataclass(frozen=True)
class WaitResult:
    """A completed wait of the run: ``output`` JSON text; ``error`` None when there is none."""

    seq: int
    ok: bool
    output: str
    error: RunError | None = None


@dataclass(frozen=True)
class Resume:
    attempt_id: str
    results: tuple[WaitResult, ...] = ()


@dataclass(frozen=True)
class RunCanceled:
    """Run the on_cancel hooks of ``run`` (the run's row), cancelled without an attempt."""

    run: Mapping[str, Any]
    environment_slug: str
    environment_id: str


# What the engine puts on an executor's outbox.
ToExecutor = Assignment | CancelAttempt | Resume | RunCanceled
