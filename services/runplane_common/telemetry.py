"""OpenTelemetry setup and W3C trace-context helpers.

Export is configured by the standard ``OTEL_*`` variables, read into a
:class:`~runplane_common.config.TelemetrySettings` by each service's ``main``: with
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_TRACES_EXPORTER=otlp``) spans go to an OTLP/gRPC
collector; ``OTEL_TRACES_EXPORTER=console`` prints them. Without either, spans are not recorded
but trace context still propagates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry import context, propagate, trace

from runplane_common.config import TelemetrySettings

_configured = False


def setup(settings: TelemetrySettings) -> None:
    """Install a tracer provider for this process if ``settings`` ask for export (once)."""
    global _configured
    if _configured:
        return
    _configured = True
    exporter_name = settings.traces_exporter
    if exporter_name == "none":
        return
    if not (exporter_name or settings.otlp_endpoint):
        return
    # Imported only when spans are exported: the exporters are slow to import.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def shutdown() -> None:
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if stop is not None:
        stop()


def tracer() -> trace.Tracer:
    return trace.get_tracer("runplane")


def current_traceparent() -> str:
    """The W3C traceparent of the current span, or ''."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def context_from_traceparent(traceparent: str) -> context.Context:
    return propagate.extract({"traceparent": traceparent} if traceparent else {})


def context_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> context.Context:
    # Binary (``-bin``) headers carry no trace context, and need not be UTF-8.
    carrier: Mapping[str, str] = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return propagate.extract(carrier)
