"""Tracing inside a task process: the tracer provider the ``OTEL_*`` variables ask for, and the
span context an attempt continues from its W3C traceparent.

Export is configured by the standard variables: with ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_TRACES_EXPORTER=otlp``) spans go to an OTLP/gRPC collector; ``OTEL_TRACES_EXPORTER=console``
prints them. Without either, spans are not recorded but trace context still propagates.
"""

from __future__ import annotations

import os

from opentelemetry import context, propagate, trace

_configured = False


def setup(service_name: str) -> None:
    """Install a tracer provider for this process if the environment asks for export."""
    global _configured
    if _configured:
        return
    _configured = True
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if exporter_name == "none":
        return
    if not (exporter_name or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return
    # Imported only when spans are exported: the exporters are slow to import.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    service = os.environ.get("OTEL_SERVICE_NAME", service_name)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
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


def context_from_traceparent(traceparent: str) -> context.Context:
    return propagate.extract({"traceparent": traceparent} if traceparent else {})
