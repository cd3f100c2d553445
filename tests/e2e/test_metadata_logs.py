"""End to end: metadata, tags and logs of runs, from inside tasks and from outside, against real
services, nats-server and databases. Tasks: examples/execution.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from runplane import InvalidArgumentError, Run, RunStatus
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


CLUSTER_TASKS = "examples.execution"


async def finished(cluster: Cluster, run_id: str) -> Run:
    return await cluster.client().runs.poll(run_id, interval=0.1, timeout=120)


async def test_metadata_from_a_task_is_flushed_as_run_updates(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("progress", {}, metadata={"scratch": 1, "owner": "ada"})
    history = [run async for run in client.runs.subscribe_to_run(handle)]
    final = history[-1]
    assert final.status is RunStatus.COMPLETED
    expected = {"owner": "ada", "progress": 1.0, "count": 1, "steps": ["a", "b"]}
    assert final.metadata == expected
    assert final.output == expected  # the task's own view agrees
    # The first flush was its own update, seen while the run was executing.
    executing = [r.metadata for r in history if r.status is RunStatus.EXECUTING]
    assert {"scratch": 1, "owner": "ada", "progress": 0.5, "count": 2, "steps": ["a"]} in executing
    # Versions rise by one per update, with nothing skipped.
    versions = [r.version for r in history]
    assert versions == list(range(versions[0], versions[0] + len(versions)))


async def test_a_child_updates_its_parents_and_roots_metadata(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("parent", {}, metadata={"children": 0})
    run = await finished(cluster, handle.id)
    assert run.status is RunStatus.COMPLETED, run.error
    child = await client.runs.retrieve(run.output)
    assert child.status is RunStatus.COMPLETED
    assert child.parent_run_id == handle.id and child.root_run_id == handle.id
    assert run.metadata == {"children": 1, "child_done": True, "log": ["child was here"]}
    assert child.metadata == {}


async def test_update_metadata_from_outside_and_its_limit(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("quick", {})
    await finished(cluster, handle.id)
    run = await client.runs.update_metadata(handle, {"reviewed": True})
    assert run.metadata == {"reviewed": True}
    assert (await client.runs.retrieve(handle)).metadata == {"reviewed": True}
    with pytest.raises(InvalidArgumentError) as caught:
        await client.runs.update_metadata(handle, {"big": "x" * 300_000})
    assert caught.value.field == "metadata"
    assert "limit" in str(caught.value)
    assert (await client.runs.retrieve(handle)).metadata == {"reviewed": True}


async def test_tags_added_inside_a_run_show_on_the_run(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("tagger", {}, tags=["initial"])
    run = await finished(cluster, handle.id)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.tags == ["initial", "added:1", "added:2"]
    listed = [r.id async for r in client.runs.list(tag="added:2")]
    assert listed == [handle.id]


async def test_tags_beyond_ten_per_run_are_refused(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("quick", {}, tags=[f"t{i}" for i in range(9)])
    await finished(cluster, handle.id)
    with pytest.raises(InvalidArgumentError) as caught:
        await client.tags.add(["x", "y"], run_id=handle.id)
    assert caught.value.field == "tags"
    assert "limit of 10" in str(caught.value)
    run = await client.tags.add("x", run_id=handle.id)
    assert len(run.tags) == 10


async def test_runs_logs_prints_the_tasks_log_lines(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("chatty", {})
    run = await finished(cluster, handle.id)
    assert run.status is RunStatus.COMPLETED
    entries = [e async for e in client.runs.logs(handle, page_size=2)]  # several pages
    assert [(e.level, e.message) for e in entries] == [
        ("info", "starting the work"),
        ("warning", "the fetch was slow"),
        ("span", "fetch"),
        ("error", "something went wrong, but we carry on"),
    ]
    assert entries[0].attributes == {"step": 1}
    assert entries[0].attempt_number == 1

    env = {**cluster.env, "RUNPLANE_SECRET_KEY": cluster.keys["dev"]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runplane_cli", "runs", "logs", handle.id,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode().splitlines()
    assert len(text) == 4
    assert "INFO" in text[0] and 'starting the work {"step":1}' in text[0]
    assert "WARNING" in text[1] and "the fetch was slow" in text[1]
    assert "ERROR" in text[3] and "something went wrong" in text[3]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A tiny OTLP/gRPC receiver: span name -> (trace id, span id, event names)."""

    def __init__(self) -> None:
        self.spans: dict[str, tuple[str, str, list[str]]] = {}

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans[span.name] = (
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        [e.name for e in span.events],
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_logs_are_span_events_of_the_attempt_and_carry_its_trace(
    tmp_path: Path, nats_server: Any, database_url: str
) -> None:
    received = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    otel = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    cluster = Cluster(tmp_path, nats_server.url, database_url, tasks="examples.execution", env=otel)
    await cluster.start()
    try:
        client = cluster.client()
        handle = await client.tasks.trigger("chatty", {})
        assert (await finished(cluster, handle.id)).status is RunStatus.COMPLETED
        await eventually(
            lambda: {"attempt chatty", "fetch"} <= set(received.spans),
            timeout=30,
            description="the attempt span and the user span exported",
        )
        attempt_trace, attempt_span, attempt_events = received.spans["attempt chatty"]
        fetch_trace, fetch_span, fetch_events = received.spans["fetch"]
        assert attempt_events == ["starting the work", "something went wrong, but we carry on"]
        assert fetch_events == ["the fetch was slow", "fetch"]
        assert fetch_trace == attempt_trace
        entries = [e async for e in client.runs.logs(handle)]
        assert [(e.trace_id, e.span_id) for e in entries] == [
            (attempt_trace, attempt_span),
            (fetch_trace, fetch_span),
            (fetch_trace, fetch_span),
            (attempt_trace, attempt_span),
        ]
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        await cluster.stop()
        await server.stop(0)


async def test_metadata_past_the_limit_is_refused_and_the_run_goes_on(cluster: Cluster) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("oversize", {})
    run = await finished(cluster, handle.id)
    assert run.status is RunStatus.COMPLETED
    assert run.output == "still here"
    assert run.metadata == {"small": 1, "after": True}
    assert "over the metadata limit" in cluster.scheduler.log()


async def test_runs_logs_follow_prints_lines_as_they_come_until_the_run_ends(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    # Delayed: the follower starts before the run has logged anything.
    handle = await client.tasks.trigger("chatty", {}, delay="2s")
    env = {**cluster.env, "RUNPLANE_SECRET_KEY": cluster.keys["dev"]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runplane_cli", "runs", "logs", "-f", handle.id,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert (await client.runs.retrieve(handle.id)).status is RunStatus.COMPLETED
    lines = out.decode().splitlines()
    assert [line.split()[2] for line in lines] == ["INFO", "WARNING", "SPAN", "ERROR"], lines
