"""Tracing setup any runplane process shares, task processes and services alike: the tracer
provider that trace export asks for, and W3C trace-context helpers.

Export follows the standard OpenTelemetry variables (:class:`TraceExport` reads them):

- ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console``, ``none``, or a comma list of the first two.
  Unset, spans go out over OTLP when an OTLP endpoint is set, and are not recorded otherwise
  (trace context still propagates).
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the collector's base URL) or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the full traces URL, which wins).
- ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``): ``grpc`` (the
  default) or ``http/protobuf``.
- ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (``key=value,...``): the resource.

:func:`install` takes those values; :func:`setup_from_env` reads them (the task process); the
services read them into their settings in ``main``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from opentelemetry import context, propagate, trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "TraceExport",
    "context_from_traceparent",
    "current_traceparent",
    "install",
    "parse_resource_attributes",
    "setup_from_env",
    "shutdown",
    "tracer",
    "tracer_provider",
]

_configured = False


TRACES_EXPORTERS = ("otlp", "console", "none")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")


@dataclass(frozen=True)
class TraceExport:
    """Where this process's spans go: the standard ``OTEL_*`` trace-export variables, checked
    (a bad value is a ``ValueError`` naming its variable)."""

    service_name: str
    # OTEL_TRACES_EXPORTER: "otlp", "console", "none", a comma list, or "" (otlp if an endpoint).
    traces_exporter: str = ""
    # OTEL_EXPORTER_OTLP_ENDPOINT: the collector's base URL (http/protobuf adds /v1/traces).
    otlp_endpoint: str = ""
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: the traces URL as is; wins over otlp_endpoint.
    otlp_traces_endpoint: str = ""
    # OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL: "grpc" or "http/protobuf"; "" is grpc.
    otlp_protocol: str = ""
    # OTEL_RESOURCE_ATTRIBUTES: "key=value,..." (values percent-encoded).
    resource_attributes: str = ""

    def __post_init__(self) -> None:
        for name in self.exporters:
            if name not in TRACES_EXPORTERS:
                raise ValueError(
                    f"OTEL_TRACES_EXPORTER: {name!r} is not one of {', '.join(TRACES_EXPORTERS)}"
                )
        if self.otlp_protocol and self.otlp_protocol not in OTLP_PROTOCOLS:
            raise ValueError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL: {self.otlp_protocol!r} is not one of "
                f"{', '.join(OTLP_PROTOCOLS)}"
            )
        self.resource()  # checks OTEL_RESOURCE_ATTRIBUTES

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], service_name: str) -> TraceExport:
        """The settings ``environ`` gives; ``service_name`` unless OTEL_SERVICE_NAME (or a
        ``service.name`` in OTEL_RESOURCE_ATTRIBUTES) names the service."""
        attributes = environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
        named = parse_resource_attributes(attributes).get("service.name", "")
        return cls(
            service_name=environ.get("OTEL_SERVICE_NAME") or named or service_name,
            traces_exporter=environ.get("OTEL_TRACES_EXPORTER", ""),
            otlp_endpoint=environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            otlp_traces_endpoint=environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
            otlp_protocol=environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", ""),
            resource_attributes=attributes,
        )

    @property
    def exporters(self) -> tuple[str, ...]:
        """The exporters asked for; () when spans are not exported."""
        named = tuple(n.strip() for n in self.traces_exporter.split(",") if n.strip())
        if not named:
            return ("otlp",) if self.otlp_endpoint or self.otlp_traces_endpoint else ()
        return () if "none" in named else named

    def resource(self) -> dict[str, str]:
        """The resource attributes: OTEL_RESOURCE_ATTRIBUTES with the service's name."""
        return {
            **parse_resource_attributes(self.resource_attributes),
            "service.name": self.service_name,
        }

    def traces_url(self) -> str:
        """Where OTLP spans go ('' : the exporter's default)."""
        if self.otlp_traces_endpoint:
            return self.otlp_traces_endpoint
        if self.otlp_endpoint and self.otlp_protocol == "http/protobuf":
            return self.otlp_endpoint.rstrip("/") + "/v1/traces"
        return self.otlp_endpoint

    def span_exporters(self) -> list[SpanExporter]:
        # Imported only when spans are exported: the exporters are slow to import.
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        out: list[SpanExporter] = []
        for name in self.exporters:
            if name == "console":
                out.append(ConsoleSpanExporter(service_name=self.service_name))
            elif self.otlp_protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter as HttpExporter,
                )

                out.append(HttpExporter(endpoint=self.traces_url() or None))
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter as GrpcExporter,
                )

                out.append(GrpcExporter(endpoint=self.traces_url() or None))
        return out


def parse_resource_attributes(text: str) -> dict[str, str]:
    """``key=value,...`` as OTEL_RESOURCE_ATTRIBUTES writes it (values percent-encoded)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"OTEL_RESOURCE_ATTRIBUTES: {item.strip()!r} is not a key=value pair")
        out[unquote(key.strip())] = unquote(value.strip())
    return out


def tracer_provider(export: TraceExport) -> TracerProvider | None:
    """A tracer provider sending spans where ``export`` says; None if nothing is exported."""
    exporters = export.span_exporters()
    if not exporters:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create(dict(export.resource())))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def install(export: TraceExport) -> None:
    """Install a tracer provider for this process if export is asked for (once per process)."""
    global _configured
    if _configured:
        return
    _configured = True
    provider = tracer_provider(export)
    if provider is not None:
        trace.set_tracer_provider(provider)


def setup_from_env(service_name: str) -> None:
    """:func:`install` as the ``OTEL_*`` variables say."""
    install(TraceExport.from_environ(os.environ, service_name))


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
