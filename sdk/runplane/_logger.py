"""Logging from a task (SPEC §7, reference §9.3): ``from runplane import logger``.

``logger.info("charged", amount=42)`` inside a task belongs to the attempt: it becomes an event on
the current OpenTelemetry span (the attempt span, or a ``logger.trace`` span) and a log line the
executor sends (batched) to the scheduler, readable with ``runplane runs logs RUN_ID``.
``with logger.trace("fetch") as span:`` opens a child span of the attempt span; when it ends it
is recorded as a log line of level ``span`` carrying its duration. Outside a task the lines go
to the standard ``logging`` logger ``runplane.task`` and spans are plain OpenTelemetry spans.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from opentelemetry import trace

from runplane._context import current_context
from runplane._serde import dumps
from runplane.v1 import run_pb2

_fallback = logging.getLogger("runplane.task")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _attribute(value: Any) -> str | bool | int | float:
    return value if isinstance(value, str | bool | int | float) else dumps(value)


class Logger:
    """``logger``: ``debug/info/warning/error(message, **attributes)`` and ``trace(name)``."""

    def _emit(self, level: str, message: str, attributes: dict[str, Any]) -> None:
        ctx = current_context()
        sink: Callable[[dict[str, Any]], None] | None = (
            ctx.extra.get("log_sink") if ctx is not None else None
        )
        span = trace.get_current_span()
        span.add_event(
            message,
            {"log.level": level, **{k: _attribute(v) for k, v in attributes.items()}},
        )
        if ctx is None or sink is None:
            _fallback.log(_LEVELS.get(level, logging.INFO), "%s %s", message, attributes or "")
            return
        sc = span.get_span_context()
        sink(
            {
                "run_id": ctx.run.id,
                "attempt_id": ctx.attempt.id,
                "attempt_number": ctx.attempt.number,
                "level": level,
                "message": str(message),
                "attributes": dumps(attributes),
                "time_ms": time.time_ns() // 1_000_000,
                "trace_id": format(sc.trace_id, "032x") if sc.is_valid else "",
                "span_id": format(sc.span_id, "016x") if sc.is_valid else "",
            }
        )

    def debug(self, message: str, **attributes: Any) -> None:
        self._emit("debug", message, attributes)

    def info(self, message: str, **attributes: Any) -> None:
        self._emit("info", message, attributes)

    def warning(self, message: str, **attributes: Any) -> None:
        self._emit("warning", message, attributes)

    def error(self, message: str, **attributes: Any) -> None:
        self._emit("error", message, attributes)

    @contextlib.contextmanager
    def trace(self, name: str, **attributes: Any) -> Iterator[trace.Span]:
        """A child span of the current one; ``span.set_attribute(...)`` inside."""
        tracer = trace.get_tracer("runplane.task")
        start = time.monotonic()
        with tracer.start_as_current_span(
            name, attributes={k: _attribute(v) for k, v in attributes.items()}
        ) as span:
            try:
                yield span
            finally:
                duration_ms = round((time.monotonic() - start) * 1000, 3)
                self._emit("span", name, {**attributes, "duration_ms": duration_ms})


logger = Logger()


@dataclass(frozen=True)
class LogEntry:
    """A log line of a run, as ``runs.logs(run_id)`` returns it."""

    time: datetime
    level: str
    message: str
    attributes: dict[str, Any]
    attempt_number: int
    run_id: str
    trace_id: str
    span_id: str

    @classmethod
    def from_pb(cls, pb: run_pb2.LogEntry) -> LogEntry:
        return cls(
            time=datetime.fromtimestamp(pb.time.ToMilliseconds() / 1000, tz=UTC),
            level=pb.level,
            message=pb.message,
            attributes=orjson.loads(pb.attributes) if pb.attributes else {},
            attempt_number=pb.attempt_number,
            run_id=pb.run_id,
            trace_id=pb.trace_id,
            span_id=pb.span_id,
        )
