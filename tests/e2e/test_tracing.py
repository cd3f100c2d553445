"""One trace runs from the caller's span through the scheduler to the attempt in the executor,
and on through child runs, retries, queue time, waits and the realtime service."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry import propagate
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider

import runplane
from runplane import RunStatus
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A tiny OTLP/gRPC receiver: remembers (service, span name, trace id, parent id), and
    every span whole with its service."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, str]] = []
        self.whole: list[tuple[str, Span]] = []

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
                    self.whole.append((service, span))
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


def _attributes(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind) if kind else None
    return out


async def test_a_parent_its_children_and_a_retry_are_one_tree(
    tmp_path: Path, nats_server: Any, database_url: str, collector: tuple[Collector, int]
) -> None:
    """A parent waits on two children, one of which fails once: every span is in the caller's
    trace; the children's spans sit under the parent's wait span; the retried child has two
    attempt spans; every attempt has a queue span with a duration; the realtime subscription
    the caller opened is a span of its own, under the caller's."""
    received, port = collector
    otel = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    cluster = Cluster(
        tmp_path, nats_server.url, database_url, tasks="tests.e2e.tracing_tasks", env=otel
    )
    await cluster.start()
    try:
        tracer = TracerProvider().get_tracer("test")
        client = cluster.client()
        with tracer.start_as_current_span("web-request") as root:
            handle = await client.tasks.trigger("trace-parent", None)
            seen = [run async for run in client.runs.subscribe_to_run(handle)]
            # The same run over SSE, with the caller's trace context in its headers.
            headers = {"Authorization": f"Bearer {cluster.keys['dev']}"}
            propagate.inject(headers)
            url = f"{cluster.realtime_http_url}/realtime/v1/runs/{handle.id}"
            async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as sse:
                assert sse.status == 200
                assert b"event: end" in await sse.read()
        assert seen[-1].status is RunStatus.COMPLETED, cluster.logs()
        trace_id = root.get_span_context().trace_id.to_bytes(16, "big")
        root_id = root.get_span_context().span_id.to_bytes(8, "big")
        run = await client.runs.retrieve(handle)
        parent_id = run.id
        first_child, retried_child = run.output

        def in_trace() -> dict[bytes, tuple[str, Span]]:
            return {s.span_id: (svc, s) for svc, s in received.whole if s.trace_id == trace_id}

        def of_run(spans: dict[bytes, tuple[str, Span]], name: str, run_id: str) -> list[Span]:
            return [
                s
                for _, s in spans.values()
                if s.name == name and _attributes(s).get("runplane.run_id") == run_id
            ]

        def complete() -> dict[bytes, tuple[str, Span]]:
            spans = in_trace()
            assert len(of_run(spans, "attempt flaky", retried_child)) == 2
            assert len(of_run(spans, "queue", retried_child)) == 2
            assert of_run(spans, "attempt flaky", first_child)
            assert of_run(spans, "queue", first_child)
            assert of_run(spans, "queue", parent_id)
            assert [s for _, s in spans.values() if s.name == "wait children"]
            assert of_run(spans, "/runplane.v1.RealtimeService/SubscribeToRun", parent_id)
            assert of_run(spans, "GET /realtime/v1/runs/{run_id}", parent_id)
            return spans

        spans = await eventually(complete, timeout=30, description="the whole tree exported")

        # One trace id everywhere: no span of these runs is in another trace.
        runs = {parent_id, first_child, retried_child}
        strays = [
            (s.name, _attributes(s).get("runplane.run_id"))
            for _, s in received.whole
            if _attributes(s).get("runplane.run_id") in runs and s.trace_id != trace_id
        ]
        assert strays == []
        services = {svc for svc, _ in spans.values()}
        assert {"runplane-scheduler", "runplane-executor", "runplane-realtime"} <= services

        def ancestors(span: Span) -> list[bytes]:
            chain = []
            while span.parent_span_id:
                chain.append(span.parent_span_id)
                if span.parent_span_id not in spans:
                    break
                span = spans[span.parent_span_id][1]
            return chain

        [parent_attempt] = of_run(spans, "attempt trace-parent", parent_id)
        [wait] = [s for _, s in spans.values() if s.name == "wait children"]
        assert wait.parent_span_id == parent_attempt.span_id
        assert root_id in ancestors(parent_attempt)
        # The children's queue and attempt spans sit under the parent's wait span, inside it.
        for child in (first_child, retried_child):
            for name in ("queue", "dispatch", "attempt flaky"):
                for span in of_run(spans, name, child):
                    assert wait.span_id in ancestors(span), (name, child)
                    # (a queue span starts at the run's queued_at, stored in milliseconds)
                    assert wait.start_time_unix_nano <= span.start_time_unix_nano + 1_000_000
                    assert span.end_time_unix_nano <= wait.end_time_unix_nano
        # The retried child: two attempts, numbered, the first one failed.
        attempts = sorted(
            of_run(spans, "attempt flaky", retried_child),
            key=lambda s: int(_attributes(s)["runplane.attempt"]),
        )
        assert [int(_attributes(s)["runplane.attempt"]) for s in attempts] == [1, 2]
        assert attempts[0].end_time_unix_nano <= attempts[1].start_time_unix_nano
        # Queue time is a span with a real duration, one per attempt (the retry's too).
        queues = [s for _, s in spans.values() if s.name == "queue"]
        assert len(queues) == 4
        assert all(s.end_time_unix_nano > s.start_time_unix_nano for s in queues)
        assert all(s.end_time_unix_nano > s.start_time_unix_nano for s in attempts)
        # The realtime service's span of the caller's subscription, for the stream's life.
        [subscription] = of_run(spans, "/runplane.v1.RealtimeService/SubscribeToRun", parent_id)
        assert spans[subscription.span_id][0] == "runplane-realtime"
        assert subscription.parent_span_id == root_id
        assert subscription.end_time_unix_nano >= parent_attempt.end_time_unix_nano
        [over_sse] = of_run(spans, "GET /realtime/v1/runs/{run_id}", parent_id)
        assert spans[over_sse.span_id][0] == "runplane-realtime"
        assert over_sse.parent_span_id == root_id
        assert _attributes(over_sse)["http.response.status_code"] == 200
    finally:
        await cluster.stop()


