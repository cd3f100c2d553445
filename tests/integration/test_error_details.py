"""What a failed call carries beyond its status, through the services' one interceptor and the
SDK: a RetryInfo on UNAVAILABLE (its delay as the SDK error's ``retry_after``), an ErrorInfo
(its ``reason`` and ``info``), and the caller's deadline, which bounds the calls a service makes
for that caller."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from runplane import Client, NotFoundError, UnavailableError
from runplane.v1 import run_pb2
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import run_service_pb2_grpc as rpb_grpc
from runplane_common import deadlines
from runplane_common.errors import NotFound, Unavailable
from runplane_common.grpcserver import Server


class Runs(rpb_grpc.RunServiceServicer):
    """GetRun answers by run id: 'run_down' is UNAVAILABLE, 'run_gone' NOT_FOUND with a
    reason, any other a run whose task id is the inner timeout it would give a call it made."""

    def __init__(self) -> None:
        self.inner_timeouts: list[float] = []

    async def GetRun(self, request: rpb.GetRunRequest, context: Any) -> rpb.GetRunResponse:
        if request.run_id == "run_down":
            raise Unavailable("the database is unreachable", retry_after_seconds=2.5)
        if request.run_id == "run_gone":
            error = NotFound("no such run")
            error.reason = "RUN_NOT_FOUND"
            error.info = {"run_id": request.run_id}
            raise error
        self.inner_timeouts.append(deadlines.inner_timeout(10.0))
        return rpb.GetRunResponse(run=run_pb2.Run(id=request.run_id, task_id="t"))


@pytest.fixture
async def served() -> Any:
    server = Server(authenticate=None)
    runs = Runs()
    server.add(rpb_grpc.add_RunServiceServicer_to_server, runs, "runplane.v1.RunService")
    port = await server.start("127.0.0.1:0")
    try:
        yield f"127.0.0.1:{port}", runs
    finally:
        await server.stop(0)


async def test_unavailable_carries_when_to_retry_and_the_sdk_reads_it(served: Any) -> None:
    address, _ = served
    client = Client(api_url=address, secret_key="any")
    with pytest.raises(UnavailableError) as caught:
        await client.runs.retrieve("run_down")
    assert caught.value.retry_after == pytest.approx(2.5)
    assert "unreachable" in caught.value.message


async def test_a_reason_reaches_the_sdk_as_reason_and_info(served: Any) -> None:
    address, _ = served
    client = Client(api_url=address, secret_key="any")
    with pytest.raises(NotFoundError) as caught:
        await client.runs.retrieve("run_gone")
    assert (caught.value.reason, caught.value.info) == ("RUN_NOT_FOUND", {"run_id": "run_gone"})
    assert caught.value.retry_after is None


async def test_the_callers_deadline_bounds_the_calls_made_for_it(served: Any) -> None:
    address, runs = served
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpb_grpc.RunServiceStub(channel)
        await stub.GetRun(rpb.GetRunRequest(run_id="run_a"), timeout=0.8)
        await stub.GetRun(rpb.GetRunRequest(run_id="run_b"))
    bounded, unbounded = runs.inner_timeouts
    assert 0 < bounded <= 0.8, bounded
    assert unbounded == 10.0


def test_an_inner_timeout_without_a_caller_deadline_is_the_default() -> None:
    assert deadlines.inner_timeout(3.0) == 3.0
    deadlines.set_caller_deadline(-1.0)  # already passed: one quick try
    try:
        assert deadlines.inner_timeout(3.0) == deadlines.MINIMUM_SECONDS
    finally:
        deadlines.set_caller_deadline(None)
