"""The dashboard's pages as HTML: the login form, runs, a run (with its waterfall), batches,
queues, schedules, wait tokens and worker versions. Pure functions of SDK values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Protocol

from runplane import (
    Batch,
    LogEntry,
    QueueInfo,
    Run,
    RunStatus,
    RunTimeline,
    Schedule,
    WaitToken,
)
from runplane_dashboard import waterfall
from runplane_dashboard.markup import (
    attr,
    button_form,
    cells,
    csrf_field,
    duration,
    esc,
    json_block,
    link,
    notice,
    query,
    status_badge,
    table,
    when,
)

RUN_FILTERS = ("status", "task", "tag", "batch", "version", "created_after", "created_before")


def login(message: str = "", next_path: str = "/runs", csrf: str = "") -> str:
    error = notice(message) if message else ""
    return (
        '<section class="login"><h1>Log in to runplane</h1>'
        "<p>Use a secret key of the environment to open (<code>RUNPLANE_SECRET_KEY</code> in "
        "<code>.runplane/dev.env</code> for <code>runplane dev</code>).</p>"
        f'{error}<form method="post" action="/login">{csrf_field(csrf)}'
        f'<input type="hidden" name="next" value={attr(next_path)}>'
        '<label for="key">Secret key</label>'
        '<input id="key" name="key" type="password" autocomplete="off" required '
        'spellcheck="false">'
        '<button type="submit">Log in</button></form></section>'
    )


def _run_row(run: Run) -> str:
    final = "true" if run.is_completed else "false"
    tags = " ".join(f'<span class="tag">{esc(t)}</span>' for t in run.tags)
    return (
        f"<tr data-run-id={attr(run.id)} data-final={attr(final)}>"
        + cells(
            link(f"/runs/{run.id}", run.id),
            esc(run.task_id),
            f'<span class="status" data-status={attr(run.status)}>'
            f"{status_badge(str(run.status))}</span>",
            when(run.created_at),
            f'<span class="duration">{esc(duration(run.duration_ms) if run.duration_ms else "-")}'
            "</span>",
            f'<span class="attempts">{run.attempt_count}</span>',
            esc(run.worker_version or "-"),
            tags,
        )
        + "</tr>"
    )


def runs_table(runs: Sequence[Run], caption: str = "Runs", live_url: str = "") -> str:
    data = {"live": live_url} if live_url else None
    return table(
        caption,
        ["Run", "Task", "Status", "Created", "Duration", "Attempts", "Version", "Tags"],
        (_run_row(r) for r in runs),
        table_id="runs",
        data=data,
        empty="No runs match.",
    )


def live_runs_url(
    runs: Sequence[Run], filters: Mapping[str, str] | None = None, first_page: bool = False
) -> str:
    """The feed of the runs on a page that may still change, and on a first page (with its
    ``filters``) of the runs that appear; empty when nothing can change."""
    ids = [r.id for r in runs if not r.is_completed]
    if first_page:
        params = {k: (filters or {}).get(k) for k in RUN_FILTERS}
        newest = runs[0].id if runs else "none"
        return query("/runs/events", {"ids": ",".join(ids), "newest": newest, **params})
    return query("/runs/events", {"ids": ",".join(ids)}) if ids else ""


def runs_page(
    runs: Sequence[Run],
    filters: Mapping[str, str],
    next_token: str | None,
    page_token: str,
    error: str = "",
) -> str:
    options = "".join(
        f"<option value={attr(s.value)}"
        f"{' selected' if filters.get('status') == s.value else ''}>{esc(s.value)}</option>"
        for s in RunStatus
    )

    def text(name: str, label: str, kind: str = "text") -> str:
        return (
            f'<div class="field"><label for="f-{name}">{esc(label)}</label>'
            f'<input id="f-{name}" name="{name}" type="{kind}" '
            f"value={attr(filters.get(name, ''))}></div>"
        )

    form = (
        '<form method="get" action="/runs" class="filters" aria-label="Filter runs">'
        '<div class="field"><label for="f-status">Status</label>'
        f'<select id="f-status" name="status"><option value="">any</option>{options}</select>'
        "</div>"
        + text("task", "Task")
        + text("tag", "Tag")
        + text("batch", "Batch")
        + text("version", "Version")
        + text("created_after", "Created after (UTC)", "datetime-local")
        + text("created_before", "Created before (UTC)", "datetime-local")
        + '<button type="submit">Filter</button> <a href="/runs">Clear</a></form>'
    )
    base = {k: filters.get(k) for k in RUN_FILTERS}
    pager = []
    if page_token:
        pager.append(link(query("/runs", base), "First page"))
    if next_token:
        pager.append(link(query("/runs", {**base, "page_token": next_token}), "Next page"))
    nav = f'<nav aria-label="Pagination" class="pager">{" ".join(pager)}</nav>' if pager else ""
    return (
        "<h1>Runs</h1>"
        + form
        + (notice(error) if error else "")
        + runs_table(runs, live_url=live_runs_url(runs, filters, not page_token and not error))
        + nav
    )


def _detail(rows: Sequence[tuple[str, str]]) -> str:
    return (
        '<dl class="details">'
        + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in rows)
        + "</dl>"
    )


def _logs(logs: Sequence[LogEntry], start: datetime | None, truncated: bool) -> str:
    rows = []
    for e in logs:
        offset = (e.time - start).total_seconds() * 1000 if start else None
        attributes = json_block(e.attributes, "attributes") if e.attributes else ""
        rows.append(
            f'<tr class="log level-{esc(e.level.lower())}">'
            + cells(
                f"{when(e.time)} <small>+{esc(duration(offset))}</small>",
                str(e.attempt_number),
                esc(e.level.upper()),
                esc(e.message),
                attributes,
            )
            + "</tr>"
        )
    more = (
        notice(
            "Only the first 1,000 log lines are shown (runplane runs logs RUN_ID has all).", "info"
        )
        if truncated
        else ""
    )
    return (
        table(
            "Log lines",
            ["Time", "Attempt", "Level", "Message", "Attributes"],
            rows,
            table_id="logs",
            empty="No log lines.",
        )
        + more
    )


def run_live(timeline: RunTimeline, csrf: str) -> str:
    """Everything on a run's page that changes while it runs (reloaded by the page script)."""
    run = timeline.run
    actions = []
    if not run.is_completed:
        actions.append(button_form(f"/runs/{run.id}/cancel", "Cancel run", csrf, danger=True))
    actions.append(button_form(f"/runs/{run.id}/replay", "Replay run", csrf))
    if run.status is RunStatus.DELAYED:
        actions.append(
            f'<form method="post" action="/runs/{esc(run.id)}/reschedule" class="inline">'
            f'{csrf_field(csrf)}<label for="delay">Start in (seconds)</label>'
            '<input id="delay" name="delay" type="number" min="1" step="1" value="60" required>'
            '<button type="submit">Reschedule</button></form>'
        )

    def run_link(run_id: str | None) -> str:
        return link(f"/runs/{run_id}", run_id) if run_id else "-"

    details = _detail(
        [
            ("Status", f'<span id="run-status">{status_badge(str(run.status))}</span>'),
            ("Task", esc(run.task_id)),
            ("Version", esc(run.worker_version or "-")),
            ("Queue", link(query("/queues", {}), run.queue)),
            ("Attempts", f"{run.attempt_count} of {run.max_attempts}"),
            ("Created", when(run.created_at)),
            ("Started", when(run.started_at)),
            ("Finished", when(run.finished_at)),
            ("Duration", esc(duration(run.duration_ms) if run.duration_ms else "-")),
            ("Delayed until", when(run.delay_until)),
            ("Tags", " ".join(f'<span class="tag">{esc(t)}</span>' for t in run.tags) or "-"),
            ("Parent run", run_link(run.parent_run_id)),
            ("Root run", run_link(run.root_run_id)),
            ("Batch", link(f"/batches/{run.batch_id}", run.batch_id) if run.batch_id else "-"),
            ("Replay of", run_link(run.replayed_from_run_id)),
            ("Idempotency key", esc(run.idempotency_key or "-")),
        ]
    )
    error = ""
    if run.error is not None:
        error = (
            '<section aria-labelledby="h-error"><h2 id="h-error">Error</h2>'
            f'<p class="error-line"><strong>{esc(run.error.type)}</strong>: '
            f"{esc(run.error.message)}</p>"
            f'<pre class="stack" aria-label="stack trace"><code>{esc(run.error.stack_trace)}'
            "</code></pre></section>"
        )
    children = table(
        "Child runs",
        ["Run", "Task", "Status", "Created", "Duration"],
        (
            f"<tr data-run-id={attr(c.id)}>"
            + cells(
                link(f"/runs/{c.id}", c.id),
                esc(c.task_id),
                status_badge(str(c.status)),
                when(c.created_at),
                esc(duration(c.duration_ms) if c.duration_ms else "-"),
            )
            + "</tr>"
            for c in timeline.children
        ),
        table_id="children",
        empty="No child runs.",
    )
    return (
        f'<div class="actions" role="group" aria-label="Run actions">{"".join(actions)}</div>'
        + '<section aria-labelledby="h-waterfall"><h2 id="h-waterfall">Waterfall</h2>'
        + waterfall.render(timeline)
        + "</section>"
        + '<section aria-labelledby="h-details"><h2 id="h-details">Details</h2>'
        + details
        + "</section>"
        + error
        + '<section aria-labelledby="h-io"><h2 id="h-io">Payload, output and metadata</h2>'
        + '<div class="io"><div><h3>Payload</h3>'
        + json_block(run.payload, "payload")
        + "</div><div><h3>Output</h3>"
        + json_block(run.output, "output")
        + "</div><div><h3>Metadata</h3>"
        + json_block(run.metadata, "metadata")
        + "</div></div></section>"
        + '<section aria-labelledby="h-children"><h2 id="h-children">Child runs</h2>'
        + children
        + "</section>"
        + '<section aria-labelledby="h-logs"><h2 id="h-logs">Logs</h2>'
        + _logs(timeline.logs, run.created_at, timeline.logs_truncated)
        + "</section>"
    )


