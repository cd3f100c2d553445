"""The standard OTEL_* variables decide where spans go (runplane.telemetry.TraceExport)."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpExporter,
)
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from runplane.telemetry import TraceExport, parse_resource_attributes
from runplane_common.config import TelemetrySettings

pytestmark = pytest.mark.timeout(30)

OTEL_VARIABLES = (
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
)


def test_without_variables_nothing_is_exported() -> None:
    export = TraceExport.from_environ({}, "runplane-scheduler")
    assert export.service_name == "runplane-scheduler"
    assert export.exporters == ()
    assert export.span_exporters() == []


def test_an_endpoint_alone_turns_on_otlp_over_grpc() -> None:
    export = TraceExport.from_environ(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "svc"
    )
    assert export.exporters == ("otlp",)
    assert export.traces_url() == "http://collector:4317"
    [exporter] = export.span_exporters()
    assert isinstance(exporter, GrpcExporter)


def test_http_protobuf_posts_to_v1_traces_under_the_base_endpoint() -> None:
    export = TraceExport.from_environ(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        },
        "svc",
    )
    assert export.traces_url() == "http://collector:4318/v1/traces"
    [exporter] = export.span_exporters()
    assert isinstance(exporter, HttpExporter)


def test_the_traces_endpoint_and_protocol_win_over_the_general_ones() -> None:
    export = TraceExport.from_environ(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:9999/custom",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        },
        "svc",
    )
    assert export.otlp_protocol == "http/protobuf"
    assert export.traces_url() == "http://traces:9999/custom"


def test_the_exporter_variable_lists_exporters_or_turns_them_off() -> None:
    both = TraceExport("svc", traces_exporter="console, otlp")
    assert both.exporters == ("console", "otlp")
    kinds = [type(e) for e in both.span_exporters()]
    assert kinds == [ConsoleSpanExporter, GrpcExporter]
    off = TraceExport("svc", traces_exporter="none", otlp_endpoint="http://collector:4317")
    assert off.exporters == ()


def test_resource_attributes_are_parsed_and_the_service_name_wins() -> None:
    assert parse_resource_attributes("deployment.environment=prod, team=a%2Cb,") == {
        "deployment.environment": "prod",
        "team": "a,b",
    }
    named = TraceExport.from_environ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=edge,k=v"}, "svc")
    assert named.resource() == {"service.name": "edge", "k": "v"}
    overridden = TraceExport.from_environ(
        {"OTEL_RESOURCE_ATTRIBUTES": "service.name=edge", "OTEL_SERVICE_NAME": "core"}, "svc"
    )
    assert overridden.resource() == {"service.name": "core"}


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_RESOURCE_ATTRIBUTES", "team"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=variable):
        TraceExport.from_environ({variable: value}, "svc")


def test_service_settings_read_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4318/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "region=eu")
    settings = TelemetrySettings.from_env("runplane-realtime")
    assert settings == TelemetrySettings(
        "runplane-realtime",
        traces_exporter="otlp",
        otlp_traces_endpoint="http://127.0.0.1:4318/v1/traces",
        otlp_protocol="http/protobuf",
        resource_attributes="region=eu",
    )
    assert settings.export().resource() == {"region": "eu", "service.name": "runplane-realtime"}
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        TelemetrySettings.from_env("runplane-realtime")