async def test_a_replay_and_a_scheduled_run_link_rather_than_nest(
    tmp_path: Path, nats_server: Any, database_url: str, collector: tuple[Collector, int]
) -> None:
    """A replay is in the replaying caller's trace with a link to the original run's; a trigger
    answered by an existing run (its idempotency key) links to that run's trace; each schedule
    tick's run is a trace of its own, rooted at the tick's span."""
    received, port = collector
    otel = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        # The minutely schedule ticks every second.
        "RUNPLANE_SCHEDULE_CLOCK_SPEED": "60",
        "RUNPLANE_SCHEDULE_CLOCK_EPOCH_MS": str(time.time_ns() // 1_000_000),
    }
    cluster = Cluster(
        tmp_path,
        nats_server.url,
        database_url,
        tasks=["examples.hello", "examples.scheduled"],
        env=otel,
    )
    await cluster.start()
    try:
        tracer = TracerProvider().get_tracer("test")
        client = cluster.client()
        with tracer.start_as_current_span("first-request") as first:
            original = await client.tasks.trigger(
                "hello-world", {"name": "first"}, idempotency_key="once"
            )
        assert (await client.runs.poll(original, timeout=60)).status is RunStatus.COMPLETED
        with tracer.start_as_current_span("again-request") as again:
            same = await client.tasks.trigger(
                "hello-world", {"name": "first"}, idempotency_key="once"
            )
        assert same.id == original.id
        with tracer.start_as_current_span("replay-request") as second:
            replayed = await client.runs.replay(original)
        assert (await client.runs.poll(replayed, timeout=60)).status is RunStatus.COMPLETED
        first_trace = first.get_span_context().trace_id.to_bytes(16, "big")
        second_trace = second.get_span_context().trace_id.to_bytes(16, "big")

        def spans_named(name: str, run_id: str | None = None) -> list[Span]:
            return [
                s
                for _, s in received.whole
                if s.name == name
                and (run_id is None or _attributes(s).get("runplane.run_id") == run_id)
            ]

        def replay_exported() -> tuple[Span, Span]:
            [replay] = spans_named("replay")
            [attempt] = spans_named("attempt hello-world", replayed.id)
            return replay, attempt

        replay, attempt = await eventually(replay_exported, timeout=30)
        assert replay.trace_id == second_trace
        assert attempt.trace_id == second_trace
        assert [link.trace_id for link in replay.links] == [first_trace]
        assert _attributes(replay)["runplane.replayed_from_run_id"] == original.id
        [original_attempt] = spans_named("attempt hello-world", original.id)
        assert original_attempt.trace_id == first_trace
        again_trace = again.get_span_context().trace_id.to_bytes(16, "big")
        [cached] = [
            s
            for s in spans_named("/runplane.v1.RunService/TriggerRun")
            if s.trace_id == again_trace
        ]
        assert [link.trace_id for link in cached.links] == [first_trace]

        async def scheduled_run_traced() -> tuple[Span, Span, Span]:
            runs = [r async for r in client.runs.list(task="minutely-report")]
            for run in runs:
                attempts = spans_named("attempt minutely-report", run.id)
                queues = spans_named("queue", run.id)
                if attempts and queues:
                    ticks = [s for _, s in received.whole if s.trace_id == attempts[0].trace_id]
                    [tick] = [s for s in ticks if s.name.startswith("schedule ")]
                    return tick, queues[0], attempts[0]
            raise AssertionError(f"no traced scheduled run yet among {[r.id for r in runs]}")

        tick, queue, scheduled = await eventually(scheduled_run_traced, timeout=60)
        assert tick.parent_span_id == b""  # a root: the run's own trace
        assert queue.trace_id == scheduled.trace_id == tick.trace_id
        assert tick.trace_id not in (first_trace, second_trace)
        assert _attributes(tick)["runplane.task_id"] == "minutely-report"
    finally:
        await cluster.stop()


