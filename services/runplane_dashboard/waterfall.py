"""A run's waterfall: its spans (queue time, attempts, waits, child runs) as bars on one time
axis, with its log lines as marks on the attempts that wrote them. Server-rendered as a table
(one row per span) so it reads without the picture."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from runplane import LogEntry, RunTimeline
from runplane_dashboard.markup import attr, duration, esc, status_badge, table


@dataclass(frozen=True)
class Span:
    kind: str  # run, queued, delayed, attempt, wait, child
    label: str
    start: datetime
    end: datetime | None  # None: still going
    status: str = ""
    href: str = ""
    logs: tuple[LogEntry, ...] = ()


def spans(timeline: RunTimeline) -> list[Span]:
    """The rows of the waterfall, in the order they began (the run itself first)."""
    run = timeline.run
    out: list[Span] = []
    for interval in timeline.queue_intervals:
        if interval.started_at is not None:
            out.append(
                Span(
                    interval.kind.lower(),
                    "Delayed" if interval.kind == "DELAYED" else "Queued",
                    interval.started_at,
                    interval.finished_at,
                )
            )
    for attempt in timeline.attempts:
        start = attempt.started_at or attempt.created_at
        if start is None:
            continue
        logs = tuple(e for e in timeline.logs if e.attempt_number == attempt.number)
        out.append(
            Span(
                "attempt",
                f"Attempt {attempt.number}",
                start,
                attempt.finished_at,
                attempt.status,
                logs=logs,
            )
        )
    for wait in timeline.waits:
        if wait.started_at is None:
            continue
        what = {"DURATION": "Wait for a duration", "TOKEN": "Wait for a token"}.get(
            wait.kind, "Wait for child runs"
        )
        out.append(Span("wait", what, wait.started_at, wait.finished_at, wait.status))
    for child in timeline.children:
        if child.created_at is None:
            continue
        out.append(
            Span(
                "child",
                f"Child run {child.task_id}",
                child.created_at,
                child.finished_at,
                str(child.status),
                href=f"/runs/{child.id}",
            )
        )
    out.sort(key=lambda s: s.start)
    if run.created_at is not None:
        out.insert(
            0, Span("run", f"Run {run.task_id}", run.created_at, run.finished_at, str(run.status))
        )
    return out


def render(timeline: RunTimeline, now: datetime | None = None) -> str:
    """The waterfall table; bars are placed in percent of the run's whole span."""
    now = now or datetime.now(UTC)
    rows = spans(timeline)
    if not rows:
        return '<p class="empty">No spans yet.</p>'
    t0 = min(s.start for s in rows)
    t1 = max(max(s.end or now for s in rows), t0)
    total = max((t1 - t0).total_seconds(), 0.001)

    def pct(t: datetime) -> float:
        return max(0.0, min(100.0, (t - t0).total_seconds() / total * 100))

    out: list[str] = []
    for span in rows:
        end = span.end or now
        left = pct(span.start)
        width = max(pct(end) - left, 0.4)
        ms = (end - span.start).total_seconds() * 1000
        label = esc(span.label)
        if span.href:
            label = f"<a href={attr(span.href)}>{label}</a>"
        status = status_badge(span.status) if span.status else ""
        running = "" if span.end else " running"
        marks = "".join(
            f'<span class="log-mark level-{esc(e.level.lower())}" '
            f'style="left:{pct(e.time):.3f}%" title={attr(f"{e.level}: {e.message}")} '
            f'role="img" aria-label={attr(f"log {e.level}: {e.message}")}></span>'
            for e in span.logs
        )
        bar = (
            f'<div class="track"><div class="bar {esc(span.kind)}{running}" '
            f'data-kind="{esc(span.kind)}" style="left:{left:.3f}%;width:{width:.3f}%" '
            f"title={attr(f'{span.label}: {duration(ms)}')}></div>{marks}</div>"
        )
        offset = (span.start - t0).total_seconds() * 1000
        out.append(
            f'<tr class="span span-{esc(span.kind)}"><th scope="row">{label} {status}</th>'
            f"<td>+{esc(duration(offset))}</td>"
            f"<td>{esc(duration(ms))}{' (so far)' if not span.end else ''}</td>"
            f'<td class="bar-cell">{bar}</td></tr>'
        )
    return table(
        "Waterfall: queue time, attempts, waits and child runs; marks are log lines",
        ["Span", "Start", "Duration", "Timeline"],
        out,
        table_id="waterfall",
    )
