"""Tracing setup any runplane process shares, task processes and services alike: the tracer
provider that trace export asks for, and W3C trace-context helpers.

Export follows the standard OpenTelemetry variables: with ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_TRACES_EXPORTER=otlp``) spans go to an OTLP/gRPC collector; ``OTEL_TRACES_EXPORTER=console``
prints them; ``none`` turns export off. Without any, spans are not recorded but trace context still
propagates. :func:`install` takes those values; :func:`setup_from_env` reads them (the task
process); the services read them into their settings in ``main``.
"""

from __future__ import annotations

import os

from opentelemetry import context, propagate, trace

__all__ = [
    "context_from_traceparent",
    "current_traceparent",
    "install",
    "setup_from_env",
    "shutdown",
    "tracer",
]

_configured = False


def install(service_name: str, traces_exporter: str = "", otlp_endpoint: str = "") -> None:
    """Install a tracer provider for this process if export is asked for (once per process).

    ``traces_exporter``: "otlp", "console", "none", or "" (otlp when ``otlp_endpoint`` is set)."""
    global _configured
    if _configured:
        return
    _configured = True
    if traces_exporter == "none" or not (traces_exporter or otlp_endpoint):
        return
    # Imported only when spans are exported: the exporters are slow to import.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter: SpanExporter
    if traces_exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def setup_from_env(service_name: str) -> None:
    """:func:`install` as the ``OTEL_*`` variables say (``OTEL_SERVICE_NAME`` wins)."""
    install(
        os.environ.get("OTEL_SERVICE_NAME", service_name),
        os.environ.get("OTEL_TRACES_EXPORTER", ""),
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
    )


def shutdown() -> None:
    """Flush and stop the tracer provider, if one was installed."""
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
