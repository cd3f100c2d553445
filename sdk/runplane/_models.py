"""Public value types: run statuses, runs and their errors. Protobuf stays at this edge."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NotRequired, TypedDict

import orjson

from runplane.v1 import run_pb2


class RunStatus(StrEnum):
    PENDING_VERSION = "PENDING_VERSION"
    DELAYED = "DELAYED"
    QUEUED = "QUEUED"
    DEQUEUED = "DEQUEUED"
    EXECUTING = "EXECUTING"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"
    FAILED = "FAILED"
    CRASHED = "CRASHED"
    SYSTEM_FAILURE = "SYSTEM_FAILURE"
    EXPIRED = "EXPIRED"
    TIMED_OUT = "TIMED_OUT"

    @classmethod
    def _missing_(cls, value: object) -> RunStatus | None:
        """Any case: ``RunStatus("failed")`` is ``RunStatus.FAILED``."""
        if isinstance(value, str):
            return cls.__members__.get(value.strip().upper())
        return None

    @property
    def is_final(self) -> bool:
        return self in _FINAL

    def to_pb(self) -> int:
        return int(run_pb2.RunStatus.Value("RUN_STATUS_" + self.value))


_FINAL = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.CANCELED,
        RunStatus.FAILED,
        RunStatus.CRASHED,
        RunStatus.SYSTEM_FAILURE,
        RunStatus.EXPIRED,
        RunStatus.TIMED_OUT,
    }
)
_FAILED = frozenset(
    {
        RunStatus.FAILED,
        RunStatus.CRASHED,
        RunStatus.SYSTEM_FAILURE,
        RunStatus.EXPIRED,
        RunStatus.TIMED_OUT,
    }
)


@dataclass(frozen=True)
class RunError:
    type: str
    message: str
    stack_trace: str = ""


def _dt(ts: Any, present: bool) -> datetime | None:
    if not present:
        return None
    # ts.ToMilliseconds() / 1000, without its cost (a run has five timestamps, and a
    # subscriber decodes thousands of runs a second)
    return datetime.fromtimestamp((ts.seconds * 1000 + ts.nanos // 1_000_000) / 1000, tz=UTC)


@dataclass(frozen=True)
class Run:
    """A run as the API shows it (reference RunShape, snake_case)."""

    id: str
    task_id: str
    status: RunStatus
    payload: Any
    output: Any
    error: RunError | None
    tags: list[str]
    metadata: dict[str, Any]
    queue: str
    idempotency_key: str | None
    concurrency_key: str | None
    priority: int
    attempt_count: int
    max_attempts: int
    version: int
    is_test: bool
    parent_run_id: str | None
    root_run_id: str | None
    batch_id: str | None
    created_at: datetime | None
    updated_at: datetime | None
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int
    raw: run_pb2.Run = field(repr=False, compare=False)
    delay_until: datetime | None = None
    ttl: float | None = None  # seconds
    max_duration: float | None = None  # seconds; None: the task's
    machine: str | None = None  # None: the task's
    replayed_from_run_id: str | None = None
    idempotency_key_expires_at: datetime | None = None
    depth: int = 0
    # The worker version the run is locked to (None: not locked yet).
    worker_version: str | None = None

    @property
    def is_replay(self) -> bool:
        return self.replayed_from_run_id is not None

    @property
    def is_queued(self) -> bool:
        return self.status in (RunStatus.QUEUED, RunStatus.PENDING_VERSION, RunStatus.DELAYED)

    @property
    def is_executing(self) -> bool:
        return self.status in (RunStatus.EXECUTING, RunStatus.DEQUEUED)

    @property
    def is_waiting(self) -> bool:
        return self.status is RunStatus.WAITING

    @property
    def is_completed(self) -> bool:
        return self.status.is_final

    @property
    def is_success(self) -> bool:
        return self.status is RunStatus.COMPLETED

    @property
    def is_failed(self) -> bool:
        return self.status in _FAILED

    @property
    def is_cancelled(self) -> bool:
        return self.status is RunStatus.CANCELED

    @classmethod
    def from_pb(cls, pb: run_pb2.Run) -> Run:
        error = None
        if pb.HasField("error"):
            error = RunError(pb.error.type, pb.error.message, pb.error.stack_trace)
        return cls(
            id=pb.id,
            task_id=pb.task_id,
            status=RunStatus(run_pb2.RunStatus.Name(pb.status).removeprefix("RUN_STATUS_")),
            payload=orjson.loads(pb.payload) if pb.payload else None,
            output=orjson.loads(pb.output) if pb.output else None,
            error=error,
            tags=list(pb.tags),
            metadata=orjson.loads(pb.metadata) if pb.metadata else {},
            queue=pb.queue,
            idempotency_key=pb.idempotency_key or None,
            concurrency_key=pb.concurrency_key or None,
            priority=pb.priority,
            attempt_count=pb.attempt_count,
            max_attempts=pb.max_attempts,
            version=pb.version,
            is_test=pb.is_test,
            parent_run_id=pb.parent_run_id or None,
            root_run_id=pb.root_run_id or None,
            batch_id=pb.batch_id or None,
            created_at=_dt(pb.created_at, pb.HasField("created_at")),
            updated_at=_dt(pb.updated_at, pb.HasField("updated_at")),
            queued_at=_dt(pb.queued_at, pb.HasField("queued_at")),
            started_at=_dt(pb.started_at, pb.HasField("started_at")),
            finished_at=_dt(pb.finished_at, pb.HasField("finished_at")),
            duration_ms=pb.duration_ms,
            raw=pb,
            delay_until=_dt(pb.delay_until, pb.HasField("delay_until")),
            ttl=pb.ttl.ToMilliseconds() / 1000 if pb.HasField("ttl") else None,
            max_duration=pb.max_duration.ToMilliseconds() / 1000
            if pb.HasField("max_duration")
            else None,
            machine=pb.machine or None,
            replayed_from_run_id=pb.replayed_from_run_id or None,
            idempotency_key_expires_at=_dt(
                pb.idempotency_key_expires_at, pb.HasField("idempotency_key_expires_at")
            ),
            depth=pb.depth,
            worker_version=pb.worker_version or None,
        )


@dataclass(frozen=True)
class RunHandle:
    """What a trigger returns: the new run's id (and whether an idempotency key matched)."""

    id: str
    is_cached: bool = False
    run: Run | None = field(default=None, repr=False, compare=False)
    # A token that may read this run only (read:runs:<id>) for 15 minutes: hand it to a browser.
    public_access_token: str = field(default="", repr=False, compare=False)


class BatchItem(TypedDict):
    """One item of a batch trigger: a payload and its trigger options."""

    payload: Any
    options: NotRequired[dict[str, Any]]


@dataclass(frozen=True)
class BatchHandle:
    """What a batch trigger returns: the batch id and its runs' handles in item order."""

    batch_id: str
    runs: list[RunHandle]

    @property
    def run_count(self) -> int:
        return len(self.runs)


class BatchStatus(StrEnum):
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    PARTIAL_FAILED = "PARTIAL_FAILED"


@dataclass(frozen=True)
class Batch:
    """A batch as ``batch.retrieve`` shows it."""

    id: str
    status: BatchStatus
    run_count: int
    runs: list[str]
    idempotency_key: str | None
    created_at: datetime | None


@dataclass(frozen=True)
class QueueInfo:
    """A queue as ``queues.retrieve`` shows it: its runs now and its limits."""

    id: str
    name: str
    running: int
    queued: int
    paused: bool
    concurrency_limit: int | None  # in force; None: bounded by the environment only
    base_concurrency_limit: int | None  # declared in code
    override_concurrency_limit: int | None
    overridden_at: datetime | None