async def test_an_evicted_wait_and_the_replay_that_resumes_it_stay_in_the_runs_trace(
    tmp_path: Path, nats_server: Any, database_url: str, collector: tuple[Collector, int]
) -> None:
    """A token wait evicted from memory ends its span marked evicted (not failed); the run's
    replay after the token completes is a second attempt span in the same trace, behind a queue
    span that starts when it queued again, not when the run first did."""
    received, port = collector
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "RUNPLANE_EXECUTOR_MAX_RESIDENT_WAITS": "0",
        "RUNPLANE_EXECUTOR_EVICT_WAITS_AFTER": "1",
    }
    cluster = Cluster(
        tmp_path, nats_server.url, database_url, tasks="tests.e2e.evict_tasks", env=env
    )
    await cluster.start()
    try:
        tracer = TracerProvider().get_tracer("test")
        client = cluster.client()
        waits = runplane.WaitAPI(client)
        token = await waits.create_token()
        with tracer.start_as_current_span("web-request") as root:
            handle = await client.tasks.trigger(
                "evict-parent", {"n": 4, "token": token.id, "tag": "traced", "dir": str(tmp_path)}
            )
        trace_id = root.get_span_context().trace_id.to_bytes(16, "big")

        def named(name: str) -> list[Span]:
            return [s for _, s in received.whole if s.trace_id == trace_id and s.name == name]

        def evicted_wait() -> Span:
            spans = [s for s in named("wait token") if _attributes(s).get("runplane.wait.evicted")]
            assert len(spans) == 1, [(s.name, _attributes(s)) for _, s in received.whole]
            return spans[0]

        evicted = await eventually(evicted_wait, timeout=60, description="the evicted wait")
        await waits.complete_token(token.id, "approved")
        run = await client.runs.poll(handle, interval=0.1, timeout=60)
        assert run.status is RunStatus.COMPLETED, cluster.logs()

        def replayed() -> tuple[list[Span], list[Span], list[Span]]:
            attempts = [
                s
                for s in named("attempt evict-parent")
                if _attributes(s)["runplane.run_id"] == run.id
            ]
            queues = [s for s in named("queue") if _attributes(s)["runplane.run_id"] == run.id]
            token_waits = named("wait token")
            assert (len(attempts), len(queues), len(token_waits)) == (2, 2, 2)
            return attempts, queues, token_waits

        attempts, queues, token_waits = await eventually(replayed, timeout=30)
        assert evicted.status.code != evicted.status.STATUS_CODE_ERROR
        [resumed] = [s for s in token_waits if s.span_id != evicted.span_id]
        assert _attributes(resumed)["runplane.wait.ok"] is True
        first_queue, second_queue = sorted(queues, key=lambda s: s.start_time_unix_nano)
        # The replay queued when the token completed, after the eviction.
        assert second_queue.start_time_unix_nano + 1_000_000 >= evicted.end_time_unix_nano
        assert second_queue.end_time_unix_nano > second_queue.start_time_unix_nano
        first_attempt, second_attempt = sorted(attempts, key=lambda s: s.start_time_unix_nano)
        assert first_attempt.end_time_unix_nano <= second_attempt.start_time_unix_nano
        assert first_queue.end_time_unix_nano <= first_attempt.start_time_unix_nano
        assert second_queue.end_time_unix_nano <= second_attempt.start_time_unix_nano
        # The child triggered before the eviction sits under the first execution's wait span.
        [children_wait, _journaled] = sorted(
            named("wait children"), key=lambda s: s.start_time_unix_nano
        )
        child_attempts = named("attempt evict-child")
        assert [s.trace_id for s in child_attempts] == [trace_id]
        child_queue = [
            s
            for s in named("queue")
            if _attributes(s)["runplane.run_id"]
            == _attributes(child_attempts[0])["runplane.run_id"]
        ]
        assert [s.parent_span_id for s in child_queue] == [children_wait.span_id]
    finally:
        await cluster.stop()
