"""A run's waterfall as ``runs.timeline(run_id)`` returns it: the intervals it spent queued, its
attempts, its waits, its child runs and its log lines. Protobuf stays at this edge."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from runplane._logger import LogEntry
from runplane._models import Run, RunError, _dt
from runplane.v1 import run_service_pb2 as rpb


@dataclass(frozen=True)
class TimelineInterval:
    """A stretch the run waited for an attempt: ``kind`` is ``QUEUED`` or ``DELAYED``;
    ``finished_at`` is None while it lasts."""

    kind: str
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class TimelineAttempt:
    """One attempt: created when it was dequeued, started when the task process began it."""

    id: str
    number: int
    status: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: RunError | None


@dataclass(frozen=True)
class TimelineWait:
    """A wait of the run: ``kind`` ``DURATION``, ``TOKEN`` or ``BATCH`` (child runs, listed in
    ``child_run_ids``); ``finished_at`` is None while it lasts."""

    id: str
    kind: str
    status: str
    attempt_number: int
    started_at: datetime | None
    finished_at: datetime | None
    target: str | None
    due_at: datetime | None
    child_run_ids: list[str]


@dataclass(frozen=True)
class RunTimeline:
    """A run and what its waterfall is drawn from, each list oldest first. ``logs`` holds the
    first 1,000 lines; ``logs_truncated`` says there are more (``runs.logs`` has them all)."""

    run: Run
    queue_intervals: list[TimelineInterval]
    attempts: list[TimelineAttempt]
    waits: list[TimelineWait]
    children: list[Run]
    logs: list[LogEntry]
    logs_truncated: bool

    @classmethod
    def from_pb(cls, pb: rpb.GetRunTimelineResponse) -> RunTimeline:
        return cls(
            run=Run.from_pb(pb.run),
            queue_intervals=[
                TimelineInterval(
                    kind=i.kind,
                    started_at=_dt(i.started_at, i.HasField("started_at")),
                    finished_at=_dt(i.finished_at, i.HasField("finished_at")),
                )
                for i in pb.queue_intervals
            ],
            attempts=[
                TimelineAttempt(
                    id=a.id,
                    number=a.number,
                    status=a.status,
                    created_at=_dt(a.created_at, a.HasField("created_at")),
                    started_at=_dt(a.started_at, a.HasField("started_at")),
                    finished_at=_dt(a.finished_at, a.HasField("finished_at")),
                    error=RunError(a.error.type, a.error.message, a.error.stack_trace)
                    if a.HasField("error")
                    else None,
                )
                for a in pb.attempts
            ],
            waits=[
                TimelineWait(
                    id=w.id,
                    kind=w.kind,
                    status=w.status,
                    attempt_number=w.attempt_number,
                    started_at=_dt(w.started_at, w.HasField("started_at")),
                    finished_at=_dt(w.finished_at, w.HasField("finished_at")),
                    target=w.target or None,
                    due_at=_dt(w.due_at, w.HasField("due_at")),
                    child_run_ids=list(w.child_run_ids),
                )
                for w in pb.waits
            ],
            children=[Run.from_pb(c) for c in pb.children],
            logs=[LogEntry.from_pb(e) for e in pb.logs],
            logs_truncated=pb.logs_truncated,
        )


@dataclass(frozen=True)
class RunPage:
    """One page of ``runs.page``: the runs, newest first, and the token of the next page (None
    on the last one)."""

    runs: list[Run]
    next_page_token: str | None