def run_page(timeline: RunTimeline, csrf: str, message: str = "") -> str:
    run = timeline.run
    live = ""
    if not run.is_completed:
        live = f" data-live={attr(f'/runs/{run.id}/events')}"
    return (
        f"<h1>Run <code>{esc(run.id)}</code></h1>"
        # The action's message stays outside the live part: a live reload must not erase it.
        + (notice(message, "info") if message else "")
        + f'<div id="run-live" data-fragment={attr(f"/runs/{run.id}/live")}{live} '
        f'aria-live="polite">{run_live(timeline, csrf)}</div>'
    )


def batches_page(batch: Batch | None, runs: Sequence[Run], batch_id: str, error: str) -> str:
    form = (
        '<form method="get" action="/batches" class="filters" aria-label="Open a batch">'
        '<div class="field"><label for="f-batch">Batch id</label>'
        f'<input id="f-batch" name="id" value={attr(batch_id)} required></div>'
        '<button type="submit">Open</button></form>'
    )
    body = "<h1>Batches</h1>" + form + (notice(error) if error else "")
    if batch is not None:
        live = f"/batches/{batch.id}/events" if str(batch.status) == "PROCESSING" else ""
        body += (
            f"<h2>Batch <code>{esc(batch.id)}</code></h2>"
            + _detail(
                [
                    ("Status", status_badge(str(batch.status))),
                    ("Runs", str(batch.run_count)),
                    ("Created", when(batch.created_at)),
                    ("Idempotency key", esc(batch.idempotency_key or "-")),
                ]
            )
            + runs_table(runs, f"Runs of batch {batch.id}", live)
        )
    return body


