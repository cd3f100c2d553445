"""One trace runs from the caller's span through the scheduler to the attempt in the executor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from runplane import RunStatus
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A tiny OTLP/gRPC receiver: remembers (service, span name, trace id, parent id)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, str]] = []

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        (service, span.name, span.trace_id.hex(), span.parent_span_id.hex())
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    server = grpc.aio.server()
    c = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(c, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield c, port
    await server.stop(0)


async def test_one_trace_spans_trigger_scheduler_and_attempt(
    tmp_path: Path, nats_server: Any, collector: tuple[Collector, int]
) -> None:
    received, port = collector
    otel = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    cluster = Cluster(tmp_path, nats_server.url, f"sqlite+aiosqlite:///{tmp_path}/rp.db", env=otel)
    await cluster.start()
    try:
        tracer = TracerProvider().get_tracer("test")
        client = cluster.client()
        with tracer.start_as_current_span("web-request") as root:
            handle = await client.tasks.trigger("hello-world", {"name": "trace"})
        trace_id = format(root.get_span_context().trace_id, "032x")
        run = await client.runs.poll(handle, interval=0.05, timeout=60)
        assert run.status is RunStatus.COMPLETED

        def services_in_trace() -> set[tuple[str, str]]:
            return {(s, name) for s, name, t, _ in received.spans if t == trace_id}

        found = await eventually(
            lambda: (
                {
                    ("runplane-scheduler", "/runplane.v1.RunService/TriggerRun"),
                    ("runplane-scheduler", "dispatch"),
                    ("runplane-executor", "attempt hello-world"),
                }
                <= services_in_trace()
            ),
            timeout=30,
            description="spans of scheduler and executor in the caller's trace",
        )
        assert found
        by_name = {name: parent for s, name, t, parent in received.spans if t == trace_id}
        root_id = format(root.get_span_context().span_id, "016x")
        assert by_name["/runplane.v1.RunService/TriggerRun"] == root_id
        assert by_name["attempt hello-world"] != ""
    finally:
        await cluster.stop()
