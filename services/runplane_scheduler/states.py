"""The run state machine over the 13 public statuses, as pure functions."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
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


FINAL = frozenset(
    {
        Status.COMPLETED,
        Status.CANCELED,
        Status.FAILED,
        Status.CRASHED,
        Status.SYSTEM_FAILURE,
        Status.EXPIRED,
        Status.TIMED_OUT,
    }
)

# Statuses whose run holds a concurrency slot.
HOLDS_CONCURRENCY = frozenset({Status.DEQUEUED, Status.EXECUTING})

_ENDINGS_OF_AN_ATTEMPT = {
    Status.COMPLETED,
    Status.FAILED,
    Status.CRASHED,
    Status.SYSTEM_FAILURE,
    Status.TIMED_OUT,
    Status.CANCELED,
}

ALLOWED: dict[Status, frozenset[Status]] = {
    # -> WAITING: a run whose waits completed waited here for an executor of its version.
    # -> FAILED: an operator gave up on the run's version (`runplane runs migrate --fail`).
    Status.PENDING_VERSION: frozenset(
        {Status.QUEUED, Status.WAITING, Status.FAILED, Status.CANCELED, Status.EXPIRED}
    ),
    Status.DELAYED: frozenset(
        {Status.QUEUED, Status.PENDING_VERSION, Status.CANCELED, Status.EXPIRED}
    ),
    Status.QUEUED: frozenset(
        {Status.DEQUEUED, Status.PENDING_VERSION, Status.CANCELED, Status.EXPIRED}
    ),
    # Back to QUEUED when an assignment is not acknowledged or its executor is lost before start.
    Status.DEQUEUED: frozenset(
        {Status.EXECUTING, Status.QUEUED, Status.CANCELED, Status.SYSTEM_FAILURE, Status.CRASHED}
    ),
    # EXECUTING -> QUEUED is a retry (after its back-off) or a lost attempt run again.
    Status.EXECUTING: frozenset({Status.QUEUED, Status.WAITING} | _ENDINGS_OF_AN_ATTEMPT),
    # WAITING -> DEQUEUED: resumed by replay in a fresh attempt (its executor was lost).
    Status.WAITING: frozenset(
        {
            Status.QUEUED,
            Status.DEQUEUED,
            Status.EXECUTING,
            Status.PENDING_VERSION,
            Status.CANCELED,
            Status.SYSTEM_FAILURE,
            Status.CRASHED,
        }
    ),
    **{final: frozenset() for final in FINAL},
}


class TransitionError(Exception):
    """A status change the state machine does not allow."""

    def __init__(self, current: Status, target: Status) -> None:
        super().__init__(f"a run cannot go from {current} to {target}")
        self.current = current
        self.target = target


def can_transition(current: Status, target: Status) -> bool:
    return target in ALLOWED[current]


def transition(current: Status, target: Status) -> Status:
    """``target`` if the state machine allows ``current -> target``, else TransitionError."""
    if not can_transition(current, target):
        raise TransitionError(current, target)
    return target


def is_final(status: Status) -> bool:
    return status in FINAL