def queues_page(queues: Sequence[QueueInfo], csrf: str, message: str = "", error: str = "") -> str:
    rows = []
    for q in queues:
        toggle = (
            button_form(f"/queues/{q.id}/resume", "Resume", csrf)
            if q.paused
            else button_form(f"/queues/{q.id}/pause", "Pause", csrf)
        )
        field = f"limit-{q.id}"
        override = (
            f'<form method="post" action={attr(f"/queues/{q.id}/limit")} class="inline">'
            f"{csrf_field(csrf)}<label for={attr(field)}>Limit for {esc(q.name)}</label>"
            f'<input id={attr(field)} name="limit" type="number" min="0" step="1" required '
            f'value="{q.concurrency_limit or ""}"><button type="submit">Override</button></form>'
        )
        reset = (
            button_form(f"/queues/{q.id}/reset-limit", "Reset limit", csrf)
            if q.override_concurrency_limit is not None
            else ""
        )
        rows.append(
            f"<tr data-queue={attr(q.name)}>"
            + cells(
                esc(q.name),
                f'<span class="running">{q.running}</span>',
                f'<span class="queued">{q.queued}</span>',
                esc(q.concurrency_limit if q.concurrency_limit is not None else "none"),
                esc(q.base_concurrency_limit if q.base_concurrency_limit is not None else "none"),
                esc(
                    q.override_concurrency_limit
                    if q.override_concurrency_limit is not None
                    else "-"
                ),
                f'<span class="paused">{"paused" if q.paused else "running"}</span>',
                toggle + override + reset,
            )
            + "</tr>"
        )
    return (
        "<h1>Queues</h1>"
        + (notice(message, "info") if message else "")
        + (notice(error) if error else "")
        + table(
            "Queues",
            [
                "Queue",
                "Running",
                "Queued",
                "Limit",
                "Declared limit",
                "Override",
                "State",
                "Actions",
            ],
            rows,
            table_id="queues",
            empty="No queues yet: queues appear when an executor registers its tasks.",
        )
    )


