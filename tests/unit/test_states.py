"""Every allowed and every forbidden status transition."""

from __future__ import annotations

import itertools

import pytest

from runplane_scheduler.states import (
    ALLOWED,
    FINAL,
    HOLDS_CONCURRENCY,
    Status,
    TransitionError,
    can_transition,
    is_final,
    transition,
)

EXPECTED_ALLOWED = {
    ("PENDING_VERSION", "QUEUED"),
    ("PENDING_VERSION", "CANCELED"),
    ("PENDING_VERSION", "EXPIRED"),
    # A run whose waits completed waited for an executor of its version, and resumes.
    ("PENDING_VERSION", "WAITING"),
    ("PENDING_VERSION", "FAILED"),  # an operator failed it: `runplane runs migrate --fail`
    ("DELAYED", "QUEUED"),
    ("DELAYED", "PENDING_VERSION"),  # its delay passed while no executor provides the task
    ("DELAYED", "CANCELED"),
    ("DELAYED", "EXPIRED"),
    ("QUEUED", "DEQUEUED"),
    ("QUEUED", "PENDING_VERSION"),
    ("QUEUED", "CANCELED"),
    ("QUEUED", "EXPIRED"),
    ("DEQUEUED", "EXECUTING"),
    ("DEQUEUED", "QUEUED"),
    ("DEQUEUED", "CANCELED"),
    ("DEQUEUED", "SYSTEM_FAILURE"),
    ("DEQUEUED", "CRASHED"),
    ("EXECUTING", "QUEUED"),
    ("EXECUTING", "WAITING"),
    ("EXECUTING", "COMPLETED"),
    ("EXECUTING", "FAILED"),
    ("EXECUTING", "CRASHED"),
    ("EXECUTING", "SYSTEM_FAILURE"),
    ("EXECUTING", "TIMED_OUT"),
    ("EXECUTING", "CANCELED"),
    ("WAITING", "QUEUED"),
    ("WAITING", "EXECUTING"),
    ("WAITING", "DEQUEUED"),  # resumed by replay in a fresh attempt
    ("WAITING", "PENDING_VERSION"),  # ready to resume, and no executor of its version is up
    ("WAITING", "CANCELED"),
    ("WAITING", "SYSTEM_FAILURE"),
    ("WAITING", "CRASHED"),
}

PAIRS = list(itertools.product(Status, Status))


def test_thirteen_statuses() -> None:
    assert len(Status) == 13
    assert set(ALLOWED) == set(Status)


@pytest.mark.parametrize(("current", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_transition(current: Status, target: Status) -> None:
    allowed = (current.value, target.value) in EXPECTED_ALLOWED
    assert can_transition(current, target) is allowed
    if allowed:
        assert transition(current, target) is target
    else:
        with pytest.raises(TransitionError) as raised:
            transition(current, target)
        assert current.value in str(raised.value)
        assert target.value in str(raised.value)


def test_final_statuses_are_terminal() -> None:
    assert {s.value for s in FINAL} == {
        "COMPLETED",
        "CANCELED",
        "FAILED",
        "CRASHED",
        "SYSTEM_FAILURE",
        "EXPIRED",
        "TIMED_OUT",
    }
    for status in Status:
        assert is_final(status) is (status in FINAL)
        if status in FINAL:
            assert not ALLOWED[status]


def test_only_dequeued_and_executing_hold_concurrency() -> None:
    assert {Status.DEQUEUED, Status.EXECUTING} == HOLDS_CONCURRENCY
