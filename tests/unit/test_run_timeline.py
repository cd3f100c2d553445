"""The queue intervals of a run's timeline, from its row and its attempts' rows."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from runplane_scheduler.api.runs import queue_intervals


def _run(**values: Any) -> Any:
    row = {"created_at": 1_000, "queued_at": 1_000, "delay_until": None, "status": "COMPLETED"}
    return SimpleNamespace(**(row | values))


def _attempt(created: int, finished: int | None) -> Any:
    return SimpleNamespace(created_at=created, finished_at=finished)


def _spans(run: Any, attempts: list[Any]) -> list[tuple[str, int, int | None]]:
    return [
        (
            i.kind,
            i.started_at.ToMilliseconds(),
            i.finished_at.ToMilliseconds() if i.HasField("finished_at") else None,
        )
        for i in queue_intervals(run, attempts)
    ]


def test_queued_until_the_first_attempt_then_between_retries() -> None:
    attempts = [_attempt(1_200, 1_500), _attempt(2_500, 2_900)]
    assert _spans(_run(), attempts) == [("QUEUED", 1_000, 1_200), ("QUEUED", 1_500, 2_500)]


def test_a_delayed_run_is_delayed_then_queued() -> None:
    run = _run(delay_until=5_000, queued_at=5_000)
    assert _spans(run, [_attempt(5_050, 5_300)]) == [
        ("DELAYED", 1_000, 5_000),
        ("QUEUED", 5_000, 5_050),
    ]


def test_a_run_still_queued_has_an_open_interval() -> None:
    assert _spans(_run(status="QUEUED"), []) == [("QUEUED", 1_000, None)]
    retrying = _run(status="QUEUED")
    assert _spans(retrying, [_attempt(1_100, 1_400)]) == [
        ("QUEUED", 1_000, 1_100),
        ("QUEUED", 1_400, None),
    ]


def test_a_run_still_delayed_has_an_open_delayed_interval() -> None:
    delayed = _run(status="DELAYED", queued_at=None, delay_until=9_000)
    assert _spans(delayed, []) == [("DELAYED", 1_000, None)]