def schedules_page(
    schedules: Sequence[Schedule], csrf: str, message: str = "", error: str = ""
) -> str:
    rows = []
    for s in schedules:
        action = (
            button_form(f"/schedules/{s.id}/deactivate", "Deactivate", csrf)
            if s.active
            else button_form(f"/schedules/{s.id}/activate", "Activate", csrf)
        )
        rows.append(
            f"<tr data-schedule={attr(s.id)}>"
            + cells(
                f"<code>{esc(s.id)}</code>",
                esc(s.task_id),
                f"<code>{esc(s.cron)}</code> {esc(s.timezone)}",
                esc(s.type.lower()),
                "active" if s.active else "inactive",
                when(s.next_run) if s.active else "-",
                when(s.last_run),
                esc(s.external_id or "-"),
                action,
            )
            + "</tr>"
        )
    return (
        "<h1>Schedules</h1>"
        + (notice(message, "info") if message else "")
        + (notice(error) if error else "")
        + table(
            "Schedules",
            [
                "Schedule",
                "Task",
                "Cron",
                "Type",
                "State",
                "Next tick",
                "Last tick",
                "External id",
                "Actions",
            ],
            rows,
            table_id="schedules",
            empty="No schedules.",
        )
    )


def waitpoints_page(
    tokens: Sequence[WaitToken], status: str, csrf: str, message: str = "", error: str = ""
) -> str:
    options = "".join(
        f"<option value={attr(s)}{' selected' if s == status else ''}>{esc(s)}</option>"
        for s in ("WAITING", "COMPLETED", "TIMED_OUT")
    )
    form = (
        '<form method="get" action="/waitpoints" class="filters" aria-label="Filter tokens">'
        '<div class="field"><label for="f-status">Status</label>'
        f'<select id="f-status" name="status"><option value="">any</option>{options}</select>'
        '</div><button type="submit">Filter</button></form>'
    )
    rows = []
    for t in tokens:
        complete = ""
        if t.status == "WAITING":
            field = f"data-{t.id}"
            complete = (
                f'<form method="post" action={attr(f"/waitpoints/{t.id}/complete")} '
                f'class="complete">{csrf_field(csrf)}'
                f"<label for={attr(field)}>JSON data for {esc(t.id)}</label>"
                f'<textarea id={attr(field)} name="data" rows="2">null</textarea>'
                '<button type="submit">Complete</button></form>'
            )
        rows.append(
            f"<tr data-token={attr(t.id)}>"
            + cells(
                f"<code>{esc(t.id)}</code>",
                status_badge(t.status),
                " ".join(f'<span class="tag">{esc(tag)}</span>' for tag in t.tags) or "-",
                when(t.created_at),
                when(t.timeout_at),
                when(t.completed_at),
                json_block(t.output, "output") if t.status == "COMPLETED" else "-",
                complete,
            )
            + "</tr>"
        )
    return (
        "<h1>Wait tokens</h1>"
        + form
        + (notice(message, "info") if message else "")
        + (notice(error) if error else "")
        + table(
            "Wait tokens, newest first",
            [
                "Token",
                "Status",
                "Tags",
                "Created",
                "Times out",
                "Completed",
                "Output",
                "Complete by hand",
            ],
            rows,
            table_id="tokens",
            empty="No wait tokens.",
        )
    )


class WorkerVersionView(Protocol):
    """What the versions page shows of a worker version (``client.versions.list()``)."""

    @property
    def version(self) -> str: ...
    @property
    def task_ids(self) -> list[str]: ...
    @property
    def current_for(self) -> list[str]: ...
    @property
    def promoted_at(self) -> datetime | None: ...
    @property
    def rolled_back(self) -> bool: ...
    @property
    def executors(self) -> int: ...
    @property
    def active_runs(self) -> int: ...


def versions_page(
    versions: Sequence[WorkerVersionView], csrf: str, message: str = "", error: str = ""
) -> str:
    rows = []
    for v in versions:
        promote = (
            button_form(f"/versions/{v.version}/promote", "Promote", csrf)
            if len(v.current_for) < len(v.task_ids)
            else ""
        )
        state = "current" if v.current_for else ("rolled back" if v.rolled_back else "-")
        rows.append(
            f"<tr data-version={attr(v.version)}>"
            + cells(
                f"<code>{esc(v.version)}</code>",
                esc(state),
                esc(", ".join(v.current_for) or "-"),
                esc(", ".join(v.task_ids)),
                str(v.executors),
                link(query("/runs", {"version": v.version}), f"{v.active_runs} runs held"),
                when(v.promoted_at),
                promote,
            )
            + "</tr>"
        )
    rollback = button_form("/versions/rollback", "Roll back the latest promotion", csrf)
    return (
        "<h1>Worker versions</h1>"
        + (notice(message, "info") if message else "")
        + (notice(error) if error else "")
        + table(
            "Worker versions, newest first",
            [
                "Version",
                "State",
                "Current for",
                "Tasks",
                "Executors",
                "Unfinished runs",
                "Promoted",
                "Actions",
            ],
            rows,
            table_id="versions",
            empty="No worker versions registered.",
        )
        + f'<div class="actions">{rollback}</div>'
    )


def not_found(what: str) -> str:
    return f"<h1>Not found</h1>{notice(what)}<p>{link('/runs', 'Back to runs')}</p>"


def now() -> datetime:
    return datetime.now(UTC)
