"""HTML building blocks: escaping, the page layout, tables, forms and value formatting. Every
value that reaches a page goes through :func:`esc` (or :func:`attr`)."""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson

NAV = (
    ("/runs", "Runs"),
    ("/batches", "Batches"),
    ("/queues", "Queues"),
    ("/schedules", "Schedules"),
    ("/waitpoints", "Wait tokens"),
    ("/versions", "Versions"),
)


_CURRENT = ' aria-current="page"'


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def attr(value: object) -> str:
    return f'"{esc(value)}"'


def when(value: datetime | None) -> str:
    """A time as a ``<time>`` element (UTC, to the second)."""
    if value is None:
        return '<span class="none">-</span>'
    iso = value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    shown = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"<time datetime={attr(iso)}>{esc(shown)}</time>"


def duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.2f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 120:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def json_block(value: Any, label: str) -> str:
    """A JSON value, pretty-printed, in a labelled ``<pre>``."""
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    return f'<pre class="json" aria-label={attr(label)}><code>{esc(text)}</code></pre>'


def status_badge(status: str) -> str:
    return f'<span class="badge status-{esc(status.lower())}">{esc(status)}</span>'


def link(href: str, text: object) -> str:
    return f"<a href={attr(href)}>{esc(text)}</a>"


def query(path: str, params: Mapping[str, str | None]) -> str:
    kept = {k: v for k, v in params.items() if v}
    return f"{path}?{urlencode(kept)}" if kept else path


def csrf_field(token: str) -> str:
    return f'<input type="hidden" name="csrf" value={attr(token)}>'


def button_form(
    action: str, label: str, csrf: str, *, extra: str = "", danger: bool = False
) -> str:
    """A POST form that is one button (and ``extra`` fields)."""
    cls = ' class="danger"' if danger else ""
    return (
        f'<form method="post" action={attr(action)} class="inline">{csrf_field(csrf)}{extra}'
        f'<button type="submit"{cls}>{esc(label)}</button></form>'
    )


def table(
    caption: str,
    headers: Sequence[str],
    rows: Iterable[str],
    *,
    table_id: str = "",
    data: Mapping[str, str] | None = None,
    empty: str = "Nothing here yet.",
) -> str:
    """A table with a caption and column headers; ``rows`` are ready ``<tr>`` elements."""
    body = "".join(rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="empty">{esc(empty)}</td></tr>'
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    ident = f" id={attr(table_id)}" if table_id else ""
    extra = "".join(f" data-{k}={attr(v)}" for k, v in (data or {}).items())
    return (
        f"<table{ident}{extra}><caption>{esc(caption)}</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def cells(*values: str) -> str:
    return "".join(f"<td>{v}</td>" for v in values)


def notice(message: str, kind: str = "error") -> str:
    role = "alert" if kind == "error" else "status"
    return f'<p class="notice {esc(kind)}" role="{role}">{esc(message)}</p>'


def page(
    title: str,
    body: str,
    *,
    environment: str = "",
    csrf: str = "",
    current: str = "",
) -> str:
    """A whole page: the header (navigation, environment, log out) and ``body``."""
    header = ""
    if csrf:
        items = "".join(
            f"<li><a href={attr(href)}{_CURRENT if href == current else ''}>{esc(text)}</a></li>"
            for href, text in NAV
        )
        header = (
            '<header class="top"><a class="brand" href="/runs">runplane</a>'
            f'<nav aria-label="Main"><ul>{items}</ul></nav>'
            f'<p class="env">Environment <strong id="environment">{esc(environment)}</strong></p>'
            f'<form method="post" action="/logout" class="inline">{csrf_field(csrf)}'
            '<button type="submit">Log out</button></form></header>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · runplane</title>"
        '<link rel="stylesheet" href="/assets/dashboard.css">'
        '<script src="/assets/dashboard.js" defer></script></head>'
        f'<body>{header}<main id="main">{body}</main></body></html>'
    )
