"""Spans go out over OTLP/HTTP (protobuf) when OTEL_EXPORTER_OTLP_PROTOCOL says http/protobuf."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from runplane.telemetry import TraceExport, tracer_provider
from tests.helpers.wait import eventually

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def receiver() -> AsyncIterator[
    tuple[list[trace_service_pb2.ExportTraceServiceRequest], str]
]:
    """A small OTLP/HTTP receiver on a free port: what it got, and its base URL."""
    got: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def export(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        got.append(trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read()))
        body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield got, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_spans_are_posted_as_protobuf_to_v1_traces(
    receiver: tuple[list[trace_service_pb2.ExportTraceServiceRequest], str],
) -> None:
    got, base = receiver
    export = TraceExport.from_environ(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": base,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "runplane-http-test",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        },
        "runplane-scheduler",
    )
    provider = tracer_provider(export)
    assert provider is not None
    with provider.get_tracer("test").start_as_current_span("over-http") as span:
        trace_id = span.get_span_context().trace_id.to_bytes(16, "big")
    # The exporter posts from its own thread with a blocking client; the receiver runs here.
    assert await asyncio.to_thread(provider.force_flush, 10_000)
    await asyncio.to_thread(provider.shutdown)

    def received() -> list[tuple[dict[str, str], str, bytes]]:
        return [
            (
                {a.key: a.value.string_value for a in rs.resource.attributes},
                s.name,
                s.trace_id,
            )
            for request in got
            for rs in request.resource_spans
            for scope in rs.scope_spans
            for s in scope.spans
        ]

    spans = await eventually(received, timeout=10, description="the span at the receiver")
    [(resource, name, got_trace_id)] = spans
    assert (name, got_trace_id) == ("over-http", trace_id)
    assert resource["service.name"] == "runplane-http-test"
    assert resource["deployment.environment"] == "test"
