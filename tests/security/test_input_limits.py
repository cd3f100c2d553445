"""Input that used to break readers or the server (issue 12, finding 10): JSON nested past the
depth limit is refused where it enters, a binary header that is not UTF-8 is ignored, and a
listing with thousands of filter values is the caller's INVALID_ARGUMENT. A scheduler in this
process, SQLite and PostgreSQL, over real gRPC."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

import runplane
from runplane import RunStatus
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import run_service_pb2_grpc, waitpoint_service_pb2_grpc
from runplane.v1 import waitpoint_service_pb2 as wspb
from runplane.v1 import worker_service_pb2 as wpb
from runplane_scheduler.app import Scheduler
from runplane_scheduler.keys import create_key
from tests.helpers.registration import register_in
from tests.helpers.worker import RawWorker

pytestmark = pytest.mark.timeout(90)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def _refused(
    call: Any, request: Any, key: str, *extra: tuple[str, Any]
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(request, metadata=(("authorization", f"Bearer {key}"), *extra))
    return raised.value


async def test_json_nested_past_the_depth_limit_is_refused_where_it_enters(
    scheduler: Scheduler,
) -> None:
    key = await create_key(scheduler.engine_db, "dev")
    await register_in(scheduler, "dev", ("t",))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}") as channel:
        runs = run_service_pb2_grpc.RunServiceStub(channel)
        tokens = waitpoint_service_pb2_grpc.WaitpointServiceStub(channel)
        for depth in (101, 1000):
            error = await _refused(
                runs.TriggerRun, rpb.TriggerRunRequest(task_id="t", payload=_nested(depth)), key
            )
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "payload" in (error.details() or "") and "depth limit of 100" in (
                error.details() or ""
            )
        deep_metadata = '{"a":' + _nested(200) + "}"
        error = await _refused(
            runs.TriggerRun,
            rpb.TriggerRunRequest(
                task_id="t", payload="{}", options=rpb.TriggerOptions(metadata=deep_metadata)
            ),
            key,
        )
        assert "options.metadata" in (error.details() or "")
        made = await runs.TriggerRun(
            rpb.TriggerRunRequest(task_id="t", payload=_nested(100)),
            metadata=(("authorization", f"Bearer {key}"),),
        )
        error = await _refused(
            runs.UpdateRunMetadata,
            rpb.UpdateRunMetadataRequest(run_id=made.run.id, metadata=deep_metadata),
            key,
        )
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        token = await tokens.CreateToken(
            wspb.CreateTokenRequest(), metadata=(("authorization", f"Bearer {key}"),)
        )
        error = await _refused(
            tokens.CompleteToken,
            wspb.CompleteTokenRequest(token_id=token.token.id, data=_nested(500)),
            key,
        )
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "data" in (
            error.details() or ""
        )


async def test_an_output_nested_past_the_limit_fails_the_run(scheduler: Scheduler) -> None:
    """A worker of another language could report what the SDK's encoder never makes."""
    key = await create_key(scheduler.engine_db, "dev")
    client = runplane.Client(api_url=f"127.0.0.1:{scheduler.port}", secret_key=key)
    worker_key = await create_key(scheduler.engine_db, "dev", kind="worker")
    async with RawWorker(f"127.0.0.1:{scheduler.port}", worker_key) as worker:
        await worker.register(
            tasks=[wpb.TaskDefinition(id="deep", retry=wpb.RetryPolicy(max_attempts=1))]
        )
        handle = await client.tasks.trigger("deep", {})
        assignment = (await worker.read()).assignment
        assert assignment.run.id == handle.id
        worker.send(
            wpb.ConnectRequest(
                result=wpb.AttemptResult(attempt_id=assignment.attempt_id, output=_nested(300))
            )
        )
        run = await client.runs.poll(handle, interval=0.05, timeout=30)
    assert run.status is RunStatus.FAILED
    assert run.error is not None and "depth limit" in run.error.message


async def test_a_binary_header_that_is_not_utf8_is_ignored(scheduler: Scheduler) -> None:
    key = await create_key(scheduler.engine_db, "dev")
    junk = ("x-junk-bin", b"\xff\xfe\xfa")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}") as channel:
        runs = run_service_pb2_grpc.RunServiceStub(channel)
        request = rpb.GetRunRequest(run_id="run_01jd0000000000000000000000")
        error = await _refused(runs.GetRun, request, key, junk)
        assert error.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await runs.GetRun(request, metadata=(junk,))
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_a_listing_with_thousands_of_filter_values_is_invalid(scheduler: Scheduler) -> None:
    key = await create_key(scheduler.engine_db, "dev")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}") as channel:
        runs = run_service_pb2_grpc.RunServiceStub(channel)
        for request, name in (
            (rpb.ListRunsRequest(tags=[f"t{i}" for i in range(2000)]), "tags"),
            (rpb.ListRunsRequest(task_ids=[f"t{i}" for i in range(2000)]), "task_ids"),
        ):
            error = await _refused(runs.ListRuns, request, key)
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert (error.details() or "").startswith(f"{name}: 2000 values is over the limit")
