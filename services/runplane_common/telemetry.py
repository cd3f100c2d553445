"""OpenTelemetry setup and W3C trace-context helpers for the services (the shared part is
:mod:`runplane.telemetry`, which task processes use too).

Export is configured by the standard ``OTEL_*`` variables (listed in :mod:`runplane.telemetry`),
read into a :class:`~runplane_common.config.TelemetrySettings` by each service's ``main``: with
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_TRACES_EXPORTER=otlp``) spans go to an OTLP collector
over gRPC or HTTP (``OTEL_EXPORTER_OTLP_PROTOCOL``); ``OTEL_TRACES_EXPORTER=console`` prints them.
Without either, spans are not recorded but trace context still propagates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry import context, propagate, trace

from runplane.telemetry import (
    context_from_traceparent,
    current_traceparent,
    install,
    shutdown,
    tracer,
)
from runplane_common.config import TelemetrySettings

__all__ = [
    "context_from_metadata",
    "context_from_traceparent",
    "current_traceparent",
    "link_current_span",
    "links_to",
    "setup",
    "shutdown",
    "tracer",
]


def setup(settings: TelemetrySettings) -> None:
    """Install a tracer provider for this process if ``settings`` ask for export (once)."""
    install(settings.export())


def context_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> context.Context:
    # Binary (``-bin``) headers carry no trace context, and need not be UTF-8.
    carrier: Mapping[str, str] = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return propagate.extract(carrier)


def links_to(traceparent: str, **attributes: str) -> list[trace.Link]:
    """A span link to the span ``traceparent`` names (none if it names none): for a span that
    follows from another without being its child (a replay of a run, say)."""
    span = trace.get_current_span(context_from_traceparent(traceparent)).get_span_context()
    return [trace.Link(span, attributes)] if span.is_valid else []


def link_current_span(traceparent: str, **attributes: str) -> None:
    """Link the current span to the span ``traceparent`` names: a trigger answered with a run
    that already exists (an idempotency key's, a debounced one) points at that run's trace."""
    span = trace.get_current_span()
    for link in links_to(traceparent, **attributes):
        span.add_link(link.context, link.attributes)
